"""The results part of a training report: loss curves per topic and stage, DPO reward curves, and the
generated answers before and after training, from a run folder's metrics.jsonl and summary.json."""

from __future__ import annotations

from pathlib import Path

from mindprint_ray.evaluation.gates import STAGES
from mindprint_ray.report.charts import _plt, _save


def stage_curves(metrics: list[dict], stage: str, key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per topic, (steps, values) of one logged metric in one stage; later restarts overwrite earlier steps."""
    curves: dict[str, dict[int, float]] = {}
    for r in metrics:
        if r.get("stage") == stage and "step" in r and isinstance(r.get(key), (int, float)):
            curves.setdefault(r["topic"], {})[int(r["step"])] = float(r[key])
    return {t: (sorted(c), [c[s] for s in sorted(c)]) for t, c in curves.items()}


def curves_chart(metrics: list[dict], panels: list[tuple[str, str, str]], path: Path) -> Path | None:
    """One panel per (stage, metric key, title), one line per topic; None when nothing was logged."""
    data = [(title, stage_curves(metrics, stage, key)) for stage, key, title in panels]
    if not any(curves for _, curves in data):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6))
    for ax, (title, curves) in zip(list(axes) if len(panels) > 1 else [axes], data):
        for topic, (steps, values) in curves.items():
            ax.plot(steps, values, marker=".", label=topic)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=8)
    return _save(fig, path)


def loss_chart(metrics: list[dict], path: Path) -> Path | None:
    return curves_chart(metrics, [("sft", "loss", "SFT loss (assistant tokens)"), ("dpo", "loss", "DPO loss")], path)


def reward_chart(metrics: list[dict], path: Path) -> Path | None:
    return curves_chart(
        metrics,
        [
            ("dpo", "rewards/accuracies", "DPO reward accuracy (training batches)"),
            ("dpo", "rewards/margins", "DPO reward margin (chosen - rejected)"),
        ],
        path,
    )


def sample_rows(summary: dict) -> list[list[str]]:
    """(topic, question, stage, answer) for the answer each topic's evaluation kept at each stage."""
    rows = []
    for topic in summary.get("topics_order") or list(summary.get("topics", {})):
        evals = summary.get("topics", {}).get(topic, {}).get("eval", {})
        for stage in STAGES:
            sample = evals.get(stage, {}).get("sample")
            if sample:
                rows.append([topic, sample["question"], stage.replace("_", " "), sample["answer"]])
    return rows
