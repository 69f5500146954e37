"""The evaluation part of a run report: per-topic fidelity and accuracy at each stage, and a chart."""

from __future__ import annotations

from pathlib import Path

from mindprint_ray.evaluation.gates import STAGES, heldout_gains
from mindprint_ray.report.charts import _plt, _save
from mindprint_ray.report.numbers import score, with_interval


def eval_rows(summary: dict) -> list[dict]:
    """One row per trained topic and stage with voice fidelity, accuracy and the components."""
    rows = []
    order = summary.get("topics_order") or list(summary.get("topics", {}))
    for topic in order:
        evals = summary.get("topics", {}).get(topic, {}).get("eval", {})
        for stage in STAGES:
            if stage in evals:
                rows.append({"topic": topic, "stage": stage, **evals[stage]})
    return rows


def eval_chart(rows: list[dict], targets: dict[str, float], path: Path) -> Path:
    """Voice fidelity and accuracy across the curriculum, one line per stage, targets dashed."""
    plt = _plt()
    topics = list(dict.fromkeys(r["topic"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    colors = {"base": "#999999", "after_sft": "#4c72b0", "after_dpo": "#dd8452"}
    for ax, metric in zip(axes, ("voice_fidelity", "accuracy")):
        for stage in STAGES:
            points = [
                (topics.index(r["topic"]), r.get(metric))
                for r in rows
                if r["stage"] == stage and r.get(metric) is not None
            ]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", color=colors[stage], label=stage.replace("_", " "))
        ax.axhline(targets.get(metric, 0.85), color="#2a9d8f", linestyle="--", linewidth=1, label="target")
        ax.set_xticks(range(len(topics)), topics, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score (0-1)")
    axes[1].legend(fontsize=8, loc="upper right")
    return _save(fig, path)


SCORED = ("voice_fidelity", "accuracy", "markers", "lexicon", "semantic", "preference")


def eval_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the evaluation table: each score with its interval, held-out pairs, general ppl."""
    headers = ["topic", "stage", *(k.replace("_", " ") for k in SCORED), "pairs held out", "general ppl"]
    cells = [
        [
            r["topic"],
            r["stage"],
            *(with_interval(r.get(k), r.get(f"{k}_ci")) for k in SCORED),
            _heldout(r),
            with_interval(r.get("general_ppl"), r.get("general_ppl_ci"), 2),
        ]
        for r in rows
    ]
    return headers, cells


def _heldout(row: dict) -> str:
    held, train = row.get("n_pairs_heldout"), row.get("n_pairs_train")
    return "-" if held is None or train is None else f"{held} of {held + train}"


def heldout_lines(summary: dict, spec) -> list[str]:
    """Per topic: its latest stage against base on the same held-out items (paired bootstrap difference)."""
    lines = []
    for topic, g in heldout_gains(summary, spec).items():
        line = (
            f"{topic}, {g['stage'].replace('_', ' ')} vs base: voice fidelity {score(g['before'])} "
            f"-> {with_interval(g['after'], g['after_ci'])}"
        )
        if g.get("diff") is not None:
            line += (
                f"; paired difference {g['diff']:+.3f} [{g['diff_ci'][0]:+.3f}, {g['diff_ci'][1]:+.3f}] on "
                f"{g['n']['open']} open, {g['n']['mc']} MC, {g['n']['pairs']} held-out pairs"
                + (" (differs)" if g["differs"] else " (within noise)")
            )
        lines.append(line)
    return lines
