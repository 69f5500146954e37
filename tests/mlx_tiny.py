"""Tiny random-weight mlx-lm models and padded batches for the MLX tests (no files, no download)."""


def tiny_model(kind: str, lora: bool, nf4: bool = False):
    """A 2-layer llama (tied embeddings) or qwen2 (own lm_head); nf4: the base in MLX 4-bit as local_mlx
    quantizes it (hidden 64, so that every weight fits its group size)."""
    import mlx.core as mx

    mx.random.seed(0)
    if kind == "llama":  # SmolLM2's architecture: tied embeddings
        from mlx_lm.models.llama import Model, ModelArgs

        args = ModelArgs(
            model_type="llama",
            hidden_size=64 if nf4 else 32,
            num_hidden_layers=2,
            intermediate_size=128 if nf4 else 64,
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
            hidden_size=64 if nf4 else 32,
            num_hidden_layers=2,
            intermediate_size=128 if nf4 else 64,
            num_attention_heads=2,
            num_key_value_heads=1,
            rms_norm_eps=1e-6,
            vocab_size=300,
            tie_word_embeddings=False,
        )
    model = Model(args)
    if nf4:
        from local_mlx.model import quantize

        quantize(model)
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


def padded_batch(rows: int = 4, width: int = 23, seed: int = 0):
    """Right-padded rows of different lengths and their target masks (padding and prompts excluded)."""
    import mlx.core as mx

    lengths = [width, width - 5, 9, width - 1][:rows]
    tokens = mx.random.randint(1, 300, (rows, width), key=mx.random.key(seed)).astype(mx.int32)
    positions = mx.arange(1, width)[None, :]
    length = mx.array(lengths)[:, None]
    mask = ((positions < length) & (positions >= 3)).astype(mx.float32)  # targets: after a 3-token prompt
    tokens = mx.where(mx.arange(width)[None, :] < length, tokens, 0)
    return tokens, mask
