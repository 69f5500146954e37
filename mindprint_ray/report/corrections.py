"""Seed-versus-computed: each figure of the seed guide beside what the registry, memory model and prices say."""

from __future__ import annotations

from mindprint_ray.planning.hardware import load_prices
from mindprint_ray.planning.memory import GB, NF4_BYTES_PER_PARAM, base_weight_bytes
from mindprint_ray.planning.plan_summary import SEED_ADAPTER_MB, adapter_size_mb
from mindprint_ray.planning.registry import get_arch
from mindprint_ray.planning.zones import build_plan
from mindprint_ray.report import seed
from mindprint_ray.report.numbers import duration, usd


def _option(options: list[dict], name: str) -> dict | None:
    return next((o for o in options if o["profile"] == name), None)


def _hours(o: dict) -> str:
    t = o["time"]
    sft = sum(r["sft"]["hours"] for r in t["topics"]) / max(len(t["topics"]), 1)
    dpo = sum(r.get("dpo", {}).get("hours", 0.0) for r in t["topics"]) / max(len(t["topics"]), 1)
    return f"SFT {duration(sft)} + DPO {duration(dpo)} (this curriculum)"


def corrections(options: list[dict], prices_path: str | None = None) -> list[dict]:
    """Rows of {item, seed, computed, note}."""
    arch = get_arch("qwen2.5-72b")
    plan = build_plan(arch, "conservative")  # the seed's r=8, alpha=16, dropout 0.05
    size = adapter_size_mb(plan.trainable_params())
    prices = load_prices(prices_path)
    rows = [
        {
            "item": "Qwen2.5-72B base weights, 4-bit",
            "seed": f"{seed.SEED_BASE_INT4_GB} GB",
            "computed": f"{base_weight_bytes(arch, 'nf4') / GB:.1f} GB (NF4) / "
            f"{base_weight_bytes(arch, 'nf4', 'mlx') / GB:.1f} GB (MLX 4-bit)",
            "note": f"4 bits x all params is {arch.total_params() / 2 / GB:.1f} GB; the seed leaves out that "
            "embeddings and "
            f"lm_head stay 16-bit ({arch.embedding_params() * 2 / GB:.1f} GB) and the quantization states "
            f"({arch.linear_params() * (NF4_BYTES_PER_PARAM - 0.5) / GB:.1f} GB)",
        },
        {
            "item": "Qwen2.5-72B base weights, BF16",
            "seed": "145 GB",
            "computed": f"{base_weight_bytes(arch, 'bf16') / GB:.1f} GB",
            "note": "agrees",
        },
        {
            "item": "trainable params, conservative r=8",
            "seed": seed.SEED_TRAINABLE,
            "computed": f"{plan.trainable_params():,}",
            "note": "counted per zone module (matches PEFT)",
        },
        {
            "item": "adapter size, bf16",
            "seed": f"{SEED_ADAPTER_MB} MB",
            "computed": f"{size['bf16_mb']:.1f} MB (fp32: {size['fp32_mb']:.1f} MB)",
            "note": "the seed's figure is neither bf16 nor fp32",
        },
    ]
    p5 = prices.get("aws-p5.48xlarge")
    if p5:
        rows.append(
            {
                "item": "8xH100 price",
                "seed": f"~${seed.SEED_8XH100_PRICE}/h",
                "computed": f"${p5.on_demand:.2f}/h on-demand, ${p5.spot:.2f}/h spot ({p5.date})",
                "note": f"${p5.previous_list_price}/h was the {p5.previous_list_note}"
                if p5.previous_list_price
                else p5.source,
            }
        )
    a100 = prices.get("a100-80gb-x4")
    if a100:
        rows.append(
            {
                "item": "4xA100 price",
                "seed": f"~${seed.SEED_4XA100_PRICE}/h",
                "computed": f"${a100.on_demand:.2f}/h on-demand ({a100.date})",
                "note": a100.source,
            }
        )
    rows += _run_rows(options)
    return rows


def _run_rows(options: list[dict]) -> list[dict]:
    rows = []
    mac = _option(options, "mac-studio-m2-ultra-64gb")
    if mac:
        m = mac["memory"]
        rows.append(
            {
                "item": "Mac Studio memory budget",
                "seed": f"{seed.SEED_MAC_TOTAL_GB} GB of {seed.SEED_MAC_USABLE_GB} GB",
                "computed": f"SFT {m['sft']['total']:.1f} GB"
                + (f", DPO {m['dpo']['total']:.1f} GB" if "dpo" in m else "")
                + f" of {m['capacity_gb']:.0f} GB",
                "note": "at this spec's sequence lengths; "
                + ("fits" if m["fits"] else "does not fit: see the remedies"),
            }
        )
    for name, cost in (("8xh100-80gb", seed.SEED_8XH100_COST), ("4xa100-80gb", seed.SEED_4XA100_COST)):
        o = _option(options, name)
        if o:
            rows.append(
                {
                    "item": f"{name} curriculum cost",
                    "seed": cost,
                    "computed": f"{usd(o['time']['cost_on_demand_usd'])} on-demand",
                    "note": f"{len(o['time']['topics'])} topics of this curriculum, MFU {o['time']['mfu']['sft']:.2g}"
                    f" ({o['time']['mfu']['source']})",
                }
            )
    for name, claim in seed.SEED_HOURS.items():
        o = _option(options, name)
        if o:
            rows.append(
                {
                    "item": f"{name} hours per topic",
                    "seed": claim,
                    "computed": _hours(o),
                    "note": "scales with the tokens per topic: see the time section",
                }
            )
    return rows
