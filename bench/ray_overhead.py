"""Steady-state SFT step time under Ray Train (1 worker, TorchTrainer) vs the same TRL loop in one plain process.

The loop is the worker's SFT on the tiny model (`configs/tiny-cpu.yaml`, every sample topic, packing on, batch 1):
`load_base_model` + `apply_zone_plan`, the worker's dataset and SFTTrainer arguments. It runs in this process,
then inside a 1-worker `TorchTrainer` on a local Ray cluster (gloo process group, Ray's worker environment),
then in this process again (`--rounds` times that pattern), with the same number of torch threads. Each run
times every optimizer step after `--warmup`; the ratio is median Ray step time / median plain step time.
Cluster start and model loading are not part of a step: this is the steady-state overhead.

    python bench/ray_overhead.py                 # ~1-2 minutes on 2 CPU cores (most of it Ray's start-up)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import _common as c

from mindprint_ray.backends.ray_torch.driver import WORKER_ENV


def sft_loop(config: dict) -> dict:
    """The timed loop (here or in a Ray worker): the worker's tiny-model SFT; returns every step's seconds."""
    if config["bench_dir"] not in sys.path:
        sys.path.insert(0, config["bench_dir"])
    import _common as common
    import torch

    common.quiet()
    torch.set_num_threads(config["threads"])
    run = common.tiny_run(["sft.batch_size=1", "sft.gradient_accumulation=1", "sft.packing=true"])
    tokenizer, model = common.worker_model(run)
    data = common.curriculum_sft_data(run)
    log = common.StepLog()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        trainer = common.sft_trainer(
            run, model, tokenizer, data, True, config["warmup"] + config["steps"], Path(tmp), log
        )
        trainer.train()
    timed = log.timed(config["warmup"])
    return {
        "step_s": [s.seconds for s in timed],
        "tokens": [s.real_tokens for s in timed],
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "distributed": torch.distributed.is_available() and torch.distributed.is_initialized(),
    }


def ray_entry(config: dict) -> None:
    """Ray Train worker: run the loop and write its step times where the driver reads them (one local node;
    Train V2 keeps a report's metrics only with a checkpoint)."""
    import ray.train

    result = sft_loop(config)
    Path(config["out_file"]).write_text(json.dumps(result))
    ray.train.report({"steps": len(result["step_s"])})


def under_ray(config: dict, storage: str) -> dict:
    """One 1-worker TorchTrainer run of the loop; returns the worker's report."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_file = Path(storage) / f"worker-{time.time_ns()}.json"
    trainer = TorchTrainer(
        ray_entry,
        train_loop_config={**config, "out_file": str(out_file)},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": config["threads"]}),
        run_config=RunConfig(name=f"ray-overhead-{time.time_ns()}", storage_path=storage),
    )
    trainer.fit()
    return json.loads(out_file.read_text())


def start_ray() -> None:
    """A local cluster (never a stale one), with the environment the project's driver gives its workers."""
    import ray

    ray.init(
        address="local",
        include_dashboard=False,
        num_cpus=os.cpu_count(),
        log_to_driver=False,
        runtime_env={"env_vars": WORKER_ENV},
    )


def summarise(plain: list[dict], ray_runs: list[dict]) -> dict:
    """Medians over all timed steps of each kind, and their ratio."""
    p = [s for r in plain for s in r["step_s"]]
    q = [s for r in ray_runs for s in r["step_s"]]
    tok_p = sum(sum(r["tokens"]) for r in plain) / sum(p)
    tok_q = sum(sum(r["tokens"]) for r in ray_runs) / sum(q)
    return {
        "plain_median_step_s": statistics.median(p),
        "ray_median_step_s": statistics.median(q),
        "ratio_median": statistics.median(q) / statistics.median(p),
        "ratio_mean": (sum(q) / len(q)) / (sum(p) / len(p)),
        "plain_tokens_per_s": tok_p,
        "ray_tokens_per_s": tok_q,
        "plain_steps": len(p),
        "ray_steps": len(q),
        "ray_worker_distributed": all(r.get("distributed") for r in ray_runs),
        "per_run_median_s": {
            "plain": [statistics.median(r["step_s"]) for r in plain],
            "ray": [statistics.median(r["step_s"]) for r in ray_runs],
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1, help="plain, Ray, plain ... repeated")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the cpu-2 profile's 1 per worker)")
    p.add_argument("--json", help="write the figures to this file")
    opts = p.parse_args(argv)
    c.quiet()
    import ray

    config = {"steps": opts.steps, "warmup": opts.warmup, "threads": opts.threads, "bench_dir": str(BENCH)}
    c.tiny_model_dir()  # build once, before any worker needs it
    plain, ray_runs = [sft_loop(config)], []
    start_ray()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-storage-") as storage:
            for _ in range(opts.rounds):
                ray_runs.append(under_ray(config, storage))
                plain.append(sft_loop(config))
    finally:
        ray.shutdown()
    out = summarise(plain, ray_runs)
    out["setup"] = {k: v for k, v in config.items() if k != "bench_dir"} | {"rounds": opts.rounds}
    report(out)
    if opts.json:
        Path(opts.json).write_text(json.dumps(out, indent=1))
    return 0


def report(out: dict) -> None:
    s = out["setup"]
    print(
        f"# tiny model, sample curriculum, packed SFT batch 1, {s['threads']} thread(s), {s['warmup']} warm-up + "
        f"{s['steps']} timed steps per run; runs: plain, then (Ray, plain) x {s['rounds']}"
    )
    rows = [
        {
            "where": "plain process",
            "step": out["plain_median_step_s"],
            "tok": out["plain_tokens_per_s"],
            "runs": ", ".join(f"{x:.4f}" for x in out["per_run_median_s"]["plain"]),
            "n": out["plain_steps"],
        },
        {
            "where": "Ray Train, 1 worker",
            "step": out["ray_median_step_s"],
            "tok": out["ray_tokens_per_s"],
            "runs": ", ".join(f"{x:.4f}" for x in out["per_run_median_s"]["ray"]),
            "n": out["ray_steps"],
        },
    ]
    c.print_table(
        rows,
        [
            ("where", "where"),
            ("step", "median step s"),
            ("tok", "real tok/s"),
            ("runs", "median per run"),
            ("n", "steps"),
        ],
    )
    print(
        f"RAY OVERHEAD RATIO (median step, Ray / plain): {out['ratio_median']:.3f} (goal <= 1.05); "
        f"mean-based {out['ratio_mean']:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
