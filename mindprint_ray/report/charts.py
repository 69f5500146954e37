"""The report's charts as PNG files (matplotlib, Agg backend; imported only when a report is written)."""

from __future__ import annotations

from pathlib import Path

from mindprint_ray.report.numbers import duration, usd

TERMS = ("base_weights", "lora_weights", "gradients", "optimizer", "activations", "overhead")
COLORS = {
    "base_weights": "#4c72b0",
    "lora_weights": "#dd8452",
    "gradients": "#c44e52",
    "optimizer": "#8172b3",
    "activations": "#55a868",
    "overhead": "#937860",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(o: dict) -> str:
    quant = "MLX 4-bit" if o["backend"] == "mlx" and o["quant"] == "nf4" else o["quant"]
    zero = f", ZeRO-{o['zero']}" if o["zero"] and o["devices"] > 1 and o["backend"] == "ray" else ""
    return f"{o['profile']}\n{o['devices']}x, {quant}{zero}"


def memory_chart(options: list[dict], path: Path) -> Path:
    """Stacked per-device peak memory by term for each option, with its capacity as a dashed line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(7.0, 1.9 * len(options) + 2.5), 5.2))
    xs = range(len(options))
    bottoms = [0.0] * len(options)
    for term in TERMS:
        values = [o["memory"]["peak"][term] for o in options]
        ax.bar(xs, values, 0.55, bottom=bottoms, color=COLORS[term], label=term.replace("_", " "))
        bottoms = [b + v for b, v in zip(bottoms, values)]
    top = max(max(bottoms), max(o["memory"]["capacity_gb"] for o in options))
    for x, o, total in zip(xs, options, bottoms):
        cap = o["memory"]["capacity_gb"]
        ax.hlines(cap, x - 0.38, x + 0.38, colors="black", linestyles="dashed", linewidth=1.6)
        ax.text(x + 0.40, cap, f"{cap:.0f}", va="center", fontsize=8)
        verdict, color = ("fits", "#2a7d2a") if o["memory"]["fits"] else ("does not fit", "#b00020")
        ax.text(
            x,
            total + top * 0.015,
            f"{total:.1f} GB\n{o['memory']['phase'].upper()} - {verdict}",
            ha="center",
            va="bottom",
            fontsize=8.5,
            color=color,
        )
    ax.plot([], [], "k--", label="capacity per device")
    ax.set_xticks(list(xs), [_label(o) for o in options], fontsize=8.5)
    ax.set_ylim(0, top * 1.22)
    ax.set_ylabel("GB per device (peak phase)")
    ax.set_title("Memory budget per device vs capacity")
    ax.legend(fontsize=8, loc="upper left", ncol=4)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def hours_chart(options: list[dict], path: Path) -> Path:
    """Mean hours per topic per option (log scale), labelled with the SFT/DPO split and the curriculum total."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.5, 0.75 * len(options) + 1.8))
    ys = list(range(len(options)))[::-1]
    n = [len(o["time"]["topics"]) for o in options]
    sft = [sum(r["sft"]["hours"] for r in o["time"]["topics"]) / k for o, k in zip(options, n)]
    dpo = [sum(r.get("dpo", {}).get("hours", 0.0) for r in o["time"]["topics"]) / k for o, k in zip(options, n)]
    totals = [s + d for s, d in zip(sft, dpo)]
    ax.barh(ys, totals, 0.6, color="#4c72b0")
    for y, o, s, d in zip(ys, options, sft, dpo):
        label = f"{duration(s + d)}/topic (SFT {duration(s)} + DPO {duration(d)})"
        ax.text(
            (s + d) * 1.1,
            y,
            f"{label}; curriculum {duration(o['time']['curriculum_hours'])}",
            va="center",
            fontsize=8.5,
        )
    ax.set_xscale("log")
    ax.set_xlim(min(totals) / 3, max(totals) * 60)
    ax.set_yticks(ys, [o["profile"] for o in options], fontsize=9)
    ax.set_xlabel("hours per topic, SFT + DPO (log scale)")
    ax.set_title("Training time per topic (estimate)")
    ax.grid(axis="x", alpha=0.3, which="major")
    return _save(fig, path)


def cost_chart(options: list[dict], path: Path) -> Path:
    """Whole-curriculum dollars per option: on-demand and spot (and the old list price where one exists)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.8 * len(options) + 1.8))
    ys = list(range(len(options)))[::-1]
    h = 0.26
    series = [
        ("on-demand", "cost_on_demand_usd", "#4c72b0", 0),
        ("spot", "cost_spot_usd", "#55a868", -h),
        ("previous list price", "cost_previous_list_usd", "#c44e52", h),
    ]
    top = max(max(o["time"].get(k, 0) or 0 for _, k, _, _ in series) for o in options) or 1.0
    for name, key, color, dy in series:
        vals = [o["time"].get(key) for o in options]
        if not any(vals):
            continue
        ax.barh([y + dy for y in ys], [v or 0 for v in vals], h, color=color, label=name)
        for y, v in zip(ys, vals):
            if v:
                ax.text(v + top * 0.01, y + dy, usd(v), va="center", fontsize=8)
    for y, o in zip(ys, options):
        if not o["time"]["cost_on_demand_usd"]:
            ax.text(top * 0.01, y, "owned hardware: no hourly price", va="center", fontsize=8, color="#555")
    ax.set_xlim(0, top * 1.25)
    ax.set_yticks(ys, [o["profile"] for o in options], fontsize=9)
    ax.set_xlabel("USD for the whole curriculum (training compute)")
    ax.set_title("Curriculum cost per hardware option")
    if ax.get_legend_handles_labels()[1]:  # no bars when every option is owned hardware
        ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def topics_chart(option: dict, path: Path) -> Path:
    """Hours per topic (SFT and DPO) for one option."""
    plt = _plt()
    topics = option["time"]["topics"]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(topics) + 1.6))
    ys = list(range(len(topics)))[::-1]
    unit, scale = ("minutes", 60.0) if option["time"]["hours_per_topic"] < 1 else ("hours", 1.0)
    sft = [r["sft"]["hours"] * scale for r in topics]
    dpo = [r.get("dpo", {}).get("hours", 0.0) * scale for r in topics]
    ax.barh(ys, sft, 0.6, color="#4c72b0", label="SFT")
    ax.barh(ys, dpo, 0.6, left=sft, color="#dd8452", label="DPO")
    for y, r, s, d in zip(ys, topics, sft, dpo):
        ax.text(s + d, y, f" {s + d:.2f} {unit}, {usd(r['cost_usd'])}", va="center", fontsize=8)
    ax.set_xlim(0, max(s + d for s, d in zip(sft, dpo)) * 1.3)
    ax.set_yticks(ys, [r["topic"] for r in topics], fontsize=9)
    ax.set_xlabel(unit)
    ax.set_title(f"Time and cost per topic - {option['profile']}")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
