"""Us against the plain recipe a user would otherwise run (issue 15, item 1), in one run, on the same cores.

- plain: TRL's SFTTrainer then DPOTrainer in one process, with SFTConfig / DPOConfig defaults except what the
  run spec fixes (learning rate, batch, accumulation, warmup, steps, max length, beta, gradient checkpointing,
  seed), the same zone LoRA (PEFT `LoraConfig` from the zone plan), the same conversations and pairs (the topic's
  SFT records and DPO train pairs, with the curriculum's system prompt). DPO continues the SFT adapter, with TRL's
  default reference for a PEFT model (the adapter disabled). Each plain run is a fresh subprocess, so its peak
  RSS is its own.
- ours: `mindprint-ray train` on the same config, topic and steps, one Ray worker holding every core
  (`hardware.profile=cpu`), evaluation off.

The same steps are not the same tokens: SFTConfig's default does not pack, and ours trains what the spec says
(packed rows where `sft.packing` is on), so each side's real tokens trained are printed too.

Both log TRL's `num_tokens` (real, unpadded tokens) at every step. Throughput = tokens of steps 2..N over their
seconds (the first step carries the start-up), per stage and for the topic. Wall = the topic's training:
plain, SFT train + DPO train + saving the adapter; ours, the worker's topic wall time (summary.json: its
training, reference log-probs when precomputed, the adapter saved and published). Peak memory: max RSS of the
plain process, and of our training worker (metrics.jsonl `peak_memory_gb`); on a GPU torch's
max_memory_allocated in both. The sides alternate for `--rounds`; each figure is the median of the rounds, and
each ratio is ours / plain of the medians (goal: throughput >= 1.0x, peak memory <= 1.0x).

Precision. The plain side trains at the precision ours trains the spec at: bf16 mixed precision where `sft.bf16`
is on and the device computes bf16 natively (a GPU from Ampere on, a CPU with AVX512-BF16 or AMX), else fp32.
TRL's configs default to bf16 everywhere (emulated on CPUs without it): where ours trains fp32 (the configs'
`sft.bf16: false`, or a device without bf16) a third side, `plain-bf16`, is that default, unchanged, and ours is
compared with it too. Where ours trains bf16 the two are one, and the third side is not run.

Device: `--profile` is the hardware profile ours trains on (default `cpu`: one worker, every core). On a GPU
machine pass a one-GPU profile (`--profile 1xh100-80gb`); the plain side then trains on that GPU as well.

    .venv/bin/python bench/peer_trl.py                                  # SmolLM2, 1 topic, 3 rounds
    .venv/bin/python bench/peer_trl.py --config configs/tiny-cpu.yaml --rounds 1 --sft-steps 6 --dpo-steps 3
    .venv/bin/python bench/peer_trl.py --profile 1xh100-80gb                 # on a GPU machine
    .venv/bin/python bench/peer_trl.py --set ray.dashboard=false             # ours without Ray's dashboard
    .venv/bin/python bench/peer_trl.py --set sft.bf16=true                   # both in bf16 where the CPU has it
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import _common as c

from mindprint_ray.backends.ray_torch.precision import native_bf16
from mindprint_ray.backends.ray_torch.trainer_args import mixed_bf16, trainer_args
from mindprint_ray.curriculum.chat_template import with_system
from mindprint_ray.curriculum.validation import validate_run
from mindprint_ray.models.tiny import ensure_run_model
from mindprint_ray.planning.run_plan import RunPlan, load_run

STAGES = ("sft", "dpo")


def overrides(opts) -> list[str]:
    """The run spec both sides train: the config with the bench's topic, steps and one worker on every core."""
    return [
        f"curriculum.topics=[{opts.topic}]",
        f"sft.max_steps={opts.sft_steps}",
        f"dpo.steps_per_topic={opts.dpo_steps}",
        f"hardware.profile={opts.profile}",
        "eval.enabled=false",
        "report_to=[none]",
        *opts.set,
    ]


# ---- the plain recipe (a subprocess) ------------------------------------------------------------------------


# the run spec's fields of a stage that the plain recipe takes over from the worker's arguments (trainer_args);
# the rest stays at SFTConfig's / DPOConfig's defaults
SPEC_FIELDS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "warmup_steps",
    "max_length",
    "gradient_checkpointing",
    "seed",
    "use_cpu",
)


def plain_args(run: RunPlan, stage: str, out_dir: str, gpu: bool, trl_precision: bool) -> dict:
    """A plain stage's config fields: the spec's (as the worker reads them), steps, no saving, a log every step;
    the worker's precision unless `trl_precision` leaves TRL's default (bf16)."""
    ours = trainer_args(run.spec, stage, out_dir, gpu, None, native_bf16(gpu))
    fields = {k: ours[k] for k in SPEC_FIELDS} | {"output_dir": out_dir}
    fields.update(logging_steps=1, save_strategy="no", report_to="none")
    fields["max_steps"] = run.spec.sft.max_steps if stage == "sft" else run.spec.dpo.steps_per_topic
    if not trl_precision:
        fields["bf16"] = ours["bf16"]
    return fields


def plain_child(config: str, extra: list[str], out_file: str, trl_precision: bool) -> None:
    """One plain TRL run of the topic: SFT then DPO; writes the step logs, wall and peak memory as JSON. With
    `trl_precision`, TRL's default precision (bf16), else the spec's as ours trains it."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from mindprint_ray.backends.ray_torch.callbacks import peak_memory_gb
    from mindprint_ray.backends.ray_torch.datasets import dpo_dataset

    c.quiet()
    run = load_run(config, extra)
    topic = validate_run(run)[0][0]
    system = run.spec.curriculum.system_prompt
    sft_rows = [{"messages": with_system(r.data["messages"], system)} for r in topic.sft]
    step_logs: dict[str, list[dict]] = {s: [] for s in STAGES}

    class StepLogs(TrainerCallback):
        def __init__(self, stage: str) -> None:
            self.stage = stage

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs and "train_runtime" not in logs:
                step_logs[self.stage].append({"time": time.time(), "step": state.global_step, **logs})

    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(run.model_path)
    model = AutoModelForCausalLM.from_pretrained(run.model_path, dtype=torch.float32)  # both: fp32 master weights
    lora = LoraConfig(**run.zones.peft_kwargs(explicit_list=run.spec.lora.target == "list"))
    gpu = run.profile.use_gpu and torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="peer-trl-") as tmp:
        t0 = time.time()
        sft = SFTTrainer(
            model=model,
            args=SFTConfig(**plain_args(run, "sft", f"{tmp}/sft", gpu, trl_precision)),
            train_dataset=Dataset.from_list(sft_rows),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[StepLogs("sft")],
        )
        sft.train()
        dpo = DPOTrainer(
            model=sft.model,
            args=DPOConfig(**plain_args(run, "dpo", f"{tmp}/dpo", gpu, trl_precision), beta=run.spec.dpo.beta),
            train_dataset=dpo_dataset(topic.dpo_train, system),
            processing_class=tokenizer,
            callbacks=[StepLogs("dpo")],
        )
        dpo.train()
        dpo.model.save_pretrained(f"{tmp}/adapter")
        wall = time.time() - t0
    Path(out_file).write_text(json.dumps({"logs": step_logs, "wall_s": wall, "peak_gb": peak_memory_gb()}))


def plain(opts, extra: list[str], trl_precision: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="peer-plain-") as tmp:
        out = Path(tmp) / "plain.json"
        cmd = [sys.executable, __file__, "--plain-child", str(out), "--config", opts.config]
        cmd += ["--trl-precision"] * trl_precision + ["--", *extra]
        subprocess.run(cmd, check=True, cwd=c.ROOT, stdout=subprocess.DEVNULL)  # TRL prints every log dict
        return json.loads(out.read_text())


# ---- ours: mindprint-ray train -------------------------------------------------------------------------------


def ours(opts, extra: list[str], index: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="peer-ours-") as tmp:
        name = f"peer-{index}"
        cmd = [sys.executable, "-m", "mindprint_ray", "train", opts.config, "--name", name, f"storage.path={tmp}"]
        subprocess.run([*cmd, *extra], check=True, cwd=c.ROOT, stdout=subprocess.DEVNULL)
        run_dir = Path(tmp) / name
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
    logs = {s: [r for r in rows if r.get("stage") == s and "num_tokens" in r] for s in STAGES}
    peak = max(r["peak_memory_gb"] for s in STAGES for r in logs[s])
    return {"logs": logs, "wall_s": summary["topics"][opts.topic]["wall_s"], "peak_gb": peak}


# ---- figures ------------------------------------------------------------------------------------------------


def throughput(rows: list[dict]) -> tuple[float, float]:
    """(real tokens, seconds) of steps 2..N: the first logged step carries the stage's start-up."""
    if len(rows) < 2:
        return 0.0, 0.0
    return rows[-1]["num_tokens"] - rows[0]["num_tokens"], rows[-1]["time"] - rows[0]["time"]


def figures(result: dict) -> dict:
    out = {"wall_s": result["wall_s"], "peak_gb": result["peak_gb"]}
    tokens = seconds = 0.0
    for stage in STAGES:
        n, t = throughput(result["logs"][stage])
        out[f"{stage}_tok_s"] = n / t if t else float("nan")
        out[f"{stage}_steps"] = len(result["logs"][stage])
        out[f"{stage}_tokens"] = result["logs"][stage][-1]["num_tokens"] if result["logs"][stage] else 0
        tokens, seconds = tokens + n, seconds + t
    out["tok_s"] = tokens / seconds if seconds else float("nan")
    out["tokens"] = out["sft_tokens"] + out["dpo_tokens"]
    return out


def summarise(rounds: list[dict], sides: list[str]) -> dict:
    keys = [k for k in rounds[0]["ours"] if not k.endswith("_steps")]
    med = {side: {k: statistics.median(r[side][k] for r in rounds) for k in keys} for side in sides}
    ratios = {side: {k: med["ours"][k] / med[side][k] for k in keys} for side in sides if side != "ours"}
    return {"median": med, "ratio": ratios, "rounds": rounds}


LABELS = [
    ("tok_s", "real tok/s (SFT+DPO)"),
    ("sft_tok_s", "SFT real tok/s"),
    ("dpo_tok_s", "DPO real tok/s"),
    ("tokens", "real tokens trained (SFT+DPO)"),
    ("wall_s", "topic wall s"),
    ("peak_gb", "peak memory GB"),
]


def report(out: dict, setup: dict) -> None:
    sides, plains = setup["sides"], [s for s in setup["sides"] if s != "ours"]
    print(
        f"# {setup['config']}, topic {setup['topic']}, profile {setup['profile']}: {setup['sft_steps']} SFT + "
        f"{setup['dpo_steps']} DPO steps, {setup['rounds']} rounds ({', '.join(sides)} in turn), "
        f"{os.cpu_count()} CPU cores"
    )
    rows = []
    for k, label in LABELS:
        row = {"what": label, **{side: f"{out['median'][side][k]:.3f}" for side in sides}}
        row.update({f"/{side}": f"{out['ratio'][side][k]:.3f}x" for side in plains})
        row["per round"] = "; ".join("/".join(f"{r[side][k]:.2f}" for side in sides) for r in out["rounds"])
        rows.append(row)
    columns = [("what", "median"), *[(side, SIDE_NAMES[side]) for side in sides]]
    columns += [(f"/{side}", f"ours / {side}") for side in plains]
    c.print_table(rows, [*columns, ("per round", f"per round {'/'.join(sides)}")])
    for side in plains:
        r = out["ratio"][side]
        print(
            f"PEER RATIOS (ours / {SIDE_NAMES[side]}): throughput {r['tok_s']:.3f}x (goal >= 1.0), peak memory "
            f"{r['peak_gb']:.3f}x (goal <= 1.0), topic wall {r['wall_s']:.3f}x"
        )


SIDE_NAMES = {
    "plain": "plain TRL",
    "plain-bf16": "plain TRL, its default bf16",
    "ours": "mindprint-ray",
}


def trains_bf16(run: RunPlan) -> bool:
    """Whether ours trains bf16 mixed precision here (the worker's rule), TRL's default."""
    import torch

    return mixed_bf16(run.spec, native_bf16(run.profile.use_gpu and torch.cuda.is_available()))


def run_side(side: str, opts, extra: list[str], index: int) -> dict:
    if side == "ours":
        return figures(ours(opts, extra, index))
    return figures(plain(opts, extra, trl_precision=side == "plain-bf16"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/smollm2-cpu.yaml")
    p.add_argument("--topic", default="capitulation")
    p.add_argument("--profile", default="cpu", help="the hardware profile ours trains on (a one-GPU one on a GPU)")
    p.add_argument("--sft-steps", type=int, default=16)
    p.add_argument("--dpo-steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more spec overrides for every side")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--plain-child", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--trl-precision", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.plain_child:
        plain_child(opts.config, opts.extra, opts.plain_child, opts.trl_precision)
        return 0
    extra = overrides(opts)
    run: RunPlan = load_run(opts.config, extra)
    ensure_run_model(run)  # SmolLM2 is converted once (mindprint-ray sample-model), before either side starts
    sides = ["plain", "ours"] if trains_bf16(run) else ["plain", "plain-bf16", "ours"]
    rounds = []
    for i in range(opts.rounds):
        rounds.append({side: run_side(side, opts, extra, i) for side in sides})
        for side in sides:
            print(f"round {i + 1} {side}: {rounds[-1][side]}", flush=True)
    out = summarise(rounds, sides)
    setup = {"config": opts.config, "topic": opts.topic, "profile": opts.profile, "sides": sides}
    setup.update(sft_steps=opts.sft_steps, dpo_steps=opts.dpo_steps, rounds=opts.rounds)
    report(out, setup)
    if opts.json:
        Path(opts.json).write_text(json.dumps({"setup": setup, **out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
