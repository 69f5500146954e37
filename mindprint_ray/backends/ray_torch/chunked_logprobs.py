"""Token log-probs in small tiles of the sequence and the vocabulary, fused with the lm_head, for the SFT and DPO
trainers of the worker.

TRL 1.16 already never builds the (batch, seq, vocab) logits: both `SFTTrainer` and `DPOTrainer` patch the model
with `add_fused_lm_head` and call it with `fused_lm_head=True`, which projects the last hidden states through the
lm_head tile by tile (`trl.kernels.ChunkedLogProbFunction`: online log-sum-exp over vocabulary tiles, the backward
recomputing each tile). On CUDA and XPU its Triton kernels work in place on a [4096 tokens x 32768 vocab] tile.
Elsewhere (CPU) the same tile is folded with torch ops that allocate several fp32 temporaries of the tile's size,
up to 4096 x 32768 x 4 B = 0.54 GB each: measured on SmolLM2 (vocab 49,152) at DPO's 2 x 2,048 tokens, the head
peaked at 4.45 GB, against 3.23 GB for the full logits (docs/benchmarks.md).

Off Triton, the trainers here feed TRL's kernel CPU_TOKEN_TILE tokens at a time with CPU_VOCAB_TILE vocabulary
columns (mindprint_ray/planning/memory.py, where the memory model reads the same figures): the same arithmetic in
tiles an eighth of the size (0.61 GB measured in the same case). On Triton devices TRL's own tiles and kernels run
unchanged. Liger's fused linear cross-entropy does not apply: TRL 1.16's trainers force
`liger_kernel_config={"fused_linear_cross_entropy": False}` under `use_liger_kernel` (it would replace the model's
forward and drop this fused head), and keep only Liger's layer kernels.
"""

from __future__ import annotations

import contextlib

from mindprint_ray.planning.memory import CPU_TOKEN_TILE, CPU_VOCAB_TILE

OUTPUTS = 5  # logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1 (TRL's FusedCausalLMOutput fields)


def tiled_logprobs(
    hidden,
    weight,
    bias,
    targets,
    temperature: float,
    vocab_tile: int,
    final_logit_softcapping: float | None = None,
    logit_scale: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
    token_tile: int | None = None,
):
    """TRL's ChunkedLogProbFunction on `token_tile` rows of `hidden` ([N, H]) at a time, each with `vocab_tile`
    columns per projection: the five per-token outputs ([N] each, None where not requested), as TRL returns them."""
    from trl.kernels import ChunkedLogProbFunction

    rows = token_tile or CPU_TOKEN_TILE
    n = hidden.shape[0]
    args = (temperature, vocab_tile, final_logit_softcapping, logit_scale, outputs)
    if n <= rows:
        return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, *args)
    import torch

    parts = [
        ChunkedLogProbFunction.apply(hidden[i : i + rows], weight, bias, targets[i : i + rows], *args)
        for i in range(0, n, rows)
    ]
    return tuple(None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in range(OUTPUTS))


class TiledLogProbFunction:
    """What add_fused_lm_head's forward calls as `_ChunkedLogProbFunction.apply(...)`, with smaller tiles."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs):
        vocab_tile = min(chunk_size, CPU_VOCAB_TILE)
        return tiled_logprobs(
            hidden, weight, bias, targets, temperature, vocab_tile, final_logit_softcapping, logit_scale, outputs
        )


def uses_triton(device) -> bool:
    """Whether TRL folds the tiles with its in-place Triton kernels on this device (CUDA/XPU with Triton)."""
    from trl.kernels.chunked_logprob import _use_triton

    return _use_triton(device)


@contextlib.contextmanager
def small_tiles(device):
    """Within the block, TRL's fused lm_head (trl.trainer.utils) projects through TiledLogProbFunction when `device`
    has no Triton kernels; the backward of each tile is TRL's own, wherever it runs."""
    import trl.trainer.utils as fused

    if uses_triton(device):
        yield
        return
    original = fused._ChunkedLogProbFunction  # the name add_fused_lm_head's forward looks up at every call
    fused._ChunkedLogProbFunction = TiledLogProbFunction
    try:
        yield
    finally:
        fused._ChunkedLogProbFunction = original


class SmallTiles:
    """Mixin for TRL's SFTTrainer and DPOTrainer: every forward through the fused lm_head (the training loss, and
    DPO's precomputed reference log-probs) runs in small tiles off Triton."""

    def compute_loss(self, *args, **kwargs):
        with small_tiles(self.accelerator.device):
            return super().compute_loss(*args, **kwargs)

    def compute_ref_log_probs(self, *args, **kwargs):
        with small_tiles(self.accelerator.device):
            return super().compute_ref_log_probs(*args, **kwargs)
