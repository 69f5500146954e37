"""After a run: measured stage time, tokens and peak memory beside the estimates for that run's own spec."""

from __future__ import annotations

from mindprint_ray.planning.estimates import memory_for_run
from mindprint_ray.planning.run_measures import measured_mfu, read_run
from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.planning.time_model import peak_flops, resolve_mfu, stage_flops
from mindprint_ray.planning.topic_tokens import TRAINING_STAGES, count_topic_tokens
from mindprint_ray.runs.run_folder import RunFolder


def error_pct(estimate: float | None, measured: float | None) -> float | None:
    """(estimate - measured) / measured in %: positive when the estimate is too high."""
    if estimate is None or not measured:
        return None
    return 100.0 * (estimate - measured) / measured


def measured_vs_estimate(run_dir: str) -> dict:
    """Rows per topic and stage, with the MFU the estimate assumed and the one the run measured."""
    measures = read_run(run_dir)
    run = load_run(RunFolder(run_dir).spec_file)
    tokens, how = count_topic_tokens(run)
    by_topic = {t.topic: t for t in tokens}
    assumed = resolve_mfu(run, calibration={})  # the profile's assumption, not a calibration from this run
    rows = []
    for topic, stages in measures.stages.items():
        for stage in TRAINING_STAGES:
            m = stages.get(stage)
            if not m or topic not in by_topic:
                continue
            est_tokens, flops = stage_flops(run, by_topic[topic], stage)
            est_s = flops / (peak_flops(run) * getattr(assumed, stage))
            est_mem = memory_for_run(run, stage).total
            rows.append(
                {
                    "topic": topic,
                    "stage": stage,
                    "est_tokens": est_tokens,
                    "tokens": m.tokens,
                    "tokens_err": error_pct(est_tokens, m.tokens),
                    "est_s": est_s,
                    "s": m.seconds,
                    "s_err": error_pct(est_s, m.seconds),
                    "est_mem": est_mem,
                    "mem": m.peak_memory_gb,
                    "mem_err": error_pct(est_mem, m.peak_memory_gb),
                    "tokens_per_s": m.tokens_per_s,
                }
            )
    return {
        "run": str(measures.root),
        "profile": run.profile.name,
        "quant": run.quant,
        "model": run.arch.name,
        "devices": run.num_workers,
        "token_count": how,
        "assumed_mfu": {"sft": assumed.sft, "dpo": assumed.dpo},
        "measured_mfu": measured_mfu(run, measures, tokens),
        "rows": rows,
        "memory_kind": "CUDA allocator peak" if run.profile.is_gpu else "process max RSS (CPU)",
    }
