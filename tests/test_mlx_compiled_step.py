"""local_mlx's compiled stage (run_stage) trains as the plain eager loop it replaced: the same losses, gradient norms
(averaged over accumulation, then clipped), DPO rewards, token counts and final weights, step by step."""

import pytest
from mlx_tiny import padded_batch, tiny_model

TOL = 1e-5
REFERENCE = (-40.0, -35.0, -42.0, -30.0)


def batches(stage: str):
    """The same endless sequence of padded micro-batches, of two widths (two traces of the compiled step)."""
    import mlx.core as mx

    i = 0
    while True:
        tokens, mask = padded_batch(width=23 if i % 3 else 31, seed=i)
        args = (tokens, mask, mx.array(REFERENCE)) if stage == "dpo" else (tokens, mask)
        yield args, int(tokens.size)
        i += 1


def loss_fn(stage: str):
    from local_mlx.losses import dpo_loss, sft_loss

    if stage == "dpo":
        return lambda model, tokens, mask, reference: dpo_loss(model, tokens, mask, reference, 0.1, 8)
    return lambda model, tokens, mask: sft_loss(model, tokens, mask, 8)


def eager_loop(model, cfg, stage: str) -> list[dict]:
    """The loop as it was before compilation: value_and_grad per micro-batch, mean, clip, AdamW update."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    from local_mlx.stage import dpo_metrics, make_optimizer

    optimizer = make_optimizer(cfg)
    value_and_grad = nn.value_and_grad(model, loss_fn(stage))
    source, history, total = batches(stage), [], 0
    for _ in range(cfg.steps):
        grads, outputs = None, []
        for _ in range(cfg.accumulation):
            args, n = next(source)
            out, g = value_and_grad(model, *args)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            outputs.append(out)
            total += n
        grads, norm = optim.clip_grad_norm(tree_map(lambda g: g / cfg.accumulation, grads), cfg.max_grad_norm)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        record = {"loss": sum(o[0].item() for o in outputs) / len(outputs), "grad_norm": norm.item()}
        record["num_tokens"] = total
        history.append({**record, **(dpo_metrics(outputs) if stage == "dpo" else {})})
    return history


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_compiled_stage_equals_the_eager_loop(stage):
    from mlx.utils import tree_flatten

    from local_mlx.stage import StageConfig, dpo_metrics, no_metrics, run_stage

    cfg = StageConfig("t", stage, 4, 2, 5e-3, warmup_steps=1, max_grad_norm=0.05, dropout=False)
    compiled, eager = tiny_model("qwen2", lora=True), tiny_model("qwen2", lora=True)
    metrics = dpo_metrics if stage == "dpo" else no_metrics
    result = run_stage(compiled, cfg, batches(stage), loss_fn(stage), metrics, lambda r: None)
    expected = eager_loop(eager, cfg, stage)
    assert len(result.history) == cfg.steps
    assert max(r["grad_norm"] for r in expected) > cfg.max_grad_norm  # clipping is exercised
    for got, want in zip(result.history, expected):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=TOL, rel=TOL), key
    weights, reference = dict(tree_flatten(compiled.trainable_parameters())), tree_flatten(eager.trainable_parameters())
    assert all(abs(weights[k] - v).max().item() < TOL for k, v in reference)
    first = dict(tree_flatten(tiny_model("qwen2", lora=True).trainable_parameters()))
    assert any(abs(weights[k] - first[k]).max().item() > 1e-4 for k in first)  # it trained
