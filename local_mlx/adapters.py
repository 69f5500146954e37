"""A trained model's zone LoRA weights to and from mlx-lm adapter folders (via mindprint_ray.runs.adapter_format)."""

from __future__ import annotations

from pathlib import Path

from mindprint_ray.errors import UserError
from mindprint_ray.planning.zones import ZonePlan
from mindprint_ray.runs.adapter_format import Adapter, Group, read_mlx, write_mlx

from .model import lora_modules


def zone_groups(plan: ZonePlan) -> list[Group]:
    """One group per zone, with the zone's own rank, alpha and PEFT scaling."""
    return [Group(z.rank, z.alpha, plan.scale(z), z.module_paths(plan.arch), z.name) for z in plan.zones]


def model_adapter(model, plan: ZonePlan, base_model: str | None = None) -> Adapter:
    """The model's LoRA weights at native per-zone ranks, as numpy."""
    import mlx.core as mx
    import numpy as np

    modules = lora_modules(model)
    a = {k: np.array(m.lora_a.astype(mx.float32)) for k, m in modules.items()}
    b = {k: np.array(m.lora_b.astype(mx.float32)) for k, m in modules.items()}
    dropout = max((z.dropout for z in plan.zones), default=plan.dropout)
    return Adapter(a, b, zone_groups(plan), dropout, plan.use_rslora, base_model)


def save_adapter(model, plan: ZonePlan, folder: Path, base_model: str | None = None) -> Path:
    """adapters.safetensors + adapter_config.json that `mlx_lm.load(path, adapter_path=folder)` reads."""
    return write_mlx(model_adapter(model, plan, base_model), folder)


def load_adapter(model, plan: ZonePlan, folder: Path) -> None:
    """Load a saved zone adapter back into a model that has the same zone plan applied."""
    import mlx.core as mx

    adapter = read_mlx(folder)
    modules = lora_modules(model)
    if set(adapter.modules()) != set(modules):
        raise UserError(
            f"adapter {folder} targets other modules than this run's zone plan",
            file=folder,
            hint="resume with the spec the adapter was trained with",
        )
    weights = []
    for key, module in modules.items():
        a, b = adapter.a[key], adapter.b[key]
        if a.shape != tuple(module.lora_a.shape) or b.shape != tuple(module.lora_b.shape):
            raise UserError(
                f"adapter {folder}: {key} has rank {a.shape[1]}, the plan says {module.lora_a.shape[1]}",
                file=folder,
                hint="resume with the spec the adapter was trained with",
            )
        weights += [(f"{key}.lora_a", mx.array(a)), (f"{key}.lora_b", mx.array(b))]
    model.load_weights(weights, strict=False)
    mx.eval(model.parameters())
