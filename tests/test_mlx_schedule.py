"""The MLX learning-rate curve is the Ray path's: step k of local_mlx's run_stage applies the learning rate that
transformers' scheduler (get_scheduler with the spec's type, warmup and steps) gives the k-th optimizer step, and
MLX's AdamW updates as torch's."""

import pytest
from conftest import ROOT

LR = 1e-2


def hf_curve(scheduler: str, warmup: int, steps: int, lr: float = LR) -> list[float]:
    """The learning rate of each optimizer step as HF's Trainer applies it (the scheduler steps after each)."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = get_scheduler(scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    curve = []
    for _ in range(steps):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return curve


def linear_batches():
    import mlx.core as mx

    x = mx.array([[1.0, -2.0, 0.5, 3.0]])
    while True:
        yield (x,), 4


def square_loss(model, x):
    return ((model(x) - 1.0) ** 2).mean(), None


def mlx_curve(cfg) -> list[float]:
    """The learning rate each step of the real run_stage applied, as it logs it."""
    import mlx.nn as nn

    from local_mlx.stage import no_metrics, run_stage

    result = run_stage(nn.Linear(4, 2), cfg, linear_batches(), square_loss, no_metrics, lambda r: None)
    return [r["learning_rate"] for r in result.history]


CASES = [
    ("linear", 0, 10),
    ("linear", 3, 10),
    ("linear", 12, 8),  # warmup longer than the stage: the peak is never reached
    ("cosine", 4, 12),
    ("cosine", 0, 7),
    ("constant", 5, 6),  # transformers' constant ignores the warmup
    ("constant_with_warmup", 3, 8),
]


@pytest.mark.parametrize("scheduler,warmup,steps", CASES)
def test_run_stage_applies_the_transformers_curve(scheduler, warmup, steps):
    from local_mlx.stage import StageConfig, lr_at

    cfg = StageConfig("t", "sft", steps, 1, LR, warmup, scheduler)
    expected = hf_curve(scheduler, warmup, steps)
    assert mlx_curve(cfg) == pytest.approx(expected, rel=1e-6, abs=1e-6 * LR)
    assert [lr_at(k, cfg) for k in range(steps)] == pytest.approx(expected, rel=1e-6, abs=1e-6 * LR)
    if warmup and scheduler != "constant":
        assert expected[0] == 0.0  # the warmup starts at 0 in both


def test_first_warmup_step_leaves_the_weights_and_accumulation_averages():
    import mlx.core as mx
    import mlx.nn as nn

    from local_mlx.stage import StageConfig, no_metrics, run_stage

    model = nn.Linear(4, 2)
    before = mx.array(model.weight)
    cfg = StageConfig("t", "sft", 1, 2, LR, warmup_steps=3, weight_decay=0.1)
    run_stage(model, cfg, linear_batches(), square_loss, no_metrics, lambda r: None)
    assert mx.array_equal(model.weight, before)  # step 1 applies lr 0 (and no weight decay)
    cfg = StageConfig("t", "sft", 2, 2, LR, warmup_steps=1)
    result = run_stage(model, cfg, linear_batches(), square_loss, no_metrics, lambda r: None)
    assert not mx.array_equal(model.weight, before) and result.history[-1]["num_tokens"] == 2 * 2 * 4


def test_spec_schedules_match_the_ray_trainer_arguments(tmp_path):
    """For the same spec, MLX's SFT and DPO stages use the scheduler type, warmup and steps that the Ray path gives
    transformers (SFTConfig's lr_scheduler_type from sft.scheduler; DPOConfig's default, linear)."""
    from trl import DPOConfig

    from local_mlx.stage import lr_at
    from local_mlx.training import Trainer
    from mindprint_ray.backends.ray_torch.trainer_args import trainer_args
    from mindprint_ray.planning.run_plan import load_run

    for sft_scheduler in ("cosine", "linear"):
        run = load_run(
            ROOT / "configs" / "tiny-mlx.yaml",
            [f"sft.scheduler={sft_scheduler}", "sft.warmup_steps=4", "dpo.warmup_steps=2", "sft.max_steps=12"],
        )
        mlx = Trainer(run, model=None, tokenizer=None, log=lambda r: None)
        dpo_default = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]).lr_scheduler_type
        hf_type = {"sft": run.spec.sft.scheduler, "dpo": str(getattr(dpo_default, "value", dpo_default))}
        for stage, cfg in (("sft", mlx.sft_config("x", 40)), ("dpo", mlx.dpo_config("x"))):
            args = trainer_args(run.spec, stage, str(tmp_path), False, None, False)
            steps = run.spec.sft.max_steps if stage == "sft" else run.spec.dpo.steps_per_topic
            assert cfg.steps == steps and cfg.learning_rate == args["learning_rate"]
            expected = hf_curve(hf_type[stage], args["warmup_steps"], steps, args["learning_rate"])
            assert [lr_at(k, cfg) for k in range(steps)] == pytest.approx(expected, rel=1e-6, abs=1e-6 * LR), stage


def test_mlx_adamw_updates_as_torch_adamw():
    """Same weights, same gradients: three AdamW steps (weight decay, bias correction) agree within 1e-6."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    import torch

    from local_mlx.stage import StageConfig, make_optimizer

    w0 = np.array([[0.3, -0.2, 0.1, 0.5], [0.0, 0.4, -0.6, 0.2]], np.float32)
    x = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
    cfg = StageConfig("t", "sft", 3, 1, LR, 0, "constant", weight_decay=0.1)

    model = nn.Linear(4, 2, bias=False)
    model.weight = mx.array(w0)
    optimizer = make_optimizer(cfg)
    grad = nn.value_and_grad(model, lambda m: ((m(mx.array(x)) - 1.0) ** 2).mean())
    for _ in range(3):
        _, g = grad(model)
        optimizer.update(model, g)

    w = torch.nn.Parameter(torch.tensor(w0))
    torch_opt = torch.optim.AdamW([w], lr=LR, weight_decay=0.1)
    for _ in range(3):
        torch_opt.zero_grad()
        ((torch.tensor(x) @ w.T - 1.0) ** 2).mean().backward()
        torch_opt.step()
    assert np.abs(np.array(model.weight) - w.detach().numpy()).max() < 1e-6
