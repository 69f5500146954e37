"""The MLX model: find and load a local MLX or HF folder, quantize to 4-bit for nf4, apply the zone plan as LoRA."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mindprint_ray.errors import UserError
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.planning.zones import ZonePlan

QUANT_GROUP_SIZE = 64
QUANT_BITS = 4
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def cached_model_dir(path: str) -> Path | None:
    """The model folder when it is on this machine (a local folder or a complete Hugging Face cache entry)."""
    local = Path(path)
    if local.is_dir():
        return local if _complete(local) else None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(path, local_files_only=True, allow_patterns=WEIGHT_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):  # not cached, or not a repo id
        return None
    return folder if _complete(folder) else None


def model_dir(run: RunPlan) -> Path:
    """The model folder for training: local, cached, or downloaded from the Hugging Face Hub."""
    path = run.model_path
    found = cached_model_dir(path)
    if found:
        return found
    if Path(path).is_dir():
        raise UserError(
            f"{path} has no config.json and model*.safetensors",
            field="model.path",
            hint="point model.path at an HF or MLX model folder",
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, revision=run.spec.model.revision, allow_patterns=WEIGHT_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise UserError(
            f"cannot load model '{path}': {type(e).__name__}",
            field="model.path",
            hint="give a local folder, or a hub id reachable from this machine",
        ) from None


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("model*.safetensors"))


def load_base(folder: Path, quant: str):
    """(model, tokenizer, config): quantized to MLX 4-bit (group 64) for nf4, cast to bf16/fp32 otherwise."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    model, config = load_model(folder)
    prequantized = "quantization" in config
    if quant == "nf4" and not prequantized:
        quantize(model)
    elif quant in ("bf16", "fp32"):
        if prequantized:
            raise UserError(
                f"{folder} is already quantized, so it cannot train in {quant}",
                field="quantization.mode",
                hint="set quantization.mode: nf4, or use the 16-bit model",
            )
        model.set_dtype(mx.bfloat16 if quant == "bf16" else mx.float32)
    tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
    if "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.add_eos_token("<|im_end|>")
    return model, tokenizer, config


def quantize(model) -> None:
    """mlx-lm's QLoRA base: affine 4-bit, group 64, on every linear and embedding layer whose width allows it."""
    import mlx.nn as nn

    def eligible(_path: str, module) -> bool:
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % QUANT_GROUP_SIZE == 0

    nn.quantize(model, group_size=QUANT_GROUP_SIZE, bits=QUANT_BITS, class_predicate=eligible)


def apply_zones(model, plan: ZonePlan) -> None:
    """Freeze the base, then give each zone its own LoRA modules (full module paths), rank and scale."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    for config in plan.mlx_configs():
        linear_to_lora_layers(model, -1, config)
    missing = sorted(set(plan.module_paths()) - set(lora_modules(model)))
    if missing:
        raise UserError(
            f"the model has no module '{missing[0]}' ({len(missing)} zone modules missing)",
            field="lora.zones",
            hint="the model folder does not match model.name's architecture",
        )


def set_checkpointing(model, enabled: bool) -> None:
    """Layer checkpointing on or off for the model's transformer blocks. mlx-lm's `grad_checkpoint` patches the
    block class's __call__; the original is kept so that a later stage can switch it off again. Each stage calls
    this with its own section's setting (RunSpec.stage), as the Ray path does."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    layers = getattr(model, "layers", None)
    if not layers:  # not a transformer stack (a bare module): nothing to checkpoint
        if enabled:
            raise ValueError("layer checkpointing needs a model with transformer layers")
        return
    block = type(layers[0])
    plain = block.__dict__.get("_mindprint_plain_call")
    if enabled and plain is None:
        block._mindprint_plain_call = block.__call__
        grad_checkpoint(layers[0])
    elif not enabled and plain is not None:
        block.__call__ = plain
        del block._mindprint_plain_call


def is_checkpointing(model) -> bool:
    """Whether set_checkpointing has layer checkpointing on for this model's blocks."""
    layers = getattr(model, "layers", None)
    return bool(layers) and "_mindprint_plain_call" in type(layers[0]).__dict__


def lora_modules(model) -> dict:
    """Module path -> LoRALinear."""
    from mlx_lm.tuner.lora import LoRALinear

    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """Every LoRA module's scale set to 0 (the base model's outputs), restored afterwards."""
    modules = list(lora_modules(model).values())
    scales = [m.scale for m in modules]
    for m in modules:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, s in zip(modules, scales):
            m.scale = s


def load_for_training(run: RunPlan, folder: Path | None = None):
    """(model, tokenizer) with the run's quantization and zone plan applied."""
    folder = folder or model_dir(run)
    model, tokenizer, _ = load_base(folder, run.quant)
    apply_zones(model, run.zones)  # gradient checkpointing is per stage (stage.run_stage -> set_checkpointing)
    return model, tokenizer
