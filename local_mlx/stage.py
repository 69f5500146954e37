"""One training stage (SFT or DPO) on MLX: LR schedule, gradient accumulation, clipping, NaN guard, metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


def lr_at(step: int, cfg: StageConfig) -> float:
    """The learning rate of optimizer step `step` (0-based), as transformers' schedulers shape it."""
    warmup = cfg.warmup_steps if cfg.scheduler != "constant" else 0
    if step < warmup:
        return cfg.learning_rate * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    if cfg.scheduler == "cosine":
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.scheduler == "linear":
        return cfg.learning_rate * (1 - progress)
    return cfg.learning_rate


def peak_memory_gb() -> float:
    import mlx.core as mx

    return mx.get_peak_memory() / 1e9


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
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    set_checkpointing(model, cfg.gradient_checkpointing)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    optimizer = optim.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
    mx.reset_peak_memory()
    model.train(cfg.dropout)
    result, total_tokens = StageResult(), 0
    log({"event": "stage_start", "topic": cfg.topic, "stage": cfg.stage, "max_steps": cfg.steps, "step": 0})
    task = progress.add_task(f"{cfg.topic} {cfg.stage}", total=cfg.steps, info="") if progress else None
    for step in range(1, cfg.steps + 1):
        start = time.perf_counter()
        grads, outputs, tokens = None, [], 0
        for _ in range(cfg.accumulation):
            args, n = next(batches)
            out, g = value_and_grad(model, *args)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(out, grads)
            outputs.append(out)
            tokens += n
        grads = tree_map(lambda g: g / cfg.accumulation, grads)
        grads, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        loss = sum(o[0].item() for o in outputs) / len(outputs)
        record = {
            "topic": cfg.topic,
            "stage": cfg.stage,
            "step": step,
            "loss": loss,
            "grad_norm": norm.item(),
            "learning_rate": lr_at(step - 1, cfg),
            **extra_metrics(outputs),
        }
        bad = next(((k, record[k]) for k in ("loss", "grad_norm") if not math.isfinite(record[k])), None)
        if bad:  # the update is skipped: the adapter keeps its last finite weights
            result.bad = (bad[0], bad[1], step)
            log(record)
            break
        optimizer.learning_rate = record["learning_rate"]
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        total_tokens += tokens
        record.update(
            num_tokens=total_tokens,
            tokens_per_s=tokens / max(time.perf_counter() - start, 1e-9),
            peak_memory_gb=peak_memory_gb(),
        )
        result.history.append(record)
        if step % cfg.logging_steps == 0 or step == cfg.steps:
            log(record)
        if task is not None:
            info = f"loss {loss:.3f}" + (
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
