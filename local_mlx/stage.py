"""One training stage (SFT or DPO) on MLX: the step compiled as mlx-lm compiles it, transformers' learning-rate
schedule as an mlx.optimizers schedule, gradient accumulation, clipping, NaN guard, metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from mindprint_ray.runs.stage_history import StageHistory

from .model import set_checkpointing


@dataclass(frozen=True)
class StageConfig:
    topic: str
    stage: str  # "sft" or "dpo"
    steps: int  # optimizer steps
    accumulation: int
    learning_rate: float
    warmup_steps: int = 0
    scheduler: str = "linear"  # cosine, linear, constant, constant_with_warmup (as in transformers)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dropout: bool = True  # LoRA dropout on; off for DPO (as TRL's disable_dropout), so step 1 starts at log 2
    gradient_checkpointing: bool = False  # the stage's own section's setting (RunSpec.stage)
    logging_steps: int = 1  # steps between records written to the log (the NaN guard checks every step)


class StageResult(StageHistory):
    """The MLX stage's history: the shared summary keys of the Ray path."""


def lr_schedule(cfg: StageConfig):
    """transformers' `get_scheduler(cfg.scheduler, warmup_steps, steps)` as an mlx.optimizers schedule.

    MLX's optimizer evaluates the schedule at its step count before incrementing it, so its (k+1)-th update
    applies schedule(k), as the Ray path's LambdaLR applies factor(k) at its (k+1)-th optimizer step: the warmup
    starts at 0 (the first step applies 0) and reaches the peak at step index `warmup_steps`."""
    import mlx.core as mx
    import mlx.optimizers as optim

    lr, warmup = cfg.learning_rate, cfg.warmup_steps

    def constant(_step):
        return mx.array(lr, mx.float32)

    if cfg.scheduler == "constant":  # transformers' constant schedule has no warmup
        return constant
    decay_steps = max(1, cfg.steps - warmup)  # transformers: max(1, num_training_steps - num_warmup_steps)
    after = {
        "cosine": lambda: optim.cosine_decay(lr, decay_steps),
        "linear": lambda: optim.linear_schedule(lr, 0.0, decay_steps),
        "constant_with_warmup": lambda: constant,
    }[cfg.scheduler]()
    if warmup == 0:
        return after
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), after], [warmup])


def lr_at(step: int, cfg: StageConfig) -> float:
    """The learning rate that optimizer step `step` (0-based) applies."""
    import mlx.core as mx

    return lr_schedule(cfg)(mx.array(step, mx.uint64)).item()


def peak_memory_gb() -> float:
    import mlx.core as mx

    return mx.get_peak_memory() / 1e9


@dataclass
class CompiledSteps:
    """The stage's step as mlx-lm's trainer compiles it (model, optimizer and random state as the compiled
    functions' inputs and outputs), in three parts so that the NaN guard can look between them:
    `accumulate(args, grads)` -> (loss_fn outputs, grads + this micro-batch's), `clip(grads)` -> (averaged and
    clipped grads, norm before clipping), `apply(grads)` -> the learning rate the update applied."""

    accumulate: Callable
    clip: Callable
    apply: Callable


def compile_steps(model, optimizer, loss_fn: Callable, cfg: StageConfig) -> CompiledSteps:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    value_and_grad = nn.value_and_grad(model, loss_fn)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def accumulate(args, grads):
        out, g = value_and_grad(model, *args)
        return out, g if grads is None else tree_map(mx.add, grads, g)

    @mx.compile
    def clip(grads):
        return optim.clip_grad_norm(tree_map(lambda g: g / cfg.accumulation, grads), cfg.max_grad_norm)

    @partial(mx.compile, inputs=state, outputs=state)
    def apply(grads):
        optimizer.update(model, grads)
        return optimizer.learning_rate

    return CompiledSteps(accumulate, clip, apply)


def make_optimizer(cfg: StageConfig):
    """AdamW as torch's (the Ray path's): bias-corrected moments (MLX's default omits the correction, which
    makes early updates ~3x larger), the stage's schedule and weight decay."""
    import mlx.optimizers as optim

    return optim.AdamW(learning_rate=lr_schedule(cfg), weight_decay=cfg.weight_decay, bias_correction=True)


def run_stage(
    model,
    cfg: StageConfig,
    batches: Iterator[tuple[tuple, int]],
    loss_fn: Callable,
    extra_metrics: Callable[[list], dict],
    log: Callable[[dict], None],
    progress=None,
) -> StageResult:
    """Train `cfg.steps` optimizer steps. `batches` yields (loss_fn args, tokens); loss_fn returns (loss, ...)."""
    import mlx.core as mx

    set_checkpointing(model, cfg.gradient_checkpointing)
    model.train(cfg.dropout)
    optimizer = make_optimizer(cfg)
    steps = compile_steps(model, optimizer, loss_fn, cfg)
    mx.reset_peak_memory()
    result, total_tokens = StageResult(), 0
    log({"event": "stage_start", "topic": cfg.topic, "stage": cfg.stage, "max_steps": cfg.steps, "step": 0})
    task = progress.add_task(f"{cfg.topic} {cfg.stage}", total=cfg.steps, info="") if progress else None
    for step in range(1, cfg.steps + 1):
        start = time.perf_counter()
        grads, outputs, tokens = None, [], 0
        for _ in range(cfg.accumulation):
            args, n = next(batches)
            out, grads = steps.accumulate(args, grads)
            mx.eval(out, grads)
            outputs.append(out)
            tokens += n
        grads, norm = steps.clip(grads)
        record = {
            "topic": cfg.topic,
            "stage": cfg.stage,
            "step": step,
            "loss": sum(o[0].item() for o in outputs) / len(outputs),
            "grad_norm": norm.item(),
            **extra_metrics(outputs),
        }
        bad = next(((k, record[k]) for k in ("loss", "grad_norm") if not math.isfinite(record[k])), None)
        if bad:  # the update is skipped: the adapter keeps its last finite weights
            result.bad = (bad[0], bad[1], step)
            log({**record, "learning_rate": lr_at(step - 1, cfg)})
            break
        applied = steps.apply(grads)
        mx.eval(model.state, optimizer.state)
        total_tokens += tokens
        record.update(
            learning_rate=applied.item(),
            num_tokens=total_tokens,
            tokens_per_s=tokens / max(time.perf_counter() - start, 1e-9),
            peak_memory_gb=peak_memory_gb(),
        )
        result.history.append(record)
        if step % cfg.logging_steps == 0 or step == cfg.steps:
            log(record)
        if task is not None:
            info = f"loss {record['loss']:.3f}" + (
                f"  reward acc {record['rewards/accuracies']:.2f}" if "rewards/accuracies" in record else ""
            )
            progress.update(task, completed=step, info=info)
    model.eval()
    return result


def dpo_metrics(outputs: list) -> dict:
    """TRL's reward metrics over the step's micro-batches: chosen, rejected, accuracy, margin."""
    import mlx.core as mx

    chosen = mx.concatenate([o[1] for o in outputs])
    rejected = mx.concatenate([o[2] for o in outputs])
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).astype(mx.float32).mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
    }


def no_metrics(_outputs: list) -> dict:
    return {}
