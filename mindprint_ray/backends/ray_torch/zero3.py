"""Whole parameters under DeepSpeed ZeRO-3, where each rank holds its partition only once an engine has trained.

A topic's stages share one model: after the first ZeRO-3 stage its parameters stay partitioned (size 0 outside
a gather), so any plain tensor read or write between stages (TRL's copy of the adapter into its "ref" adapter,
loading the previous topic's adapter, restoring a checkpoint's weights) must gather them first.
"""

from __future__ import annotations

import contextlib


def gathered(params, modifier_rank: int | None = None):
    """A context in which `params` are whole on every rank: with `modifier_rank`, what that rank writes is
    partitioned back to every rank on exit; without, the parameters are read only. Nothing to do (a null context)
    when none of them is a ZeRO-3 parameter."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)
