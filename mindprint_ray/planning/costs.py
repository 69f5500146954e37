"""Hours and dollars per topic and for the curriculum: the time model priced with the profile's price."""

from __future__ import annotations

from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.planning.time_model import Mfu, peak_flops, resolve_mfu, topic_times
from mindprint_ray.planning.topic_tokens import TopicTokens

EXCLUDES = "training compute only: model download and load, evaluation and checkpoint uploads are not included"


def hourly_price(run: RunPlan, override: float | None = None) -> dict:
    """The profile's $/h in use (CLI override > spec hardware.price_per_hour, both per node-hour and times the
    profile's nodes > price file), with both list prices."""
    p, hw = run.profile.price, run.spec.hardware
    own_profile = hw.profile == run.profile.name
    nodes = run.profile.nodes  # the price file's figures are the profile's (all nodes); a user's price is per node
    per_node = f" x {nodes} nodes" if nodes > 1 else ""
    if override is not None:
        used, basis = override * nodes, f"--price-per-hour{per_node}"
    elif own_profile and hw.price_per_hour is not None:
        used, basis = hw.price_per_hour * nodes, f"hardware.price_per_hour in the spec{per_node}"
    elif own_profile and hw.spot:
        used, basis = p.spot, "spot (hardware.spot)"
    else:
        used, basis = p.on_demand, "on-demand"
    return {
        "per_hour": used,
        "basis": basis,
        "on_demand": p.on_demand,
        "spot": p.spot,
        "key": p.key,
        "source": p.source,
        "date": p.date,
        "spot_source": p.spot_source,
        "previous_list_price": p.previous_list_price,
        "previous_list_note": p.previous_list_note,
    }


def _stage(t, name: str) -> dict:
    return {"tokens": round(t.tokens), "hours": t.seconds / 3600, "flops": t.flops}


def time_cost(
    run: RunPlan, tokens: list[TopicTokens], how: str, price_override: float | None = None, mfu: Mfu | None = None
) -> dict:
    """Per-topic and whole-curriculum hours and dollars for one hardware option."""
    mfu = mfu or resolve_mfu(run)
    price = hourly_price(run, price_override)
    topics = []
    for t in topic_times(run, tokens, mfu):
        row = {"topic": t.topic, "sft": _stage(t.sft, "sft"), "hours": t.hours, "cost_usd": t.hours * price["per_hour"]}
        if t.dpo:
            row["dpo"] = _stage(t.dpo, "dpo")
        topics.append(row)
    hours = sum(r["hours"] for r in topics)
    flops_per_s = peak_flops(run)
    out = {
        "token_count": how,
        "mfu": {"sft": mfu.sft, "dpo": mfu.dpo, "source": mfu.source, "note": mfu.note},
        "peak_tflops": flops_per_s / 1e12,
        "effective_tflops": {"sft": flops_per_s * mfu.sft / 1e12, "dpo": flops_per_s * mfu.dpo / 1e12},
        "topics": topics,
        "hours_per_topic": hours / max(len(topics), 1),
        "curriculum_hours": hours,
        "price": price,
        "cost_usd": hours * price["per_hour"],
        "cost_on_demand_usd": hours * price["on_demand"],
        "cost_spot_usd": hours * price["spot"],
        "excludes": EXCLUDES,
    }
    if price["previous_list_price"]:
        out["cost_previous_list_usd"] = hours * price["previous_list_price"]
    return out
