"""The seed's Python API, as a thin facade over the same code the CLI runs.

backend = create_backend("pytorch", device="cpu", quantization="int4")
model = backend.load_model("Qwen/Qwen2.5-72B-Instruct")
print(model.generate("What is a cycle low?", max_length=200))

pipeline = DPOPipeline(model_config=get_model_config("qwen-72b"), config=PipelineConfig(...))
pipeline.train_topics(topics=["market_cycles"], data_dir="data/bob/", output_dir="checkpoints/")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mindprint_ray.curriculum.chat_template import with_system
from mindprint_ray.errors import UserError
from mindprint_ray.planning.model_config import ModelConfig
from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.runs.storage import is_s3, local_cache_root
from mindprint_ray.spec.inputs import check_run_name


@dataclass
class LoadedModel:
    """A model plus tokenizer that answers chat prompts with the model's own template."""

    model: object
    tokenizer: object
    backend: str

    def generate(self, prompt: str, max_length: int = 200, system_prompt: str | None = None) -> str:
        messages = with_system(prompt, system_prompt)
        if self.backend == "mlx":
            from mlx_lm import generate

            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return generate(self.model, self.tokenizer, prompt=text, max_tokens=max_length, verbose=False)
        import torch

        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_length, do_sample=False)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass
class Backend:
    kind: str  # "pytorch" or "mlx"
    device: str = "auto"
    quantization: str | None = None  # "int4"/"nf4" or None
    dtype: str = "bfloat16"
    trust_remote_code: bool = False

    def load_model(self, name_or_path: str, adapter_path: str | None = None) -> LoadedModel:
        return (
            self._load_mlx(name_or_path, adapter_path)
            if self.kind == "mlx"
            else self._load_torch(name_or_path, adapter_path)
        )

    def _load_torch(self, path: str, adapter_path: str | None) -> LoadedModel:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs: dict = {"trust_remote_code": self.trust_remote_code}
        if self.quantization in ("int4", "nf4"):
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            kwargs["device_map"] = device
        else:
            kwargs["dtype"] = getattr(torch, self.dtype)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if not self.quantization:
            model.to(device)
        if adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path)
        model.eval()
        return LoadedModel(
            model, AutoTokenizer.from_pretrained(path, trust_remote_code=self.trust_remote_code), "pytorch"
        )

    def _load_mlx(self, path: str, adapter_path: str | None) -> LoadedModel:
        try:
            import mlx.nn as nn
            from mlx_lm import load
        except ImportError:
            raise UserError("the mlx backend needs mlx and mlx-lm", hint="pip install 'mindprint-ray[mlx]'") from None
        if self.quantization not in ("int4", "nf4"):
            model, tokenizer = load(path, adapter_path=adapter_path)
            return LoadedModel(model, tokenizer, "mlx")
        model, tokenizer = load(path)  # quantize first, then add the adapter (as it was trained: QLoRA)
        if not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            nn.quantize(model, group_size=64, bits=4)
        if adapter_path:
            from mlx_lm.tuner.utils import load_adapters

            model = load_adapters(model, adapter_path)
        return LoadedModel(model, tokenizer, "mlx")


def create_backend(
    backend_type: str = "pytorch",
    device: str = "auto",
    quantization: str | None = None,
    dtype: str = "bfloat16",
    trust_remote_code: bool = False,
) -> Backend:
    kind = {"pytorch": "pytorch", "torch": "pytorch", "mlx": "mlx"}.get(backend_type)
    if kind is None:
        raise UserError(f"unknown backend '{backend_type}'", hint="use 'pytorch' or 'mlx'")
    if quantization not in (None, "int4", "nf4"):
        raise UserError(f"unknown quantization '{quantization}'", hint="use 'int4' (NF4 / MLX 4-bit) or None")
    return Backend(kind, device, quantization, dtype, trust_remote_code)


@dataclass
class PipelineConfig:
    """The seed's pipeline settings; anything else comes from the run-spec defaults."""

    backend_type: str = "pytorch"
    backend_device: str = "auto"
    backend_dtype: str = "bfloat16"
    quantization: str | None = "int4"
    sft_learning_rate: float = 2e-4
    sft_batch_size: int = 1
    sft_epochs: float = 3
    dpo_learning_rate: float = 1e-7
    dpo_batch_size: int = 1
    dpo_steps: int = 100
    max_seq_length: int = 4096
    hardware_profile: str | None = None
    model_path: str | None = None
    extra: dict = field(default_factory=dict)  # any other run-spec sections, e.g. {"eval": {"enabled": False}}


def spec_file(output_dir: str, name: str) -> Path:
    """Where train_topics writes the run's spec: in output_dir, or for `s3://` storage in the local cache (never a
    local folder named `s3:`); the run folder's own spec.yaml is mirrored to S3 either way."""
    folder = local_cache_root() / "specs" if is_s3(output_dir) else Path(output_dir)
    return folder / f"{name}.spec.yaml"


class DPOPipeline:
    """SFT then DPO per topic with the model config's zone plan, on Ray (pytorch) or MLX."""

    def __init__(self, model_config: ModelConfig, config: PipelineConfig | None = None) -> None:
        self.model_config, self.config = model_config, config or PipelineConfig()

    def spec_dict(self, topics: list[str], data_dir: str, output_dir: str, name: str) -> dict:
        c, plan = self.config, self.model_config.plan
        mode = "nf4" if c.quantization in ("int4", "nf4") else ("fp32" if c.backend_dtype == "float32" else "bf16")
        profile = c.hardware_profile or ("mac-studio-m2-ultra-64gb" if c.backend_type == "mlx" else "cpu-2")
        spec = {
            "name": name,
            "model": {"name": self.model_config.name, "path": c.model_path or self.model_config.hf_path},
            "lora": {
                "strategy": plan.strategy,
                "rank": plan.rank,
                "alpha": plan.alpha,
                "dropout": plan.dropout,
                "zones": [
                    {
                        "name": z.name,
                        "layers": [z.first, z.last],
                        "modules": list(z.modules),
                        "rank": z.rank,
                        "alpha": z.alpha,
                        "dropout": z.dropout,
                    }
                    for z in plan.zones
                ],
            },
            "quantization": {"mode": mode},
            "sft": {
                "learning_rate": c.sft_learning_rate,
                "batch_size": c.sft_batch_size,
                "epochs_per_topic": c.sft_epochs,
                "max_seq_length": c.max_seq_length,
            },
            "dpo": {
                "learning_rate": c.dpo_learning_rate,
                "batch_size": c.dpo_batch_size,
                "steps_per_topic": c.dpo_steps,
                "max_seq_length": c.max_seq_length,
            },
            "curriculum": {"data_dir": data_dir, "topics": list(topics)},
            "hardware": {"profile": profile},
            "storage": {"path": output_dir},
        }
        for section, values in c.extra.items():
            spec.setdefault(section, {}).update(values) if isinstance(values, dict) else spec.update({section: values})
        return spec

    def train_topics(self, topics: list[str], data_dir: str, output_dir: str, name: str | None = None) -> dict:
        """Train the topics in order; returns the run's summary.json as a dict."""
        import yaml

        name = check_run_name(name or f"{self.model_config.name}-pipeline", "name")
        spec_path = spec_file(output_dir, name)
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(yaml.safe_dump(self.spec_dict(topics, data_dir, output_dir, name), sort_keys=False))
        run = load_run(spec_path)
        if self.config.backend_type == "mlx":
            from local_mlx.training import train_run

            folder = train_run(run)
        else:
            from mindprint_ray.backends.ray_torch.driver import train

            folder = train(run, progress=False)
        return folder.summary()
