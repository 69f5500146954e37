"""Eval gates: per-topic targets, regressions of earlier topics, warn or stop, and the final statement.

summary.json layout read here: topics.<topic>.eval.<stage>.<metric>, stages `base`, `after_sft`,
`after_dpo` for the topic's own eval set; an earlier topic re-evaluated during topic T's stage S is stored
under that earlier topic as stage `S@T` (see `summary_entries`). Pure Python."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mindprint_ray.evaluation.metrics import compare_stages, stability

STAGES = ("base", "after_sft", "after_dpo")  # the topic's own evaluations, in order (summary.json eval.<stage>)
GATED = ("voice_fidelity", "accuracy")
EXCELLENT = 0.90


@dataclass
class GateResult:
    """What the gate found after a topic: one message per miss or regression, and whether to stop."""

    messages: list[str] = field(default_factory=list)
    stop: bool = False
    misses: list[dict] = field(default_factory=list)


def targets(spec) -> dict[str, float]:
    """The spec's targets per gated metric."""
    return {"voice_fidelity": spec.eval.voice_fidelity_target, "accuracy": spec.eval.accuracy_target}


def recheck_key(stage: str, topic: str) -> str:
    """Stage key for an earlier topic re-evaluated during `topic`'s `stage`, e.g. `after_dpo@accumulation`."""
    return f"{stage}@{topic}"


def summary_entries(results: dict[str, dict], topic: str, stage: str) -> dict[str, dict]:
    """Per evaluated topic, the fields to merge into summary.json (RunFolder.update_topic(t, **fields))."""
    return {t: {"eval": {stage if t == topic else recheck_key(stage, topic): scores}} for t, scores in results.items()}


def latest_stage(evals: dict) -> str | None:
    """The topic's last trained stage with results: after_dpo, else after_sft."""
    return next((s for s in reversed(STAGES[1:]) if s in evals), None)


def _earlier(summary: dict, spec, topic: str) -> list[str]:
    order = list(spec.curriculum.topics)
    if topic not in order:
        order = list(summary.get("topics", {}))
    return order[: order.index(topic)] if topic in order else []


def _target_misses(topic: str, stage: str, scores: dict, goal: dict[str, float]) -> list[dict]:
    return [
        {"kind": "miss", "topic": topic, "stage": stage, "metric": k, "value": scores[k], "target": goal[k]}
        for k in GATED
        if scores.get(k) is not None and scores[k] < goal[k]
    ]


def _general_misses(topic: str, stage: str, evals: dict, increase: float | None) -> list[dict]:
    """The general-ability guard: the stage's general-text perplexity above base x (1 + increase)."""
    base, now = evals.get("base", {}).get("general_ppl"), evals.get(stage, {}).get("general_ppl")
    if increase is None or base is None or now is None or now <= base * (1 + increase):
        return []
    return [
        {
            "kind": "general",
            "topic": topic,
            "stage": stage,
            "metric": "general_ppl",
            "value": now,
            "base": base,
            "limit": base * (1 + increase),
            "increase": increase,
        }
    ]


def _regressions(summary: dict, spec, topic: str, stage: str) -> list[dict]:
    out = []
    for t in _earlier(summary, spec, topic):
        evals = summary.get("topics", {}).get(t, {}).get("eval", {})
        own, now = evals.get(latest_stage(evals) or "", {}), evals.get(recheck_key(stage, topic), {})
        for k in GATED:
            if own.get(k) is not None and now.get(k) is not None and own[k] - now[k] > spec.eval.regression_margin:
                out.append(
                    {
                        "kind": "regression",
                        "topic": t,
                        "after": topic,
                        "stage": stage,
                        "metric": k,
                        "before": own[k],
                        "value": now[k],
                        "margin": spec.eval.regression_margin,
                    }
                )
    return out


def _message(miss: dict) -> str:
    name = miss["metric"].replace("_", " ")
    if miss["kind"] == "general":
        return (
            f"topic '{miss['topic']}' {miss['stage']}: general-text perplexity {miss['value']:.2f} is above "
            f"base {miss['base']:.2f} x {1 + miss['increase']:.2f} = {miss['limit']:.2f}: the adapter may be "
            f"damaging general ability (eval.max_general_ppl_increase)"
        )
    if miss["kind"] == "miss":
        return (
            f"topic '{miss['topic']}' {miss['stage']}: {name} {miss['value']:.3f} is below the target "
            f"{miss['target']:.2f}"
        )
    return (
        f"topic '{miss['topic']}' regressed after '{miss['after']}' ({miss['stage']}): {name} "
        f"{miss['before']:.3f} -> {miss['value']:.3f}, a drop above the margin {miss['margin']:.2f}"
    )


def check_gates(summary: dict, spec, topic: str) -> GateResult:
    """Misses of the targets by `topic` (its latest stage) and regressions of earlier topics; stop per on_miss."""
    evals = summary.get("topics", {}).get(topic, {}).get("eval", {})
    stage = latest_stage(evals)
    if stage is None:
        return GateResult()
    misses = (
        _target_misses(topic, stage, evals[stage], targets(spec))
        + _general_misses(topic, stage, evals, spec.eval.max_general_ppl_increase)
        + _regressions(summary, spec, topic, stage)
    )
    stop = bool(misses) and spec.eval.on_miss == "stop"
    messages = [_message(x) for x in misses]
    if stop:
        messages.append("eval.on_miss is 'stop': training stops here; finished topics are kept")
    return GateResult(messages, stop, misses)


# ---- the final statement ---------------------------------------------------------------------------


def _final_scores(summary: dict) -> dict[str, dict]:
    out = {}
    for t, entry in summary.get("topics", {}).items():
        evals = entry.get("eval", {})
        stage = latest_stage(evals)
        if stage:
            out[t] = evals[stage]
    return out


def _dpo_gains(summary: dict) -> dict[str, float]:
    gains = {}
    for t, entry in summary.get("topics", {}).items():
        e = entry.get("eval", {})
        sft, dpo = e.get("after_sft", {}).get("voice_fidelity"), e.get("after_dpo", {}).get("voice_fidelity")
        if sft is not None and dpo is not None:
            gains[t] = dpo - sft
    return gains


def _general_line(summary: dict, spec) -> tuple[bool | None, str | None]:
    """Whether every topic's latest-stage general-text perplexity stayed within the guard (None: no data)."""
    increase, checked, over = spec.eval.max_general_ppl_increase, 0, []
    for t, entry in summary.get("topics", {}).items():
        evals = entry.get("eval", {})
        stage = latest_stage(evals)
        now, base = evals.get(stage, {}).get("general_ppl"), evals.get("base", {}).get("general_ppl")
        if stage and now is not None and base is not None:
            checked += 1
            over += _general_misses(t, stage, evals, increase)
    if increase is None or not checked:
        return None, None
    text = f"general-text perplexity within base x {1 + increase:.2f} in {checked - len(over)}/{checked} topics"
    if over:
        text += "; above: " + ", ".join(f"{x['topic']} {x['base']:.2f} -> {x['value']:.2f}" for x in over)
    return not over, text


def heldout_gains(summary: dict, spec) -> dict[str, dict]:
    """Per topic with intervals: its latest stage against base on held-out items (`metrics.compare_stages`)."""
    out = {}
    for t, entry in summary.get("topics", {}).items():
        evals = entry.get("eval", {})
        stage = latest_stage(evals)
        if stage and "base" in evals and evals[stage].get("voice_fidelity_ci") is not None:
            out[t] = {
                "stage": stage,
                **compare_stages(evals["base"], evals[stage], "voice_fidelity", spec.eval.weights, seed=spec.seed),
            }
    return out


def _gain_line(gains: dict[str, dict]) -> str:
    shown = sum(g["above"] and g["excludes_before"] for g in gains.values())
    paired = sum(bool(g.get("differs")) and (g.get("diff") or 0) > 0 for g in gains.values())
    return (
        f"held-out voice fidelity above base with its 95% interval excluding the base score in "
        f"{shown}/{len(gains)} topics; paired difference above 0 (95% interval) in {paired}/{len(gains)}"
    )


def _metric_line(name: str, target: float, scores: dict[str, dict], key: str) -> tuple[bool, str]:
    values = {t: s[key] for t, s in scores.items() if s.get(key) is not None}
    missed = {t: v for t, v in values.items() if v < target}
    excellent = sum(v >= EXCELLENT for v in values.values())
    text = f"{name} >= {target:.2f}: met in {len(values) - len(missed)}/{len(values)} topics"
    if key == "voice_fidelity":
        text += f" ({excellent} excellent, >= {EXCELLENT:.2f})"
    if missed:
        text += "; missed: " + ", ".join(f"{t} {v:.3f}" for t, v in missed.items())
    return bool(values) and not missed, text


def final_statement(summary: dict, spec, records: Iterable[dict] | None = None) -> dict:
    """Which of the seed's targets the run met: fidelity, accuracy, fidelity gain across DPO, stability."""
    scores, goal = _final_scores(summary), targets(spec)
    ok_f, line_f = _metric_line("voice fidelity", goal["voice_fidelity"], scores, "voice_fidelity")
    ok_a, line_a = _metric_line("accuracy", goal["accuracy"], scores, "accuracy")
    gains = _dpo_gains(summary)
    ok_d = bool(gains) and all(g > 0 for g in gains.values())
    line_d = f"voice fidelity improved across DPO in {sum(g > 0 for g in gains.values())}/{len(gains)} topics"
    lines, checks = [line_f, line_a, line_d], {"voice_fidelity": ok_f, "accuracy": ok_a, "dpo_gain": ok_d}
    ok_g, line_g = _general_line(summary, spec)
    if ok_g is not None:
        checks["general_ability"] = ok_g
        lines.append(line_g)
    heldout = heldout_gains(summary, spec)
    if heldout:
        lines.append(_gain_line(heldout))
    stab = stability(records) if records is not None else None
    if stab is not None:
        checks["stability"] = stab["stable"]
        lines.append(
            f"stability: {stab['nan_inf']} NaN/inf values, {stab['loss_spikes']} loss spikes "
            f"over {stab['steps']} logged steps"
        )
    met = all(checks.values())
    lines.append("all targets met" if met else "targets not met: " + ", ".join(k for k, v in checks.items() if not v))
    return {
        "met": met,
        "checks": checks,
        "stability": stab,
        "dpo_gain": gains,
        "heldout_gain": heldout,
        "lines": lines,
        "statement": "; ".join(lines),
    }
