"""Tokens/s of local_mlx's training step compiled (`mx.compile`, as mlx-lm's trainer) against the same step with
compilation switched off (`mx.disable_compile()`), in one run, on this machine's MLX device (CPU with mlx[cpu]).

Both modes run local_mlx's own `run_stage` (stage.py) with its own losses (losses.py) on the model loaded by
`load_for_training` with the spec's zone plan: the tiny model (configs/tiny-mlx.yaml) and SmolLM2-135M-Instruct
(configs/smollm2-mlx.yaml, models/smollm2). Cases:

  fixed      SFT and DPO steps on random token rows of one shape (--seq tokens, --batch rows; DPO: --batch pairs),
             `--warmup` steps (the first one traces the compiled graph), then `--steps` timed steps
  curriculum (tiny model only) the real SFT of the first topic of the sample curriculum (Trainer.train_sft):
             real examples padded to local_mlx's width buckets, so the compiled step traces once per shape;
             the whole stage is timed, tracing included

The modes alternate for `--rounds` rounds; figures are medians over rounds. tokens/s counts real tokens (no
padding) over the timed steps' wall time as run_stage measures it; the ratio is compiled / uncompiled.

    python bench/mlx_compile.py                         # tiny + SmolLM2, a few minutes on 2 CPU cores
    python bench/mlx_compile.py --models tiny --rounds 1   # a quick check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from local_mlx.losses import dpo_loss, sft_loss
from local_mlx.model import load_for_training
from local_mlx.stage import StageConfig, dpo_metrics, no_metrics, run_stage
from local_mlx.training import Trainer
from mindprint_ray.curriculum.validation import validate_run
from mindprint_ray.planning.run_plan import load_run

CONFIGS = {"tiny": "configs/tiny-mlx.yaml", "smollm2": "configs/smollm2-mlx.yaml"}
SHAPES = {"tiny": (128, 4), "smollm2": (32, 1)}  # (seq, batch) of the fixed case by default


def set_compile(enabled: bool) -> None:
    import mlx.core as mx

    mx.enable_compile() if enabled else mx.disable_compile()


def fixed_batches(vocab: int, rows: int, seq: int, dpo: bool, seed: int):
    """Endless random rows of seq + 1 tokens (seq targets each), as local_mlx's batches: (loss args, tokens)."""
    import mlx.core as mx

    key = mx.random.key(seed)
    tokens = mx.random.randint(1, vocab, (2 * rows if dpo else rows, seq + 1), key=key).astype(mx.int32)
    mask = mx.ones((tokens.shape[0], seq))
    args = (tokens, mask, mx.full((tokens.shape[0],), -3.0 * seq)) if dpo else (tokens, mask)
    while True:
        yield args, tokens.size


def fixed_round(model, vocab: int, stage: str, opts, seq: int, batch: int) -> dict:
    dpo = stage == "dpo"
    cfg = StageConfig("bench", stage, opts.warmup + opts.steps, 1, 1e-4, dropout=not dpo)
    loss = (lambda m, t, k, r: dpo_loss(m, t, k, r, 0.1)) if dpo else sft_loss
    result = run_stage(
        model, cfg, fixed_batches(vocab, batch, seq, dpo, 0), loss, dpo_metrics if dpo else no_metrics, lambda r: 0
    )
    return measured(result.history, opts.warmup)


def measured(history: list[dict], warmup: int) -> dict:
    """Real tokens/s over the steps after `warmup`, the first step's seconds, the stage's peak memory."""
    timed = history[warmup:]
    tokens = [r["num_tokens"] - (history[i - 1]["num_tokens"] if i else 0) for i, r in enumerate(history)]
    seconds = [n / r["tokens_per_s"] for n, r in zip(tokens, history)]
    return {
        "tokens_per_s": sum(tokens[warmup:]) / sum(seconds[warmup:]) if timed else float("nan"),
        "first_step_s": seconds[0],
        "peak_gb": max(r["peak_memory_gb"] for r in history),
    }


def curriculum_round(run, model, tokenizer, steps: int) -> dict:
    topic = validate_run(run)[0][0]
    trainer = Trainer(run, model, tokenizer, lambda r: 0)
    start = time.perf_counter()
    result = trainer.train_sft(topic, max_steps=steps)
    wall = time.perf_counter() - start
    return {
        "tokens_per_s": result.history[-1]["num_tokens"] / wall,
        "first_step_s": measured(result.history, 0)["first_step_s"],
        "peak_gb": max(r["peak_memory_gb"] for r in result.history),
    }


def compare(label: str, one_round, rounds: int) -> dict:
    """Uncompiled and compiled alternating for `rounds` rounds: medians per mode and the ratio."""
    runs = {False: [], True: []}
    for _ in range(rounds):
        for compiled in (False, True):
            set_compile(compiled)
            runs[compiled].append(one_round())
    set_compile(True)
    med = {c: {k: statistics.median(r[k] for r in runs[c]) for k in runs[c][0]} for c in runs}
    row = {
        "case": label,
        "eager_tok_s": med[False]["tokens_per_s"],
        "compiled_tok_s": med[True]["tokens_per_s"],
        "ratio": med[True]["tokens_per_s"] / med[False]["tokens_per_s"],
        "eager_first_s": med[False]["first_step_s"],
        "compiled_first_s": med[True]["first_step_s"],
        "eager_peak_gb": med[False]["peak_gb"],
        "compiled_peak_gb": med[True]["peak_gb"],
    }
    print_row(row)
    return row


HEADER = (
    "| case | eager tok/s | compiled tok/s | ratio | eager 1st step s | compiled 1st step s | eager peak GB "
    "| compiled peak GB |\n|---|---:|---:|---:|---:|---:|---:|---:|"
)


def print_row(r: dict) -> None:
    print(
        f"| {r['case']} | {r['eager_tok_s']:.1f} | {r['compiled_tok_s']:.1f} | {r['ratio']:.2f}x "
        f"| {r['eager_first_s']:.2f} | {r['compiled_first_s']:.2f} | {r['eager_peak_gb']:.3f} "
        f"| {r['compiled_peak_gb']:.3f} |",
        flush=True,
    )


def main(argv=None) -> None:
    import mlx.core as mx

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per fixed round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per fixed round (the first one traces)")
    p.add_argument("--curriculum-steps", type=int, default=12)
    p.add_argument("--seq", type=int, help="tokens per row of the fixed case (default per model)")
    p.add_argument("--batch", type=int, help="rows (DPO: pairs) of the fixed case (default per model)")
    opts = p.parse_args(argv)
    print(f"mlx {mx.__version__}, device {mx.default_device()}, {opts.rounds} rounds, medians")
    print(HEADER)
    for name in opts.models:
        run = load_run(ROOT / CONFIGS[name])
        model, tokenizer = load_for_training(run)
        seq, batch = opts.seq or SHAPES[name][0], opts.batch or SHAPES[name][1]
        for stage in ("sft", "dpo"):
            rows = f"{batch} {'pairs' if stage == 'dpo' else 'rows'} x {seq}"
            one = partial(fixed_round, model, run.arch.vocab_size, stage, opts, seq, batch)
            compare(f"{name} {stage} fixed {rows}", one, opts.rounds)
        if name == "tiny":
            label = f"tiny sft curriculum ({opts.curriculum_steps} steps, batch {run.spec.sft.batch_size})"
            compare(label, partial(curriculum_round, run, model, tokenizer, opts.curriculum_steps), opts.rounds)


if __name__ == "__main__":
    main()
