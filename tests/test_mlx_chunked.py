"""Chunked log-probs on MLX (local_mlx/losses.py) equal the full-logits computation: loss and gradients within 1e-5,
with padding masks, for tied (embedding as_linear) and untied (lm_head) heads, LoRA and fully trainable models."""

import pytest

TOL = 1e-5


def tiny_model(kind: str, lora: bool):
    import mlx.core as mx

    mx.random.seed(0)
    if kind == "llama":  # SmolLM2's architecture: tied embeddings
        from mlx_lm.models.llama import Model, ModelArgs

        args = ModelArgs(
            model_type="llama",
            hidden_size=32,
            num_hidden_layers=2,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            vocab_size=300,
            tie_word_embeddings=True,
        )
    else:  # Qwen2 with its own lm_head
        from mlx_lm.models.qwen2 import Model, ModelArgs

        args = ModelArgs(
            model_type="qwen2",
            hidden_size=32,
            num_hidden_layers=2,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            rms_norm_eps=1e-6,
            vocab_size=300,
            tie_word_embeddings=False,
        )
    model = Model(args)
    if lora:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model.freeze()
        keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": keys})
        from mlx.utils import tree_flatten, tree_map

        # LoRA's B starts at 0: give it values so that the gradients of A are not all zero
        model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
        assert tree_flatten(model.trainable_parameters())
    mx.eval(model.parameters())
    return model


def padded_batch(rows: int = 4, width: int = 23):
    """Right-padded rows of different lengths and their target masks (padding and prompts excluded)."""
    import mlx.core as mx

    lengths = [width, width - 5, 9, width - 1][:rows]
    tokens = mx.random.randint(1, 300, (rows, width)).astype(mx.int32)
    positions = mx.arange(1, width)[None, :]
    length = mx.array(lengths)[:, None]
    mask = ((positions < length) & (positions >= 3)).astype(mx.float32)  # targets: after a 3-token prompt
    tokens = mx.where(mx.arange(width)[None, :] < length, tokens, 0)
    return tokens, mask


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
