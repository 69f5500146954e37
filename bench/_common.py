"""Shared helpers of the benchmarks: quiet logs, run plans, random-weight models, worker trainer args, step timing.

Everything that shapes a training step comes from the worker's own code
(`mindprint_ray.backends.ray_torch.model_loading`, `mindprint_ray.backends.ray_torch.trainer_args.trainer_args`);
only the model's weights are random instead of loaded.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mindprint_ray.backends.ray_torch import datasets as ds
from mindprint_ray.backends.ray_torch.model_loading import apply_zone_plan, load_base_model, load_tokenizer, torch_dtype
from mindprint_ray.backends.ray_torch.precision import native_bf16
from mindprint_ray.backends.ray_torch.trainer_args import trainer_args
from mindprint_ray.curriculum.validation import validate_run
from mindprint_ray.models.tiny import ensure_tiny_model, qwen2_config
from mindprint_ray.planning.registry import ModelArch
from mindprint_ray.planning.run_plan import RunPlan, build_run, load_run, spec_zone_plan
from mindprint_ray.spec.run_spec import RunSpec


def quiet() -> None:
    """Silence progress bars and library chatter (as the Ray workers do)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    from mindprint_ray.backends.ray_torch.topic_loop import quiet_worker_logs

    quiet_worker_logs()
    import logging

    logging.getLogger("trl").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def tiny_model_dir() -> Path:
    """The project's tiny model (built from the sample curriculum on first use)."""
    return ensure_tiny_model(ROOT / "models" / "tiny", ROOT / "data" / "curriculum")


# ---- run plans ------------------------------------------------------------------------------------------------


def bench_spec(
    model: str,
    quant: str,
    *,
    attn: str = "auto",
    gc: bool = True,
    seq: int = 4096,
    batch: int = 1,
    grad_accum: int = 1,
    gpu: bool = True,
    packing: bool = True,
    profile: str = "1xh100-80gb",
    model_path: str | None = None,
    topics: tuple[str, ...] = ("bench",),
) -> RunSpec:
    """A validated run spec for one benchmark configuration (seed defaults for everything not named)."""
    return RunSpec.model_validate(
        {
            "name": "bench",
            "model": {"name": model, "path": model_path, "attn_implementation": attn},
            "quantization": {"mode": quant},
            "sft": {
                "max_seq_length": seq,
                "batch_size": batch,
                "gradient_accumulation": grad_accum,
                "gradient_checkpointing": gc,
                "bf16": gpu,
                "packing": packing,
                "warmup_steps": 0,
            },
            "dpo": {
                "max_seq_length": seq,
                "batch_size": batch,
                "gradient_accumulation": grad_accum,
                "gradient_checkpointing": gc,
            },
            "curriculum": {"data_dir": str(ROOT / "data" / "curriculum"), "topics": list(topics)},
            "hardware": {"profile": profile},
            "report_to": ["none"],
        }
    )


def run_with_arch(spec: RunSpec, arch: ModelArch | None = None) -> RunPlan:
    """`build_run(spec)`, with the architecture swapped (e.g. fewer layers) and the zone plan rebuilt for it."""
    run = build_run(spec)
    if arch is None or arch == run.arch:
        return run
    return replace(run, arch=arch, zones=spec_zone_plan(spec, arch))


# ---- random-weight models -------------------------------------------------------------------------------------


def weight_dtype(run: RunPlan):
    q = run.spec.quantization
    if q.mode == "nf4":
        return torch_dtype(q.compute_dtype)
    import torch

    return torch.bfloat16 if q.mode == "bf16" else torch.float32


def build_random_model(run: RunPlan, device: str, attn: str, seed: int = 0):
    """Qwen2ForCausalLM with random weights built on `device` layer by layer (NF4 layers quantized one at a time,
    so a bf16 copy of the whole model never exists), with the settings of the worker's `load_base_model`."""
    import torch
    from torch import nn
    from transformers import Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

    arch, q = run.arch, run.spec.quantization
    config = qwen2_config(arch, use_cache=False)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(weight_dtype(run))
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            inner = model.model
            inner.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, config.pad_token_id)
            inner.norm = Qwen2RMSNorm(arch.hidden_size, eps=config.rms_norm_eps)
            inner.rotary_emb = Qwen2RotaryEmbedding(config=config)
            for i in range(arch.num_layers):
                layer = Qwen2DecoderLayer(config, i)
                if q.mode == "nf4":
                    quantize_nf4(layer, q, device)
                inner.layers[i] = layer
            if arch.tie_embeddings:
                model.lm_head.weight = inner.embed_tokens.weight
            else:
                model.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
    finally:
        torch.set_default_dtype(previous)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:3]}")
    if q.mode == "nf4":
        mark_bnb_4bit(model, q)
    model.requires_grad_(False)
    model.set_attn_implementation(attn)
    model.config.use_cache = False  # as load_base_model: packing needs the cache off
    return model


def quantize_nf4(module, q, device: str) -> None:
    """Replace every nn.Linear of `module` by bitsandbytes Linear4bit exactly as transformers'
    `replace_with_bnb_linear` does for the worker's BitsAndBytesConfig (NF4, double quant, bf16 storage)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    compute, storage = torch_dtype(q.compute_dtype), torch_dtype(q.quant_storage)
    for name, child in list(module.named_modules()):
        if type(child) is not nn.Linear:
            continue
        with torch.device("meta"):
            new = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                child.bias is not None,
                compute,
                compress_statistics=q.double_quant,
                quant_type="nf4",
                quant_storage=storage,
            )
        new.weight = bnb.nn.Params4bit(
            child.weight.data,
            requires_grad=False,
            compress_statistics=q.double_quant,
            quant_type="nf4",
            quant_storage=storage,
            module=new,
        ).to(device)
        if child.bias is not None:
            new.bias = nn.Parameter(child.bias.data, requires_grad=False)
        new.source_cls = nn.Linear
        new.requires_grad_(False)
        module.set_submodule(name, new)


def mark_bnb_4bit(model, q) -> None:
    """The attributes transformers' bnb quantizer sets on a model it loaded in 4 bits (PEFT and Trainer read them)."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.auto import AutoHfQuantizer
    from transformers.utils.quantization_config import QuantizationMethod

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(q.quant_storage),
    )
    model.config.quantization_config = config
    model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    model.is_loaded_in_4bit = True


def worker_args(run: RunPlan, stage: str, out_dir: Path, gpu: bool) -> dict:
    """The worker's own TrainingArguments fields (`trainer_args`, as `Worker.stage_args` builds them), for a worker
    without a run folder."""
    args = trainer_args(run.spec, stage, str(out_dir / f"bench-{stage}"), gpu, None, native_bf16(gpu))
    args.update(save_strategy="no", report_to=[], logging_steps=1)
    return args


# ---- step timing ----------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    seconds: float
    real_tokens: int  # tokens of the examples (no padding)
    computed_tokens: int  # tokens the model ran on (with padding)
    doc_lengths: list[int]  # length of every sequence attention ran over (packed documents counted apart)


@dataclass
class StepLog:
    """Per-optimizer-step records of one trainer run, filled by `TimedMixin` and `StepTimer`."""

    sync: object = None
    steps: list[StepRecord] = field(default_factory=list)
    _pending: list[tuple[int, int, list[int]]] = field(default_factory=list)
    _t: float | None = None

    def now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def add_batch(self, inputs: dict) -> None:
        self._pending.append(batch_tokens(inputs))

    def close_step(self) -> None:
        t = self.now()
        real = sum(p[0] for p in self._pending)
        computed = sum(p[1] for p in self._pending)
        docs = [d for p in self._pending for d in p[2]]
        self.steps.append(StepRecord(t - self._t, real, computed, docs))
        self._pending, self._t = [], t

    def timed(self, warmup: int) -> list[StepRecord]:
        return self.steps[warmup:]


def batch_tokens(inputs: dict) -> tuple[int, int, list[int]]:
    """(real tokens, computed tokens, sequence lengths) of one collated batch: padding-free packed batches carry
    `position_ids` restarting at 0 per document; padded batches carry an attention mask."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None and "position_ids" in inputs:
        pos = inputs["position_ids"].reshape(-1).tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        docs = [b - a for a, b in zip(starts, starts[1:]) if b > a]
        return ids.numel(), ids.numel(), docs
    if mask is None:
        return ids.numel(), ids.numel(), [ids.shape[-1]] * (ids.numel() // ids.shape[-1])
    docs = [int(x) for x in mask.sum(dim=-1).reshape(-1).tolist()]
    return sum(docs), ids.numel(), docs


def timed_trainer(cls):
    """A subclass of a TRL trainer that records the tokens of every micro-batch before the real training step."""

    class Timed(cls):
        step_log: StepLog

        def __init__(self, *args, **kwargs):
            from transformers.trainer_callback import PrinterCallback

            super().__init__(*args, **kwargs)
            self.remove_callback(PrinterCallback)  # the step logs would drown the table

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.step_log.add_batch(inputs)
            return super().training_step(model, inputs, num_items_in_batch)

    Timed.__name__ = f"Timed{cls.__name__}"
    return Timed


def step_timer(log: StepLog):
    """A TrainerCallback that closes a StepLog record at every optimizer step (device synchronised)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if log._t is None:
                log._t = log.now()

        def on_step_end(self, args, state, control, **kwargs):
            log.close_step()

    return StepTimer()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of `rows` with (key, header) columns; returns the text it printed."""

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ---- the tiny model on the sample curriculum (issue-3 benches) -------------------------------------------------


def sample_topics() -> list[str]:
    """Every topic folder of the sample curriculum."""
    return sorted(p.parent.name for p in (ROOT / "data" / "curriculum").glob("*/sft.jsonl"))


def tiny_run(overrides: list[str] | None = None) -> RunPlan:
    """configs/tiny-cpu.yaml on the tiny model and every sample topic (plus `overrides`)."""
    topics = "[" + ",".join(sample_topics()) + "]"
    return load_run(
        ROOT / "configs" / "tiny-cpu.yaml",
        [
            f"model.path={tiny_model_dir()}",
            f"curriculum.data_dir={ROOT / 'data' / 'curriculum'}",
            f"curriculum.topics={topics}",
            "report_to=[none]",
            *(overrides or []),
        ],
    )


def curriculum_sft_data(run: RunPlan):
    """The SFT records of every topic (after the over-long policy) as the worker's conversational dataset."""
    topics, _, _ = validate_run(run)
    return ds.sft_dataset(
        [r for t in topics for r in t.sft],
        run.spec.curriculum.system_prompt,
        load_tokenizer(run),
        run.spec.sft.assistant_only_loss,
    )


def worker_model(run: RunPlan, device: str = "cpu"):
    """(tokenizer, zone-LoRA model) loaded exactly as the worker loads them."""
    tokenizer = load_tokenizer(run)
    base, _ = load_base_model(run, device)
    return tokenizer, apply_zone_plan(base, run, run.spec.sft.gradient_checkpointing)


def sft_trainer(
    run: RunPlan, model, tokenizer, data, packing: bool, steps: int, out_dir: Path, log: StepLog, gpu: bool = False
):
    """TRL SFTTrainer with the worker's arguments (`trainer_args` + `Worker.run_sft`'s fields), timed."""
    from trl import SFTConfig, SFTTrainer

    s = run.spec.sft
    common = worker_args(run, "sft", out_dir, gpu)
    common.update(max_steps=steps)
    # as in the worker: the assistant-only mask comes with the data (`assistant_masks`), not from TRL
    args = SFTConfig(
        **common,
        num_train_epochs=1,
        lr_scheduler_type=s.scheduler,
        weight_decay=s.weight_decay,
        packing=packing,
        assistant_only_loss=False,
    )
    trainer = timed_trainer(SFTTrainer)(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[step_timer(log)]
    )
    trainer.step_log = log
    return trainer
