"""Chunked log-probs on MLX (local_mlx/losses.py) equal the full-logits computation: loss and gradients within 1e-5,
with padding masks, for tied (embedding as_linear) and untied (lm_head) heads, on fp32 and 4-bit bases with LoRA;
a model whose head trains keeps the full logits."""

import pytest
from mlx_tiny import padded_batch, tiny_model

TOL = 1e-5


def value_and_grad(model, name: str, tokens, mask, reference, chunk):
    import mlx.nn as nn

    from local_mlx.losses import dpo_loss, sft_loss

    def loss(m):
        return sft_loss(m, tokens, mask, chunk) if name == "sft" else dpo_loss(m, tokens, mask, reference, 0.1, chunk)

    return nn.value_and_grad(model, loss)(model)


def max_diff(a, b) -> float:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert fa.keys() == fb.keys() and fa
    return max(mx.abs(fa[k] - fb[k]).max().item() for k in fa)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("base", ["lora", "nf4-lora", "fully-trainable"])
def test_chunked_sft_and_dpo_equal_full_logits(kind, base):
    import mlx.core as mx

    from local_mlx.losses import split_model, token_logprobs

    model = tiny_model(kind, lora=base != "fully-trainable", nf4=base == "nf4-lora")
    chunked_path = split_model(model) is not None
    assert chunked_path is (base != "fully-trainable")  # a trainable head keeps the full logits
    tokens, mask = padded_batch()
    full = token_logprobs(model, tokens, chunk=None)
    for chunk in (4, 5, 16):  # 22 positions: uneven last chunks
        assert mx.abs(token_logprobs(model, tokens, chunk) - full).max().item() < TOL

    reference = mx.array([-40.0, -35.0, -42.0, -30.0])
    for name in ("sft", "dpo"):
        (plain, *plain_rest), plain_grads = value_and_grad(model, name, tokens, mask, reference, None)
        (chunked, *rest), grads = value_and_grad(model, name, tokens, mask, reference, 5)
        assert abs(chunked.item() - plain.item()) < TOL, name
        assert all(mx.abs(a - b).max().item() < TOL for a, b in zip(rest, plain_rest)), name
        assert max_diff(grads, plain_grads) < TOL, name
        scale = max(mx.abs(g).max().item() for g in _leaves(plain_grads))
        assert scale > 1e-3, name  # the gradients compared are not all zero


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]


def test_padding_and_prompt_positions_do_not_count():
    """Changing the padded or masked tokens leaves the chunked SFT loss as it is; changing a target changes it."""
    from local_mlx.losses import sft_loss

    model = tiny_model("llama", lora=True)
    tokens, mask = padded_batch()
    base = sft_loss(model, tokens, mask, 5)[0].item()
    padded = tokens.at[2, 12:].add(7)  # row 2 is 9 tokens long: 12.. is padding
    assert abs(sft_loss(model, padded, mask, 5)[0].item() - base) < TOL
    target = tokens.at[0, 10].add(1)
    assert abs(sft_loss(model, target, mask, 5)[0].item() - base) > 1e-4


def test_unknown_architectures_keep_the_full_logits():
    import mlx.nn as nn

    from local_mlx.losses import split_model

    assert split_model(nn.Linear(4, 4)) is None


def test_chunks_bound_the_peak_memory_of_forward_and_backward():
    """The point of chunking: the step's peak holds a few chunks' logits, not the whole [T, vocab] of them."""
    import mlx.core as mx

    from local_mlx.losses import chunked_logprobs, target_logprobs

    vocab, width, positions = 20_000, 64, 1024
    weight = mx.random.normal((vocab, width), key=mx.random.key(1)) * 0.05
    hidden = mx.random.normal((1, positions, width), key=mx.random.key(2))
    targets = mx.random.randint(0, vocab, (1, positions), key=mx.random.key(3))
    mix = mx.eye(width)
    mx.eval(weight, hidden, targets, mix)

    def peak(logprobs) -> tuple[float, mx.array]:
        grad = mx.grad(lambda m: logprobs(hidden @ m, targets, lambda h: h @ weight.T).sum())
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        g = grad(mix)
        mx.eval(g)
        return mx.get_peak_memory() - before, g

    full_peak, full_grad = peak(lambda h, t, project: target_logprobs(project(h), t))
    chunked_peak, chunked_grad = peak(lambda h, t, project: chunked_logprobs(h, t, project, 32))
    logits = positions * vocab * 4
    assert full_peak > 2 * logits and chunked_peak < logits / 2  # measured: ~4x and ~0.4x on CPU
    assert mx.abs(chunked_grad - full_grad).max().item() < 1e-4 * mx.abs(full_grad).max().item()
