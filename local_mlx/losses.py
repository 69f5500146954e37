"""Losses on MLX: masked next-token cross-entropy (SFT) and the sigmoid DPO loss with reference log-probs."""

from __future__ import annotations


def token_logprobs(model, tokens):
    """log p(token_t | tokens_<t) for t = 1..T-1, in float32: [B, T-1]."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(tokens[:, :-1]).astype(mx.float32)
    return -nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")


def sequence_logprobs(model, tokens, mask):
    """Summed log-probs of the target tokens of each sequence: [B]."""
    return (token_logprobs(model, tokens) * mask).sum(axis=1)


def sft_loss(model, tokens, mask):
    """(mean negative log-likelihood over target tokens, number of target tokens)."""
    count = mask.sum()
    return -(token_logprobs(model, tokens) * mask).sum() / count, count


def dpo_loss(model, tokens, mask, reference, beta: float):
    """Sigmoid DPO. Rows are B chosen then B rejected; `reference` holds the reference log-probs in that order.

    Returns (loss, chosen rewards, rejected rewards), rewards = beta * (policy - reference) log-probs."""
    import mlx.nn as nn

    policy = sequence_logprobs(model, tokens, mask)
    half = policy.shape[0] // 2
    chosen = beta * (policy[:half] - reference[:half])
    rejected = beta * (policy[half:] - reference[half:])
    return -nn.log_sigmoid(chosen - rejected).mean(), chosen, rejected
