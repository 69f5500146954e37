"""Peak memory of the log-probs at the loss of SFT and DPO on SmolLM2-135M-Instruct (vocab 49,152), three ways:

- full:  the full-vocabulary logits (logits [N, vocab], log_softmax in fp32, gather: the plain computation, which
         the memory model counted before issue 15);
- trl:   TRL 1.16's fused lm_head with its own tiles (4,096 tokens x 32,768 vocab), what the worker ran before;
- tiled: the worker's trainers now (backends/ray_torch/chunked_logprobs.py): TRL's kernel on smaller tiles
         off Triton (planning/memory.py CPU_TOKEN_TILE x CPU_VOCAB_TILE); on CUDA this is TRL's own path.

Two measurements, each case in a fresh subprocess:
- head: SmolLM2's own lm_head (tied embedding) weight and random hidden states of a step's shape (SFT: seq - 1
  positions, DPO: 2 x (seq - 1)); the log-probs and the backward of their sum. Printed against
  planning.memory.logits_bytes, the memory model's term for the same step.
- step: one optimizer step of TRL's SFTTrainer / DPOTrainer with the worker's trainer arguments (trainer_args) on
  the worker's zone-LoRA SmolLM2 (gradient checkpointing on, the spec's default), one row of exactly seq tokens
  (SFT, a quarter of it masked as prompt) or one pair whose two sides are cut to seq tokens (DPO, the reference
  forward at the step).
Memory: on CPU the peak RSS (VmHWM, reset right before) over the RSS before; on a GPU torch.cuda.max_memory_allocated
over the allocation before (bf16, as the worker trains on GPUs).

    .venv/bin/python bench/logits_memory.py [--seq 512 2048] [--stages sft dpo] [--kinds head step] [--json F]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, print_table, quiet

from mindprint_ray.planning.memory import GB, MemoryInputs, logits_bytes
from mindprint_ray.planning.run_plan import RunPlan, load_run

HEADS = ("full", "trl", "tiled")
MODEL = ROOT / "models" / "smollm2"


# ---- memory ---------------------------------------------------------------------------------------------------


def rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def peak() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


class Meter:
    """Peak memory growth of the block: CUDA allocations on a GPU, the process's resident set on CPU."""

    def __init__(self, gpu: bool):
        self.gpu = gpu

    def __enter__(self):
        import torch

        if self.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = rss()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.gpu:
            torch.cuda.synchronize()
            self.growth = torch.cuda.max_memory_allocated() - self.base
        else:
            self.growth = peak() - self.base
        self.seconds = time.perf_counter() - self.t


# ---- the full-logits head -------------------------------------------------------------------------------------


class FullLogits:
    """Stands in for TRL's ChunkedLogProbFunction in add_fused_lm_head's forward: the whole [N, vocab] logits, the
    log-probs of the targets from their fp32 log_softmax (autograd keeps both for the backward); the metrics TRL
    logs (entropy, mean logit, top-1) from the detached logits."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        import torch

        logits = hidden @ weight.t()
        if bias is not None:
            logits = logits + bias
        logits = logits * (logit_scale / temperature)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logp = torch.log_softmax(logits.float(), -1)
        out = logp.gather(-1, targets[:, None]).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
            mean = logits.float().mean(-1) if "mean_logits" in outputs else None
            top1 = logits.argmax(-1) == targets if "is_top1" in outputs else None
        return out, entropy, None, mean, top1


def use_head(head: str) -> None:
    """Make `head` the function every fused lm_head of this process calls (the bench runs one case a process)."""
    import trl.trainer.utils as fused

    if head == "full":
        fused._ChunkedLogProbFunction = FullLogits


def head_function(head: str):
    from trl.kernels import ChunkedLogProbFunction

    from mindprint_ray.backends.ray_torch.chunked_logprobs import TiledLogProbFunction

    return {"full": FullLogits, "trl": ChunkedLogProbFunction, "tiled": TiledLogProbFunction}[head]


# ---- one case -------------------------------------------------------------------------------------------------


def bench_run(seq: int, gpu: bool) -> RunPlan:
    """configs/smollm2-cpu.yaml at `seq` tokens, gradient checkpointing on, one row / pair per step."""
    return load_run(
        ROOT / "configs" / "smollm2-cpu.yaml",
        [
            f"model.path={MODEL}",
            f"curriculum.data_dir={ROOT / 'data' / 'curriculum'}",
            f"sft.max_seq_length={seq}",
            f"dpo.max_seq_length={seq}",
            "sft.gradient_checkpointing=true",
            "dpo.gradient_checkpointing=true",
            "dpo.batch_size=1",
            f"sft.bf16={str(gpu).lower()}",
            f"hardware.profile={'1xh100-80gb' if gpu else 'cpu-2'}",
            "report_to=[none]",
        ],
    )


def model_inputs(run: RunPlan, stage: str) -> MemoryInputs:
    from mindprint_ray.planning.estimates import memory_inputs

    return memory_inputs(run, stage)


def measure_head(run: RunPlan, stage: str, head: str, gpu: bool) -> dict:
    """The lm_head and log-probs alone, on SmolLM2's own weight and random hidden states of the step's shape."""
    import torch
    from safetensors import safe_open

    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    with safe_open(str(MODEL / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.embed_tokens.weight").to(device, dtype)
    seq = run.spec.stage(stage).max_seq_length
    n = (seq - 1) * (2 if stage == "dpo" else 1)
    gen = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(n, weight.shape[1], generator=gen, device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, weight.shape[0], (n,), generator=gen, device=device)
    fn, outputs = head_function(head), ("log_probs", "entropy", "mean_logits", "is_top1")
    fn.apply(hidden[:8], weight, None, targets[:8], 1.0, 32768, None, 1.0, outputs)[0].sum().backward()  # warm up
    hidden.grad = None
    with Meter(gpu) as m:
        fn.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, outputs)[0].sum().backward()
    return {"measured_gb": m.growth / GB, "seconds": m.seconds}


def sft_rows(seq: int, vocab: int):
    from datasets import Dataset

    ids = [(7 * i) % (vocab - 3) + 3 for i in range(seq)]
    return Dataset.from_list([{"input_ids": ids, "assistant_masks": [0] * (seq // 4) + [1] * (seq - seq // 4)}] * 4)


def dpo_rows(seq: int):
    from datasets import Dataset

    prompt = "Where in the cycle are we now? " * (seq // 32)
    pair = {"prompt": prompt, "chosen": " the daily cycle low is in" * seq, "rejected": " prices go up" * seq}
    return Dataset.from_list([pair] * 4)


def trainer_classes(head: str):
    """The worker's trainers for `tiled`; TRL's own (the worker's before) for `trl` and `full`."""
    if head == "tiled":
        from mindprint_ray.backends.ray_torch.trainers import dpo_trainer_class, sft_trainer_class

        return sft_trainer_class(), dpo_trainer_class()
    from trl import DPOTrainer, SFTTrainer

    return SFTTrainer, DPOTrainer


def measure_step(run: RunPlan, stage: str, head: str, gpu: bool) -> dict:
    """One optimizer step of the worker's SFT or DPO trainer on the zone-LoRA SmolLM2."""
    from transformers import TrainerCallback
    from trl import DPOConfig, SFTConfig

    from mindprint_ray.backends.ray_torch.model_loading import apply_zone_plan, load_base_model, load_tokenizer
    from mindprint_ray.backends.ray_torch.precision import native_bf16
    from mindprint_ray.backends.ray_torch.trainer_args import trainer_args

    use_head(head)
    tokenizer = load_tokenizer(run)
    base, _ = load_base_model(run, "cuda" if gpu else "cpu")
    model = apply_zone_plan(base, run, True)
    seq = run.spec.stage(stage).max_seq_length
    meter = Meter(gpu)

    class OneStep(TrainerCallback):  # the meter spans exactly the optimizer step
        def on_step_begin(self, args, state, control, **kw):
            meter.__enter__()

        def on_step_end(self, args, state, control, **kw):
            meter.__exit__(None, None, None)

    with tempfile.TemporaryDirectory(prefix="logits-memory-") as tmp:
        common = trainer_args(run.spec, stage, tmp, gpu, None, native_bf16(gpu))
        common.update(save_strategy="no", report_to=[], max_steps=1, logging_steps=1)
        sft_class, dpo_class = trainer_classes(head)
        if stage == "sft":
            args = SFTConfig(**common, packing=False, assistant_only_loss=False)
            trainer = sft_class(model=model, args=args, train_dataset=sft_rows(seq, run.arch.vocab_size),
                                processing_class=tokenizer, callbacks=[OneStep()])  # fmt: skip
        else:
            args = DPOConfig(**common, beta=run.spec.dpo.beta)
            trainer = dpo_class(model=model, ref_model=None, args=args, train_dataset=dpo_rows(seq),
                                processing_class=tokenizer, callbacks=[OneStep()])  # fmt: skip
        trainer.train()
    return {"measured_gb": meter.growth / GB, "seconds": meter.seconds, "loss": trainer.state.log_history[0]["loss"]}


def case(stage: str, seq: int, head: str, kind: str) -> dict:
    """Run one case in this process."""
    import torch

    quiet()
    gpu = torch.cuda.is_available()
    if not gpu:
        torch.set_num_threads(2)
    run = bench_run(seq, gpu)
    row = {"stage": stage, "seq": seq, "head": head, "kind": kind, "device": "cuda" if gpu else "cpu"}
    row.update((measure_head if kind == "head" else measure_step)(run, stage, head, gpu))
    if head == "tiled":  # what the memory model says the worker's log-probs take now
        row["model_gb"] = logits_bytes(run.arch, model_inputs(run, stage)) / GB
    return row


# ---- the table ----------------------------------------------------------------------------------------------


def in_subprocess(stage: str, seq: int, head: str, kind: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--case", stage, str(seq), head, kind], capture_output=True, text=True, cwd=ROOT
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return {"stage": stage, "seq": seq, "head": head, "kind": kind, "error": out.stderr.strip()[-400:]}
    return json.loads(lines[-1])


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (kind, stage, seq): each head's peak growth, the ratios to the full logits, the model's term."""
    out = []
    for key in sorted({(r["kind"], r["stage"], r["seq"]) for r in rows}):
        got = {r["head"]: r for r in rows if (r["kind"], r["stage"], r["seq"]) == key}
        line = {"kind": key[0], "stage": key[1], "seq": key[2]}
        for head in HEADS:
            line[f"{head}_gb"] = got.get(head, {}).get("measured_gb")
            line[f"{head}_s"] = got.get(head, {}).get("seconds")
        full = line["full_gb"]
        for head in ("trl", "tiled"):
            line[f"{head}/full"] = line[f"{head}_gb"] / full if full and line[f"{head}_gb"] is not None else None
        tiled = got.get("tiled", {})
        if key[0] == "head" and tiled.get("model_gb") and tiled.get("measured_gb"):
            line["model_gb"] = tiled["model_gb"]
            line["model/measured"] = tiled["model_gb"] / tiled["measured_gb"]
        out.append(line)
    return out


COLUMNS = [
    ("kind", "measure"),
    ("stage", "stage"),
    ("seq", "seq"),
    ("full_gb", "full GB"),
    ("trl_gb", "TRL tiles GB"),
    ("tiled_gb", "ours GB"),
    ("trl/full", "TRL / full"),
    ("tiled/full", "ours / full"),
    ("model_gb", "model GB"),
    ("model/measured", "model / ours"),
    ("full_s", "full s"),
    ("trl_s", "TRL s"),
    ("tiled_s", "ours s"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--stages", nargs="+", default=["sft", "dpo"])
    p.add_argument("--kinds", nargs="+", default=["head", "step"])
    p.add_argument("--heads", nargs="+", default=list(HEADS))
    p.add_argument("--json", type=Path)
    p.add_argument("--case", nargs=4, metavar=("STAGE", "SEQ", "HEAD", "KIND"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.case:
        stage, seq, head, kind = a.case
        print(json.dumps(case(stage, int(seq), head, kind)), flush=True)
        return
    rows = []
    for kind in a.kinds:
        for stage in a.stages:
            for seq in a.seq:
                for head in a.heads:
                    rows.append(in_subprocess(stage, seq, head, kind))
                    print(json.dumps(rows[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    print_table(summarise([r for r in rows if "error" not in r]), COLUMNS)


if __name__ == "__main__":
    main()
