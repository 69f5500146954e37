"""When DPO scores its frozen reference once per topic instead of at every step: the one rule that the Ray worker,
the time model and the multi-node traffic model all follow.

Both references (`dpo.reference: sft`, a frozen copy of the topic's adapter as DPO starts, and `base`, the adapter
disabled) stay fixed for the whole of a topic's DPO, so each pair's reference log-probs are the same every time
the pair comes back. Precomputing costs one reference forward over every training pair before the first step
(TRL's `precompute_ref_log_probs`); not precomputing costs one reference forward per pair per step. Precomputing
pays when the stage consumes more pairs than the topic has: steps x global batch > pairs (each pair revisited).
Held-out pairs (eval.heldout_pairs) are not trained and do not count.
Pure Python: no torch.
"""

from __future__ import annotations

from typing import Literal

from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.planning.step_budget import global_batch

Setting = bool | Literal["auto"]


def pairs_consumed(steps: int, batch: int) -> int:
    """Pairs the stage trains on: optimizer steps x global batch (batch_size x gradient_accumulation x workers)."""
    return steps * batch


def precompute_reference(setting: Setting, pairs: int, steps: int, batch: int) -> bool:
    """`dpo.precompute_ref_log_probs` resolved for one topic: true/false as set; auto: precompute exactly when
    pairs are revisited (steps x global batch > the topic's training pairs)."""
    if setting != "auto":
        return bool(setting)
    return pairs > 0 and pairs_consumed(steps, batch) > pairs


def run_precomputes(run: RunPlan, pairs: int) -> bool:
    """The rule for a topic of `pairs` training pairs under this run's DPO steps and global batch (as planned).
    MLX (local_mlx) always precomputes (the pairs its steps visit: reference_pairs), whatever the setting."""
    if run.profile.backend == "mlx":
        return True
    d = run.spec.dpo
    return precompute_reference(d.precompute_ref_log_probs, pairs, d.steps_per_topic, global_batch(run, "dpo"))


def reference_pairs(run: RunPlan, pairs: int, seen: int) -> int:
    """How many pairs the precomputed reference forward covers, of a topic's `pairs` when its steps take `seen`:
    TRL's pass covers every training pair; MLX (local_mlx) scores only the pairs its steps visit, each once."""
    return min(pairs, seen) if run.profile.backend == "mlx" else pairs


def keeps_reference_copy(run: RunPlan) -> bool:
    """Whether some topic may train DPO next to TRL's frozen copy of the adapter (the sft reference, scored at
    every step): unless precompute is on for every topic (set true, or MLX, which keeps no copy). With auto the
    copy is counted: which topics revisit their pairs depends on each topic's pair count."""
    return run.profile.backend != "mlx" and run.spec.dpo.precompute_ref_log_probs is not True
