"""The worker's TRL trainers: TRL's SFTTrainer and DPOTrainer with log-probs in small tiles off Triton
(chunked_logprobs.SmallTiles), DPO with its frozen reference scored once when that pays
(reference_logprobs.FrozenReference). Built on first use, so that importing this module loads no TRL."""

from __future__ import annotations

import functools

from mindprint_ray.backends.ray_torch.chunked_logprobs import SmallTiles
from mindprint_ray.backends.ray_torch.reference_logprobs import FrozenReference


@functools.cache
def sft_trainer_class():
    from trl import SFTTrainer

    return type("SFTTrainer", (SmallTiles, SFTTrainer), {"__doc__": "TRL's SFTTrainer, log-probs in small tiles"})


@functools.cache
def dpo_trainer_class():
    from trl import DPOTrainer

    doc = "TRL's DPOTrainer, log-probs in small tiles, the frozen reference scored once when precompute is set"
    return type("DPOTrainer", (FrozenReference, SmallTiles, DPOTrainer), {"__doc__": doc})
