"""Peak memory of one MLX training forward+backward with full-vocabulary logits against chunked log-probs
(local_mlx/losses.py), on SmolLM2-135M-Instruct (vocab 49,152, tied embeddings), in one run.

Each case runs in a fresh process: the model loaded by `load_for_training` (configs/smollm2-mlx.yaml, fp32, the
zone plan's LoRA), then one micro-batch of the training step as run_stage runs it (`compile_steps(...).accumulate`:
loss and LoRA gradients, compiled; `--eager` switches compilation off) with local_mlx's own `sft_loss` (one row)
or `dpo_loss` (one pair: two rows) on random tokens. Figures:

  step peak GB   mx.get_peak_memory() after the step minus mx.get_active_memory() before it (model + LoRA):
                 what the step itself adds at its peak (activations, logits, gradients)
  max RSS GB     the process's max resident set (getrusage), model and runtime included
  fp32 logits GB rows x seq x vocab x 4 bytes: one full fp32 copy of the logits, for scale

    python bench/mlx_logits_memory.py                              # SFT 512 and 2048, DPO 512 (~30-45 min, 2 cores)
    python bench/mlx_logits_memory.py --cases sft:512 dpo:2048     # pick cases
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from local_mlx.losses import LOGITS_CHUNK, dpo_loss, sft_loss
from local_mlx.model import load_for_training
from local_mlx.stage import StageConfig, compile_steps, make_optimizer
from mindprint_ray.planning.run_plan import load_run

CONFIG = ROOT / "configs" / "smollm2-mlx.yaml"


def one_case(stage: str, seq: int, chunk: int | None) -> dict:
    """One forward+backward of the training step in this process; returns the figures."""
    import mlx.core as mx

    run = load_run(CONFIG)
    model, _ = load_for_training(run)
    dpo = stage == "dpo"
    rows = 2 if dpo else 1
    tokens = mx.random.randint(1, run.arch.vocab_size, (rows, seq + 1), key=mx.random.key(0)).astype(mx.int32)
    mask = mx.ones((rows, seq))
    cfg = StageConfig("bench", stage, 1, 1, 1e-4, dropout=not dpo)  # LoRA dropout on for SFT, off for DPO
    if dpo:
        args = (tokens, mask, mx.full((rows,), -10.8 * seq))  # near the random model's log-probs

        def loss(m, t, k, r):
            return dpo_loss(m, t, k, r, 0.1, chunk)
    else:
        args = (tokens, mask)

        def loss(m, t, k):
            return sft_loss(m, t, k, chunk)

    model.train(cfg.dropout)
    steps = compile_steps(model, make_optimizer(cfg), loss, cfg)
    mx.eval(model.parameters(), *args)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    start = time.perf_counter()
    out, grads = steps.accumulate(args, None)
    mx.eval(out, grads)
    seconds = time.perf_counter() - start
    return {
        "stage": stage,
        "seq": seq,
        "chunk": chunk,
        "loss": out[0].item(),
        "step_peak_gb": (mx.get_peak_memory() - before) / 1e9,
        "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "fp32_logits_gb": rows * seq * run.arch.vocab_size * 4 / 1e9,
        "seconds": seconds,
    }


def in_subprocess(stage: str, seq: int, chunk: int | None, eager: bool) -> dict:
    args = [sys.executable, __file__, "--one", stage, str(seq), str(chunk or 0)] + (["--eager"] if eager else [])
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["sft:512", "sft:2048", "dpo:512"], help="stage:seq")
    p.add_argument("--chunk", type=int, default=LOGITS_CHUNK)
    p.add_argument("--eager", action="store_true", help="mx.disable_compile(): the step uncompiled")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.eager:
        import mlx.core as mx

        mx.disable_compile()
    if opts.one:
        stage, seq, chunk = opts.one
        print(json.dumps(one_case(stage, int(seq), int(chunk) or None)))
        return
    import mlx.core as mx

    mode = "eager" if opts.eager else "compiled"
    print(f"mlx {mx.__version__}, {mx.default_device()}, SmolLM2-135M fp32 + zone LoRA, chunk {opts.chunk}, {mode}")
    print(
        "| stage | rows x seq | fp32 logits GB | step peak GB full | chunked | ratio | max RSS GB full | chunked "
        "| s full | s chunked | loss full | loss chunked |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in opts.cases:
        stage, seq = case.split(":")
        full = in_subprocess(stage, int(seq), None, opts.eager)
        chunked = in_subprocess(stage, int(seq), opts.chunk, opts.eager)
        rows = 2 if stage == "dpo" else 1
        print(
            f"| {stage} | {rows} x {seq} | {full['fp32_logits_gb']:.3f} | {full['step_peak_gb']:.3f} "
            f"| {chunked['step_peak_gb']:.3f} | {chunked['step_peak_gb'] / full['step_peak_gb']:.2f}x "
            f"| {full['max_rss_gb']:.2f} | {chunked['max_rss_gb']:.2f} | {full['seconds']:.1f} "
            f"| {chunked['seconds']:.1f} | {full['loss']:.6g} | {chunked['loss']:.6g} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
