"""Losses on MLX: masked next-token cross-entropy (SFT) and the sigmoid DPO loss with reference log-probs.

Log-probs come from the final hidden states in chunks of LOGITS_CHUNK positions (`chunked_logprobs`): each
chunk's fp32 logits [B, chunk, vocab] are made, reduced to the targets' log-probs and dropped, one chunk after
the other (`mx.depends` orders them: MLX's scheduler would otherwise run independent chunks side by side), and the
backward recomputes each chunk's logits for its softmax gradient. Peak memory then holds about one chunk's
logits and gradient buffers instead of [B, T, vocab] of them (bench/mlx_logits_memory.py measures it).
"""

from __future__ import annotations

LOGITS_CHUNK = 128  # sequence positions per chunk of logits
SPLIT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")  # model(x) == head(model.model(x))


def split_model(model):
    """(body, projection) with model(x) == projection(body(x)): mlx-lm's decoder stack (ending in its final norm)
    and the frozen output projection (`lm_head`, or the embedding's `as_linear` when tied, as mlx-lm's own
    Model.__call__). None for other models, or when the projection has trainable weights (the chunked gradient
    is with respect to the hidden states only): those keep the full logits."""
    if getattr(model, "model_type", None) not in SPLIT_MODEL_TYPES or "model" not in model:
        return None
    body = model.model
    head, project = (
        (model.lm_head, model.lm_head) if "lm_head" in model else (body.embed_tokens, body.embed_tokens.as_linear)
    )
    return None if _any_leaf(head.trainable_parameters()) else (body, project)


def _any_leaf(tree) -> bool:
    from mlx.utils import tree_flatten

    return bool(tree_flatten(tree))


def target_logprobs(logits, targets):
    """log p(target) per position, in float32: logits [..., V], targets [...] -> [...]."""
    import mlx.core as mx
    import mlx.nn as nn

    return -nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")


def chunked_logprobs(hidden, targets, project, chunk: int = LOGITS_CHUNK):
    """target_logprobs(project(hidden), targets) [B, T], `chunk` positions at a time, forward and backward."""
    import mlx.core as mx

    spans = [slice(a, a + chunk) for a in range(0, hidden.shape[1], chunk)]
    # Slices, not mx.split: mx.compile (mlx 0.32.4) fails with "_Map_base::at" when the vjp splits the hidden
    # states again and recomputes the chunk's logits from them; the targets are inputs too, for the same reason.

    @mx.custom_function
    def logprobs(hidden, targets):
        out, previous = [], None
        for s in spans:
            h = hidden[:, s] if previous is None else mx.depends(hidden[:, s], previous)  # one chunk at a time
            previous = target_logprobs(project(h), targets[:, s])
            out.append(previous)
        return mx.concatenate(out, axis=1)

    @logprobs.vjp
    def logprobs_vjp(primals, cotangent, output):
        """d logp(t) / d logits = onehot(t) - softmax(logits), pulled back through the projection per chunk."""
        hidden, targets = primals
        grads, previous = [], output  # the backward starts when the forward is done
        for s in spans:
            h = mx.depends(hidden[:, s], previous)
            logits = project(h)
            onehot = mx.arange(logits.shape[-1]) == targets[:, s, None]
            g = (onehot - mx.softmax(logits.astype(mx.float32), axis=-1)) * cotangent[:, s, None]
            _, (previous,) = mx.vjp(project, [h], [g.astype(logits.dtype)])
            grads.append(previous)
        return mx.concatenate(grads, axis=1), mx.zeros_like(targets)

    return logprobs(hidden, targets)


def token_logprobs(model, tokens, chunk: int | None = LOGITS_CHUNK):
    """log p(token_t | tokens_<t) for t = 1..T-1, in float32: [B, T-1]. `chunk=None`: full logits at once."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    split = split_model(model) if chunk else None
    if split is None or inputs.shape[1] <= chunk:
        return target_logprobs(model(inputs), targets)
    body, project = split
    return chunked_logprobs(body(inputs), targets, project, chunk)


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
