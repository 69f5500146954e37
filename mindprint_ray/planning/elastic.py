"""Elastic worker groups: `hardware.num_workers: [min, max]` and the batch layout that keeps each stage's global
batch whatever the number of workers Ray Train V2 starts.

The spec's batch is the run at full size: a stage's global batch is max_workers x batch_size x
gradient_accumulation. With fewer workers (a lost node, a smaller replacement) each worker keeps its micro-batch
and accumulates more; if the count does not divide the global batch, the micro-batch shrinks to a size that does.
Because every optimizer step then consumes the same number of examples, in the same seeded order (the trainer's
sampler deals the same shuffled batches over the group), a checkpoint's step is the same position in the
topic's data at any worker count. A count for which no exact layout exists (a prime global batch on 3 workers)
takes the layout whose global batch exceeds the spec's least: the step is slightly larger, which `plan` shows.
One limit: where a topic's rows do not fill its epoch's last global batch, a group of several workers pads that
step (Ray's samplers wrap around) and one worker shortens it, so the order after an uneven epoch end can differ.

The time estimate assumes the full group (max workers); a group of n workers takes about max / n as long per
step (the same tokens over fewer devices), which `plan` lists per count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLayout:
    """How one stage's global batch is dealt to `workers` workers."""

    workers: int
    per_device: int
    accumulation: int
    target: int  # the global batch the spec asks for

    @property
    def global_batch(self) -> int:
        return self.workers * self.per_device * self.accumulation

    @property
    def exact(self) -> bool:
        return self.global_batch == self.target


def worker_range(num_workers: int | tuple[int, int] | None, default: int) -> tuple[int, int]:
    """(min, max) workers of `hardware.num_workers` (a count is both; None is the profile's device count)."""
    if num_workers is None:
        return default, default
    if isinstance(num_workers, int):
        return num_workers, num_workers
    return int(num_workers[0]), int(num_workers[1])


def batch_layout(target: int, workers: int, max_per_device: int) -> BatchLayout:
    """The largest micro-batch <= `max_per_device` with workers x micro-batch dividing the `target` global batch,
    and the accumulation that completes it; without one, the layout whose global batch exceeds it least."""
    for per_device in range(min(max_per_device, max(1, target // workers)), 0, -1):
        if target % (workers * per_device) == 0:
            return BatchLayout(workers, per_device, target // (workers * per_device), target)
    # no exact layout: the smallest global batch above the target (the larger micro-batch on a tie)
    options = [
        BatchLayout(workers, b, math.ceil(target / (workers * b)), target)
        for b in range(1, max(1, min(max_per_device, math.ceil(target / workers))) + 1)
    ]
    return min(options, key=lambda layout: (layout.global_batch, -layout.per_device))


def stage_layout(run, stage: str, workers: int) -> BatchLayout:
    """The layout of `stage` ("sft" or "dpo") of `run` (a RunPlan) on `workers` workers."""
    section = run.spec.stage(stage)
    target = run.num_workers * section.batch_size * section.gradient_accumulation
    return batch_layout(target, workers, section.batch_size)


def elastic_plan(run) -> dict | None:
    """For `plan`: each worker count of an elastic range with each stage's layout and the step-time factor the
    estimate assumes (max / n); None for a fixed count."""
    low, high = run.worker_range
    if low == high:
        return None
    counts = []
    for n in range(low, high + 1):
        row = {"workers": n, "time_factor": round(high / n, 3)}
        for stage in ("sft", "dpo"):
            layout = stage_layout(run, stage, n)
            row[stage] = {
                "batch_size": layout.per_device,
                "gradient_accumulation": layout.accumulation,
                "global_batch": layout.global_batch,
                "exact": layout.exact,
            }
        counts.append(row)
    return {
        "min_workers": low,
        "max_workers": high,
        "counts": counts,
        "assumes": "estimates are for the full group (max workers); n workers take about max/n as long per "
        "step, with the same global batch (gradient accumulation recomputed)",
    }
