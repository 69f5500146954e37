"""What a run folder measured, per topic and stage (throughput, seconds, peak memory), and the calibration
computed from it: the MFU at which the time model reproduces the measured stage seconds of that run.

`mindprint-ray calibrate RUN_DIR` runs `calibrate`; the entry goes to the calibration store (calibration.py).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from mindprint_ray.errors import UserError
from mindprint_ray.planning.calibration import store
from mindprint_ray.planning.estimates import memory_for_run
from mindprint_ray.planning.run_plan import RunPlan, load_run
from mindprint_ray.planning.time_model import peak_flops, stage_flops
from mindprint_ray.planning.topic_tokens import TRAINING_STAGES, TopicTokens, count_topic_tokens
from mindprint_ray.runs.run_folder import RunFolder


@dataclass
class StageMeasure:
    tokens: float = 0.0
    seconds: float = 0.0
    tokens_per_s: float | None = None
    peak_memory_gb: float = 0.0


@dataclass
class RunMeasures:
    """What a finished (or partly finished) run measured, per topic and stage."""

    root: Path
    profile: str
    stages: dict[str, dict[str, StageMeasure]] = field(default_factory=dict)  # topic -> stage -> measure
    topic_wall_s: dict[str, float] = field(default_factory=dict)

    def total(self, stage: str) -> StageMeasure:
        ms = [s[stage] for s in self.stages.values() if stage in s]
        seconds = sum(m.seconds for m in ms)
        tokens = sum(m.tokens for m in ms)
        return StageMeasure(
            tokens, seconds, tokens / seconds if seconds else None, max((m.peak_memory_gb for m in ms), default=0.0)
        )


def read_run(run_dir: str | Path) -> RunMeasures:
    """Per-stage seconds (first stage_start to last step record), tokens, tokens/s and peak memory."""
    folder = RunFolder(run_dir)
    if not folder.summary_file.is_file() or not folder.spec_file.is_file():
        raise UserError(
            f"{folder.root} is not a run folder (needs spec.yaml and summary.json)",
            file=folder.root,
            hint="pass the folder a `train` run wrote: <storage>/<run name>",
        )
    summary = folder.summary()
    out = RunMeasures(folder.root, summary.get("profile", ""))
    starts: dict[tuple, float] = {}
    for rec in folder.read_metrics():
        key = (rec.get("topic"), rec.get("stage"))
        if rec.get("event") == "stage_start":
            starts.setdefault(key, rec["time"])
        elif "step" in rec and key in starts and key[1] in TRAINING_STAGES:
            m = out.stages.setdefault(key[0], {}).setdefault(key[1], StageMeasure())
            m.seconds = rec["time"] - starts[key]
            m.peak_memory_gb = max(m.peak_memory_gb, rec.get("peak_memory_gb", 0.0))
            m.tokens = rec.get("num_tokens", m.tokens)
    for topic, entry in summary.get("topics", {}).items():
        if "wall_s" in entry:
            out.topic_wall_s[topic] = entry["wall_s"]
        for stage in TRAINING_STAGES:
            s = entry.get(stage) or {}
            m = out.stages.setdefault(topic, {}).setdefault(stage, StageMeasure()) if s else None
            if m:
                m.tokens_per_s = s.get("tokens_per_s")
                m.peak_memory_gb = max(m.peak_memory_gb, s.get("peak_memory_gb") or 0.0)
    if not any(m.seconds for s in out.stages.values() for m in s.values()):
        raise UserError("the run folder has no timed training steps in metrics.jsonl", file=folder.metrics_file)
    return out


def measured_mfu(run: RunPlan, measures: RunMeasures, tokens: list[TopicTokens]) -> dict[str, float]:
    """MFU per stage such that the time model reproduces the measured stage seconds of this run."""
    by_topic = {t.topic: t for t in tokens}
    out = {}
    for stage in TRAINING_STAGES:
        flops = seconds = 0.0
        for topic, stages in measures.stages.items():
            m = stages.get(stage)
            if m and m.seconds and topic in by_topic:
                flops += stage_flops(run, by_topic[topic], stage)[1]
                seconds += m.seconds
        if flops and seconds:
            out[stage] = flops / (seconds * peak_flops(run))
    return out


def calibrate(run_dir: str | Path, path: Path | None = None) -> dict:
    """Measure a run folder and store its entry; returns the entry."""
    measures = read_run(run_dir)
    run = load_run(RunFolder(run_dir).spec_file)
    tokens, how = count_topic_tokens(run)
    mfu = measured_mfu(run, measures, tokens)
    if not mfu:
        raise UserError("no topic of the run matches its spec's curriculum", file=measures.root)
    stages = [s for s in TRAINING_STAGES if s in mfu]
    entry = {
        "profile": run.profile.name,
        "quant": run.quant,
        "model": run.arch.name,
        "run": str(measures.root),
        "date": datetime.date.today().isoformat(),
        "devices": run.num_workers,
        "mfu": mfu,
        "tokens_per_s": {s: measures.total(s).tokens_per_s for s in stages},
        "peak_memory_gb": {s: measures.total(s).peak_memory_gb for s in stages},
        "estimated_peak_memory_gb": {s: round(memory_for_run(run, s).total, 3) for s in stages},
        "token_count": how,
    }
    store(entry, path)
    return entry
