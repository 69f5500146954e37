"""Chunked log-probs on MLX (local_mlx/losses.py) equal the full-logits computation: loss and gradients within 1e-5,
with padding masks, for tied (embedding as_linear) and untied (lm_head) heads, LoRA and fully trainable models."""

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
@pytest.mark.parametrize("lora", [True, False])
def test_chunked_sft_and_dpo_equal_full_logits(kind, lora):
    import mlx.core as mx

    from local_mlx.losses import split_model, token_logprobs

    model = tiny_model(kind, lora)
    assert split_model(model) is not None  # the chunked path is the one taken below
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
    if not lora:  # the tied embedding's gradient comes from both the input lookup and the chunked head
        key = "lm_head" if kind == "qwen2" else "model"
        assert key in plain_grads


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
