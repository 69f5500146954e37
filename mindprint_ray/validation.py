"""Everything that must hold before any training starts: spec, zones, hardware, data, token lengths."""
from __future__ import annotations

from pathlib import Path

from .curriculum import TopicData, load_curriculum
from .data_stats import TopicStats, apply_overlong
from .run import RunPlan, load_run
from .tokens import TokenCounter


def validate_run(run: RunPlan) -> tuple[list[TopicData], list[TopicStats], TokenCounter]:
    topics = load_curriculum(run.spec)
    counter = TokenCounter.for_model(run.model_path)
    rows = apply_overlong(run.spec, topics, counter)
    return topics, rows, counter


def validate_all(config: str | Path, overrides: list[str]) -> tuple[RunPlan, list[TopicStats], TokenCounter]:
    run = load_run(config, overrides)
    _, rows, counter = validate_run(run)
    return run, rows, counter
