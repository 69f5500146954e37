"""The plan as data: zones, parameter counts, adapter size, memory per device, time, cost and the step budget."""

from __future__ import annotations

from mindprint_ray.errors import UserError
from mindprint_ray.planning.costs import time_cost
from mindprint_ray.planning.elastic import elastic_plan
from mindprint_ray.planning.estimates import memory_for_run, peak_memory, remedies
from mindprint_ray.planning.memory import TERMS
from mindprint_ray.planning.multinode import shared_storage_problem
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.planning.step_budget import step_budget
from mindprint_ray.planning.topic_tokens import count_topic_tokens

SEED_ADAPTER_MB = 164  # the seed's "~164MB per adapter (BF16)"
MB = 1e6


def adapter_size_mb(trainable_params: int) -> dict[str, float]:
    """A topic adapter's size in decimal MB: 2 bytes per trainable parameter in bf16, 4 in fp32."""
    return {"bf16_mb": round(trainable_params * 2 / MB, 1), "fp32_mb": round(trainable_params * 4 / MB, 1)}


def time_and_budget(run: RunPlan, price_override: float | None = None) -> tuple[dict, dict]:
    """Hours and dollars, and the step budget, from one token count; or why not (the curriculum is needed)."""
    try:
        tokens, how = count_topic_tokens(run)
    except UserError as e:
        return {"error": str(e)}, {"error": str(e)}
    return time_cost(run, tokens, how, price_override), step_budget(run, tokens).as_dict()


def plan_summary(run: RunPlan, price_override: float | None = None) -> dict:
    arch, zones, profile = run.arch, run.zones, run.profile
    trainable = zones.trainable_params()
    phase, budget = peak_memory(run)
    summary = {
        "run": run.spec.name,
        "model": {
            "name": arch.name,
            "path": run.model_path,
            "total_params": arch.total_params(),
            "non_embedding_params": arch.non_embedding_params(),
            "layers": arch.num_layers,
            "hidden_size": arch.hidden_size,
            "vocab_size": arch.vocab_size,
        },
        "lora": {
            "strategy": zones.strategy,
            "rank": zones.rank,
            "alpha": zones.alpha,
            "dropout": zones.dropout,
            "use_rslora": zones.use_rslora,
            "trainable_params": trainable,
            "trainable_percent": round(100 * trainable / arch.total_params(), 4),
            "zones": [
                {
                    "name": z.name,
                    "layers": [z.first, z.last],
                    "num_layers": len(z.layers),
                    "modules": list(z.modules),
                    "rank": z.rank,
                    "alpha": z.alpha,
                    "dropout": z.dropout,
                    "params": z.params(arch),
                }
                for z in zones.zones
            ],
        },
        "adapter": {**adapter_size_mb(trainable), "seed_claim_mb": SEED_ADAPTER_MB},
        "quantization": run.quant,
        "hardware": {
            "profile": profile.name,
            "description": profile.description,
            "devices": run.num_workers,
            "backend": profile.backend,
            "deepspeed_stage": run.deepspeed_stage,
        },
        "memory": {
            "phase": phase,
            "per_device_gb": budget.as_dict(),
            "capacity_gb": round(profile.capacity_gb, 2),
            "fits": budget.total <= profile.capacity_gb,
            "sft_per_device_gb": memory_for_run(run, "sft").as_dict(),
            "terms": TERMS,
        },
    }
    if run.spec.dpo.enabled:
        summary["memory"]["dpo_per_device_gb"] = memory_for_run(run, "dpo").as_dict()
    if not summary["memory"]["fits"]:
        summary["memory"]["remedies"] = remedies(run)
    summary["time"], summary["step_budget"] = time_and_budget(run, price_override)
    storage = shared_storage_problem(run)  # `train` and `validate` refuse it; `plan` says so before either
    summary["warnings"] = [f"{storage.message} ({storage.hint})"] if storage else []
    elastic = elastic_plan(run)
    if elastic:
        summary["elastic"] = elastic
        inexact = [c["workers"] for c in elastic["counts"] if not (c["sft"]["exact"] and c["dpo"]["exact"])]
        if inexact:
            summary["warnings"].append(
                f"no exact batch layout on {', '.join(map(str, inexact))} worker(s): the global batch grows "
                "there (gradient accumulation rounded up); choose batch sizes that the counts divide"
            )
    return summary
