"""Everything the report shows, as plain data: one entry per hardware option, the model comparison, corrections."""

from __future__ import annotations

from mindprint_ray.errors import UserError
from mindprint_ray.planning.costs import time_cost
from mindprint_ray.planning.estimates import memory_for_run, peak_memory, remedies
from mindprint_ray.planning.hardware import load_profiles
from mindprint_ray.planning.memory import GB, base_weight_bytes
from mindprint_ray.planning.registry import get_arch
from mindprint_ray.planning.run_plan import RunPlan, build_run
from mindprint_ray.planning.step_budget import step_budget
from mindprint_ray.planning.topic_tokens import count_topic_tokens

MAC = "mac-studio-m2-ultra-64gb"
COMPARED_MODELS = ("gemma-3-12b", "qwen2.5-7b", "qwen2.5-72b")


def option_names(run: RunPlan, which: str, prices_path: str | None) -> list[str]:
    """`all`: every GPU and Mac profile (CPU ones only when the spec itself runs on a CPU); else the one named."""
    profiles = load_profiles(prices_path)
    if which == "all":
        names = [n for n, p in profiles.items() if p.is_gpu or n == run.profile.name]
        return sorted(names, key=lambda n: n != run.profile.name)
    if which not in profiles:
        raise UserError(
            f"unknown hardware profile '{which}'",
            field="--hardware",
            hint=f"use 'all' or one of: {', '.join(profiles)}",
        )
    return [which]


def respec(run: RunPlan, prices_path: str | None = None, **changes) -> RunPlan:
    """The same run with another profile, model or quantization (zones re-derived from the strategy)."""
    spec = run.spec.model_copy(deep=True)
    if "profile" in changes and changes["profile"] != spec.hardware.profile:
        spec.hardware.profile, spec.hardware.num_workers = changes["profile"], None
    if "model" in changes and changes["model"] != run.arch.name:
        spec.model.name, spec.model.path, spec.lora.zones = changes["model"], None, None
    if "quant" in changes:
        spec.quantization.mode = changes["quant"]
    return build_run(spec, prices_path)


def memory_entry(run: RunPlan) -> dict:
    phase, budget = peak_memory(run)
    out = {
        "phase": phase,
        "peak": budget.as_dict(),
        "sft": memory_for_run(run, "sft").as_dict(),
        "capacity_gb": run.profile.capacity_gb,
        "fits": budget.total <= run.profile.capacity_gb,
    }
    if run.spec.dpo.enabled:
        out["dpo"] = memory_for_run(run, "dpo").as_dict()
    if not out["fits"]:
        out["remedies"] = remedies(run)
    return out


def option_entry(run: RunPlan, tokens, how: str, price_override: float | None) -> dict:
    p = run.profile
    return {
        "profile": p.name,
        "description": p.description,
        "devices": run.num_workers,
        "backend": p.backend,
        "quant": run.quant,
        "zero": run.deepspeed_stage,
        "memory": memory_entry(run),
        "time": time_cost(run, tokens, how, price_override),
        "step_budget": step_budget(run, tokens).as_dict(),
    }


def gather_options(run: RunPlan, which: str, prices_path: str | None, price_override: float | None) -> list[dict]:
    """Memory, hours and dollars for each hardware option (the price override applies to the first one)."""
    tokens, how = count_topic_tokens(run)
    out = []
    for i, name in enumerate(option_names(run, which, prices_path)):
        other = respec(run, prices_path, profile=name)
        out.append(option_entry(other, tokens, how, price_override if i == 0 else None))
    return out


def model_row(run: RunPlan, name: str, prices_path: str | None) -> dict:
    """One row of the seed's model comparison, computed from the registry and the time model."""
    arch = get_arch(name)
    mac_int4 = respec(run, prices_path, profile=MAC, model=name, quant="nf4")
    mac_bf16 = respec(mac_int4, prices_path, quant="bf16")
    tokens, how = count_topic_tokens(mac_int4)
    mac_time = time_cost(mac_int4, tokens, how)
    primary = respec(run, prices_path, model=name)
    return {
        "model": name,
        "params": arch.total_params(),
        "layers": arch.num_layers,
        "nf4_gb": base_weight_bytes(arch, "nf4") / GB,
        "mlx4_gb": base_weight_bytes(arch, "nf4", "mlx") / GB,
        "bf16_gb": base_weight_bytes(arch, "bf16") / GB,
        "context": arch.max_position_embeddings,
        "mac_int4_peak_gb": peak_memory(mac_int4)[1].total,
        "mac_bf16_peak_gb": peak_memory(mac_bf16)[1].total,
        "mac_capacity_gb": mac_int4.profile.capacity_gb,
        "mac_hours_per_topic": mac_time["hours_per_topic"],
        "primary_profile": primary.profile.name,
        "primary_hours_per_topic": time_cost(primary, tokens, how)["hours_per_topic"],
    }


def gather_models(run: RunPlan, prices_path: str | None) -> list[dict]:
    return [model_row(run, name, prices_path) for name in COMPARED_MODELS]
