"""DPO step time with the frozen reference scored at every step vs precomputed once, on SmolLM2-135M-Instruct, in
one process with TRL (no Ray).

Both modes are the worker's own DPO trainer (backends/ray_torch/trainers.dpo_trainer_class, TRL's DPOTrainer) with
the worker's trainer arguments from configs/smollm2-cpu.yaml (fp32, batch 2, 512 tokens), on the zone-LoRA
SmolLM2 loaded by the worker's functions and the first sample topic's training pairs (held-out pairs excluded,
as the worker trains). `per-step`: TRL's reference forward inside every step. `precomputed`: every pair scored
once when the trainer is built (FrozenReference.with_reference_logps), no reference forward in the steps. The
modes alternate for --rounds rounds of --warmup + --steps optimizer steps; figures are medians over rounds.

  step s       median optimizer-step time of the timed steps
  build s      trainer construction (tokenization, and for precomputed the scoring of every pair)
  stage s      build s + steps_per_topic x step s: one topic's DPO at the spec's steps (and at the default 100)
The time model's ratio (planning/time_model.py: the policy's training FLOPs over those plus a 2N reference
forward, at the topic's mean pair length) is printed beside the measured one.

    .venv/bin/python bench/reference_logprobs.py [--steps 6 --warmup 1 --rounds 3] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import _common as c

from mindprint_ray.planning.dpo_reference import run_precomputes
from mindprint_ray.planning.run_plan import RunPlan, load_run
from mindprint_ray.planning.step_budget import global_batch
from mindprint_ray.planning.time_model import forward_flops_per_token, train_flops_per_token
from mindprint_ray.planning.topic_tokens import count_topic_tokens

MODES = ("per-step", "precomputed")
DEFAULT_STEPS = 100  # dpo.steps_per_topic's default: a second stage figure at it


def bench_run(topic: str) -> RunPlan:
    return load_run(
        c.ROOT / "configs" / "smollm2-cpu.yaml",
        [
            f"model.path={c.ROOT / 'models' / 'smollm2'}",
            f"curriculum.data_dir={c.ROOT / 'data' / 'curriculum'}",
            f"curriculum.topics=[{topic}]",
            "report_to=[none]",
        ],
    )


def measure(run: RunPlan, topic, precompute: bool, steps: int, warmup: int) -> dict:
    """One round of one mode on a fresh worker model."""
    from trl import DPOConfig

    from mindprint_ray.backends.ray_torch import datasets as ds
    from mindprint_ray.backends.ray_torch.trainers import dpo_trainer_class

    tokenizer, model = c.worker_model(run)
    log = c.StepLog()
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        common = c.worker_args(run, "dpo", Path(tmp), False)
        common.update(max_steps=warmup + steps)
        t0 = time.perf_counter()
        trainer = c.timed_trainer(dpo_trainer_class())(
            model=model,
            ref_model=None,
            args=DPOConfig(**common, beta=run.spec.dpo.beta),
            processing_class=tokenizer,
            train_dataset=ds.dpo_dataset(topic.dpo_train, run.spec.curriculum.system_prompt),
            callbacks=[c.step_timer(log)],
            reference=run.spec.dpo.reference,
            precompute=precompute,
        )
        build = time.perf_counter() - t0
        trainer.step_log = log
        trainer.train()
    timed = log.timed(warmup)
    return {
        "build_s": build,
        "step_s": statistics.median(s.seconds for s in timed),
        "real_tokens_per_s": sum(s.real_tokens for s in timed) / sum(s.seconds for s in timed),
        "loss": trainer.state.log_history[-1].get("train_loss"),
    }


def model_ratio(run: RunPlan) -> float:
    """The time model's step time precomputed / per-step: policy FLOPs over policy + reference forward FLOPs."""
    t = count_topic_tokens(run)[0][0]
    trainable, length = run.zones.trainable_params(), t.mean_dpo_length
    policy = train_flops_per_token(run.arch, trainable, length, run.spec.dpo.gradient_checkpointing)
    return policy / (policy + forward_flops_per_token(run.arch, trainable, length))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topic", default="cycle_basics")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    c.quiet()
    import torch

    torch.set_num_threads(2)
    run = bench_run(a.topic)
    topics, _, _ = c.validate_run(run)
    topic = topics[0]
    d, batch = run.spec.dpo, global_batch(run, "dpo")
    pairs = len(topic.dpo_train)
    print(
        f"{a.topic}: {pairs} training pairs; the spec's {d.steps_per_topic} steps x global batch {batch} "
        f"({run.num_workers} workers) consume {d.steps_per_topic * batch}: auto precomputes: "
        f"{run_precomputes(run, pairs)}; here one process, batch {d.batch_size} x {d.gradient_accumulation}",
        flush=True,
    )
    rounds = {m: [] for m in MODES}
    for r in range(a.rounds):
        for mode in MODES:
            rounds[mode].append(measure(run, topic, mode == "precomputed", a.steps, a.warmup))
            print(json.dumps({"round": r, "mode": mode, **rounds[mode][-1]}), flush=True)
    rows = []
    for mode in MODES:
        row = {"mode": mode, **{k: statistics.median(x[k] for x in rounds[mode]) for k in ("build_s", "step_s")}}
        row["stage_s"] = row["build_s"] + d.steps_per_topic * row["step_s"]
        row["stage_100_s"] = row["build_s"] + DEFAULT_STEPS * row["step_s"]
        rows.append(row)
    per_step, pre = rows
    pre["step ratio"] = pre["step_s"] / per_step["step_s"]
    pre["stage ratio"] = pre["stage_s"] / per_step["stage_s"]
    pre["stage ratio at 100"] = pre["stage_100_s"] / per_step["stage_100_s"]
    pre["model ratio"] = model_ratio(run)
    columns = [(k, k.replace("_s", " s")) for k in ("mode", "build_s", "step_s", "stage_s", "stage_100_s")]
    columns += [(k, k) for k in ("step ratio", "stage ratio", "stage ratio at 100", "model ratio")]
    c.print_table(rows, columns)
    if a.json:
        a.json.write_text(json.dumps({"rounds": rounds, "summary": rows}, indent=1))


if __name__ == "__main__":
    main()
