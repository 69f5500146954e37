"""Losses on MLX: masked next-token cross-entropy (SFT) and the sigmoid DPO loss with reference log-probs.

Log-probs are computed from the final hidden states in chunks of LOGITS_CHUNK positions: each chunk's fp32 logits
[B, chunk, vocab] are made, reduced to the targets' log-probs and dropped, and the chunk is checkpointed
(`mx.checkpoint`), so the backward recomputes its logits instead of keeping every chunk's. Peak memory then holds
one chunk's logits and their gradient, not [B, T, vocab] of them.
"""

from __future__ import annotations

LOGITS_CHUNK = 256  # sequence positions per chunk of logits
SPLIT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")  # model(x) == head(model.model(x))


def split_model(model):
    """(body, head module, projection) with model(x) == projection(body(x)): mlx-lm's decoder stack (ending in
    its final norm) and the output projection (`lm_head`, or the embedding's `as_linear` when tied, as mlx-lm's
    own Model.__call__). None for models whose output is not a plain projection of the final hidden states."""
    if getattr(model, "model_type", None) not in SPLIT_MODEL_TYPES or "model" not in model:
        return None
    body = model.model
    if "lm_head" in model:
        return body, model.lm_head, model.lm_head
    return body, body.embed_tokens, body.embed_tokens.as_linear


def target_logprobs(logits, targets):
    """log p(target) per position, in float32: logits [..., V], targets [...] -> [...]."""
    import mlx.core as mx
    import mlx.nn as nn

    return -nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")


def token_logprobs(model, tokens, chunk: int | None = LOGITS_CHUNK):
    """log p(token_t | tokens_<t) for t = 1..T-1, in float32: [B, T-1]. `chunk=None`: full logits at once."""
    import mlx.core as mx

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    split = split_model(model) if chunk else None
    if split is None or inputs.shape[1] <= chunk:
        return target_logprobs(model(inputs), targets)
    body, head, project = split

    @mx.checkpoint
    def piece(params, hidden, target):  # the head's trainable parameters (none under LoRA) are inputs
        head.update(params)
        return target_logprobs(project(hidden), mx.stop_gradient(target))  # no gradient for token ids

    bounds = list(range(chunk, inputs.shape[1], chunk))
    params = head.trainable_parameters()
    pieces = zip(mx.split(body(inputs), bounds, axis=1), mx.split(targets, bounds, axis=1))
    return mx.concatenate([piece(params, h, t) for h, t in pieces], axis=1)


def sequence_logprobs(model, tokens, mask, chunk: int | None = LOGITS_CHUNK):
    """Summed log-probs of the target tokens of each sequence: [B]."""
    return (token_logprobs(model, tokens, chunk) * mask).sum(axis=1)


def sft_loss(model, tokens, mask, chunk: int | None = LOGITS_CHUNK):
    """(mean negative log-likelihood over target tokens, number of target tokens)."""
    count = mask.sum()
    return -(token_logprobs(model, tokens, chunk) * mask).sum() / count, count


def dpo_loss(model, tokens, mask, reference, beta: float, chunk: int | None = LOGITS_CHUNK):
    """Sigmoid DPO. Rows are B chosen then B rejected; `reference` holds the reference log-probs in that order.

    Returns (loss, chosen rewards, rejected rewards), rewards = beta * (policy - reference) log-probs."""
    import mlx.nn as nn

    policy = sequence_logprobs(model, tokens, mask, chunk)
    half = policy.shape[0] // 2
    chosen = beta * (policy[:half] - reference[:half])
    rejected = beta * (policy[half:] - reference[half:])
    return -nn.log_sigmoid(chosen - rejected).mean(), chosen, rejected
