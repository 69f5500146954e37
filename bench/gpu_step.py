"""Time the worker's real SFT and DPO training steps on Qwen2.5 architectures with random weights (no download).

For each registry model (qwen2.5-0.5b, qwen2.5-7b, and as many layers of qwen2.5-72b as the memory model says fit
on this GPU), quantization (BF16 LoRA, QLoRA NF4), attention (SDPA, flash-attn 2 when installed), gradient
checkpointing (on/off), sequence length (2048/4096) and batch shape (SFT packed padding-free, SFT padded, DPO):
the model is built with random weights, the zone plan is applied with the worker's `apply_zone_plan`, and TRL's
`SFTTrainer` / `DPOTrainer` run with the worker's own arguments (`trainer_args` plus the fields of
`Worker.run_sft` / `Worker.run_dpo`). Each optimizer step is timed between device synchronisations
(`torch.cuda.synchronize`), after `--warmup` steps; the table shows the median of `--repeats` steps.

FLOPs accounting (model FLOPs of real tokens; padding is not counted):
  N    = matmul parameters: decoder linear weights + lm_head (vocab x hidden, counted even when tied) + LoRA A/B.
  A(l) = causal attention forward per token of a sequence of l tokens = 2 matmuls (QK^T, AV) x 2 FLOPs per
         multiply-add x (l/2 mean context) x (heads x head_dim) x layers = 2 * layers * heads * head_dim * l.
         (The full, non-causal square would be 4 * layers * l * heads * head_dim.)
  SFT token, LoRA = 2N forward + 2N backward (activation gradients only: the base is frozen, no weight gradients)
         [+ 2N recompute with gradient checkpointing] + A(l) forward + 2 A(l) backward [+ A(l) recompute]
         = 4N + 3A(l), or 6N + 4A(l) with gradient checkpointing.
  DPO token = the SFT token's FLOPs on chosen and rejected, + 2N + A(l) for the reference forward (TRL's "ref"
         adapter) unless reference log-probs are precomputed.
  l is the length of each packed document (padding-free packing attends within documents), of each padded row's
  real tokens, or of each DPO sequence. This is `mindprint_ray.planning.time_model.train_flops_per_token`
  (the estimates' accounting); `--smoke` checks that both agree and compares them with torch's FlopCounterMode
  on a tiny model.
  Achieved TFLOP/s = accounted FLOPs of a step / step time; MFU = achieved / the GPU's dense BF16 peak.

Step time includes everything in the trainer's step: data collation, forward, backward, clipping, AdamW, logging.
Peak memory is torch.cuda.max_memory_allocated during the case; the estimate is `mindprint_ray.planning.memory`'s total
(which also counts ~1.5 GB of CUDA context and 5% fragmentation that the allocator does not see).

    python bench/gpu_step.py --smoke                         # CPU, tiny shapes, accounting checks (< 1 min)
    python bench/gpu_step.py --json gpu_step.json            # the full matrix on one GPU
    python bench/gpu_step.py --models qwen2.5-7b --quant nf4 --seq 4096 --repeats 5
"""

from __future__ import annotations

import argparse
import gc as pygc
import importlib.util
import json
import math
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

from mindprint_ray.backends.ray_torch.model_loading import apply_zone_plan
from mindprint_ray.planning.memory import MemoryInputs, estimate_memory
from mindprint_ray.planning.registry import ModelArch, get_arch
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.planning.time_model import forward_flops_per_token, matmul_params, train_flops_per_token
from mindprint_ray.planning.zones import build_plan

# Dense BF16 peak per device, TFLOP/s (vendor data sheets; H200 has H100 SXM's compute). Longest match first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))
DEFAULT_QUANT, DEFAULT_SEQ = ["bf16", "nf4"], [2048, 4096]
COLUMNS = [
    ("model", "model"),
    ("layers", "layers"),
    ("quant", "quant"),
    ("attn", "attn"),
    ("stage", "stage"),
    ("batch", "batch"),
    ("gc", "ckpt"),
    ("seq", "seq"),
    ("step_s", "step s"),
    ("tokens_per_s", "tok/s"),
    ("tflops", "TFLOP/s"),
    ("mfu_pct", "MFU %"),
    ("pad_pct", "pad %"),
    ("peak_gb", "peak GB"),
    ("estimate_gb", "est. GB"),
    ("status", "status"),
]


@dataclass(frozen=True)
class Case:
    model: str
    arch: ModelArch
    quant: str
    attn: str
    gc: bool
    seq: int
    stage: str
    packing: bool


# ---- FLOPs accounting ---------------------------------------------------------------------------------------


def attention_forward(arch: ModelArch, length: float) -> float:
    """Causal attention forward FLOPs per token of a sequence of `length` tokens (see the module docstring)."""
    return 2 * arch.num_layers * arch.num_heads * arch.head_dim * length


def flops_per_token(n_matmul: int, arch: ModelArch, length: float, gc: bool, stage: str, reference: bool) -> float:
    """This script's accounting, written out: (4N or 6N) + (3 or 4) A(l), plus 2N + A(l) for a DPO reference."""
    linear_passes = 3 if gc else 2  # forward, activation-gradient backward, (recompute)
    total = linear_passes * 2 * n_matmul + (linear_passes + 1) * attention_forward(arch, length)
    if stage == "dpo" and reference:
        total += 2 * n_matmul + attention_forward(arch, length)
    return total


def step_flops(n_matmul: int, arch: ModelArch, docs: list[int], gc: bool, stage: str, reference: bool) -> float:
    """Accounted FLOPs of one step: every sequence's tokens times its per-token FLOPs."""
    return sum(n * flops_per_token(n_matmul, arch, n, gc, stage, reference) for n in docs)


def project_flops_per_token(
    arch: ModelArch, trainable: int, length: float, gc: bool, stage: str, reference: bool
) -> float:
    """The same quantity from the estimates' time model (`mindprint_ray.planning.time_model`)."""
    total = train_flops_per_token(arch, trainable, length, gc)
    if stage == "dpo" and reference:
        total += forward_flops_per_token(arch, trainable, length)
    return total


def live_matmul_params(model) -> int:
    """N counted on the instantiated model: in x out of every Linear (NF4 ones too), LoRA "default" A/B included."""
    from torch import nn

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".ref" not in name:
            total += module.in_features * module.out_features
    return total


# ---- sizing ---------------------------------------------------------------------------------------------------


def memory_estimate(
    arch: ModelArch, quant: str, trainable: int, seq: int, batch: int, gc: bool, stage: str, gpu: bool
) -> float:
    """Estimated peak GB of one device (mindprint_ray.planning.memory) for this case."""
    m = MemoryInputs(
        quant=quant,
        backend="ray",
        trainable_params=trainable,
        seq_len=seq,
        micro_batch=batch,
        gradient_checkpointing=gc,
        zero_stage=0,
        devices=1,
        is_gpu=gpu,
        sequences_per_example=2 if stage == "dpo" else 1,
        activation_bytes=2 if gpu else 4,
    )
    return estimate_memory(arch, m).total


def layers_that_fit(arch: ModelArch, quant: str, seq: int, batch: int, gc: bool, capacity_gb: float) -> int:
    """The most layers (a multiple of 4, so the zones are exact quarters) whose DPO step at `seq` fits, by estimate."""
    for k in range(arch.num_layers - arch.num_layers % 4, 3, -4):
        a = replace(arch, num_layers=k)
        trainable = build_plan(a, "conservative").trainable_params()
        if memory_estimate(a, quant, trainable, seq, batch, gc, "dpo", True) <= capacity_gb:
            return k
    return 0


def device_info(peak_override: float | None) -> dict:
    """The device the benchmark runs on, its memory and its dense BF16 peak (None when unknown: no MFU)."""
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "name": platform.processor() or "cpu", "memory_gb": None, "peak_tflops": peak_override}
    props = torch.cuda.get_device_properties(0)
    peak = peak_override or next((v for k, v in PEAK_TFLOPS if k in props.name), None)
    return {"device": "cuda", "name": props.name, "memory_gb": props.total_memory / 1e9, "peak_tflops": peak}


# ---- data -----------------------------------------------------------------------------------------------------


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def sft_data(seq: int, examples: int, vocab: int, seed: int):
    """Pre-tokenized chat-like examples: lengths log-uniform in [seq/32, seq], the first quarter masked as prompt."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(examples):
        n = log_uniform(rng, max(8, seq // 32), seq)
        prompt = max(1, n // 4)
        rows.append(
            {
                "input_ids": [rng.randrange(3, vocab) for _ in range(n)],
                "assistant_masks": [0] * prompt + [1] * (n - prompt),
            }
        )
    return Dataset.from_list(rows)


def dpo_data(tokenizer, seq: int, pairs: int, seed: int):
    """Plain-text preference pairs decoded from random tokens: prompt up to seq/4, answers up to 3/4 seq."""
    from datasets import Dataset

    rng = random.Random(seed)
    vocab = len(tokenizer)

    def text(n: int) -> str:
        return tokenizer.decode([rng.randrange(3, vocab) for _ in range(n)], skip_special_tokens=True)

    lo = max(4, seq // 64)
    return Dataset.from_list(
        [
            {
                "prompt": text(log_uniform(rng, lo, seq // 4)),
                "chosen": text(log_uniform(rng, lo, 3 * seq // 4)),
                "rejected": text(log_uniform(rng, lo, 3 * seq // 4)),
            }
            for _ in range(pairs)
        ]
    )


def examples_needed(case: Case, steps: int, batch: int) -> int:
    """Enough examples for `steps` optimizer steps (packed rows hold ~seq / mean length examples)."""
    if not case.packing:
        return steps * batch + 2
    lo = max(8, case.seq // 32)
    mean = (case.seq - lo) / math.log(case.seq / lo)
    return int(steps * batch * case.seq / mean * 1.5) + 4


# ---- one case -------------------------------------------------------------------------------------------------


def make_trainer(model, run: RunPlan, case: Case, tokenizer, steps: int, out_dir: Path, gpu: bool, log: c.StepLog):
    """The worker's trainer for this stage (run_sft / run_dpo fields), with a step timer attached."""
    from trl import DPOConfig, DPOTrainer

    if case.stage == "sft":
        data = sft_data(case.seq, examples_needed(case, steps, run.spec.sft.batch_size), case.arch.vocab_size, steps)
        # pre-tokenized data carry the assistant mask, as the worker's datasets do
        return c.sft_trainer(run, model, tokenizer, data, case.packing, steps, out_dir, log, gpu)
    d = run.spec.dpo
    common = c.worker_args(run, "dpo", out_dir, gpu)
    common.update(max_steps=steps)
    # auto (the default) resolves to False here: steps x batch + 2 pairs are never revisited (dpo_reference.py)
    args = DPOConfig(**common, beta=d.beta, precompute_ref_log_probs=d.precompute_ref_log_probs is True)
    data = dpo_data(tokenizer, case.seq, steps * d.batch_size + 2, seed=steps)
    trainer = c.timed_trainer(DPOTrainer)(
        model=model,
        ref_model=None,
        args=args,
        processing_class=tokenizer,
        train_dataset=data,
        callbacks=[c.step_timer(log)],
    )
    trainer.step_log = log
    return trainer


def run_case(model, run: RunPlan, case: Case, tokenizer, opts, dev: dict) -> dict:
    """Train warmup + repeats steps of one case and summarise the timed ones (or record the failure)."""
    import torch

    from mindprint_ray.backends.ray_torch.topic_loop import drop_reference_adapter

    gpu = dev["device"] == "cuda"
    batch = run.spec.sft.batch_size if case.stage == "sft" else run.spec.dpo.batch_size
    trainable = run.zones.trainable_params()
    row = {
        "model": case.model,
        "layers": case.arch.num_layers,
        "quant": case.quant,
        "attn": case.attn,
        "stage": case.stage + ("-packed" if case.packing else "-padded" if case.stage == "sft" else ""),
        "batch": batch,
        "gc": "on" if case.gc else "off",
        "seq": case.seq,
        "estimate_gb": memory_estimate(case.arch, case.quant, trainable, case.seq, batch, case.gc, case.stage, gpu),
    }
    log = c.StepLog(sync=torch.cuda.synchronize if gpu else None)
    trainer = None
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-step-") as tmp:
            trainer = make_trainer(model, run, case, tokenizer, opts.warmup + opts.repeats, Path(tmp), gpu, log)
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
        row.update(summarise(log.timed(opts.warmup), model, run, case, dev))
        if gpu:
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
        model.zero_grad(set_to_none=True)
    finally:
        if case.stage == "dpo":
            drop_reference_adapter(model)
        del trainer
        pygc.collect()
        if gpu:
            torch.cuda.empty_cache()
    return row


def summarise(steps: list[c.StepRecord], model, run: RunPlan, case: Case, dev: dict) -> dict:
    """Median step time, tokens/s and TFLOP/s over the timed steps; MFU against the device's peak."""
    if not steps:
        return {"status": "no timed steps"}
    n = live_matmul_params(model)
    reference = run.spec.dpo.precompute_ref_log_probs is not True  # as make_trainer resolves it
    flops = [step_flops(n, case.arch, s.doc_lengths, case.gc, case.stage, reference) for s in steps]
    tflops = c.median([f / s.seconds for f, s in zip(flops, steps)]) / 1e12
    real, computed = sum(s.real_tokens for s in steps), sum(s.computed_tokens for s in steps)
    peak = dev["peak_tflops"]
    return {
        "step_s": c.median([s.seconds for s in steps]),
        "tokens_per_s": c.median([s.real_tokens / s.seconds for s in steps]),
        "tflops": tflops,
        "mfu_pct": 100 * tflops / peak if peak else None,
        "pad_pct": 100 * (1 - real / computed) if computed else None,
        "real_tokens_per_step": real / len(steps),
        "timed_steps": len(steps),
        "flops_per_step": sum(flops) / len(flops),
    }


# ---- the matrix -----------------------------------------------------------------------------------------------


def bench_arch(name: str, quant: str, opts, dev: dict) -> ModelArch | None:
    """The registry architecture, cut to the layers that fit for a model bigger than the device (72B)."""
    arch = get_arch(name)
    if opts.layers:
        return replace(arch, num_layers=min(opts.layers, arch.num_layers))
    if dev["memory_gb"] is None:
        return arch
    k = layers_that_fit(arch, quant, max(opts.seq), 1, True, dev["memory_gb"])
    return replace(arch, num_layers=k) if k else None


def attentions(opts, gpu: bool) -> list[str]:
    """SDPA always; flash-attn 2 when installed and on a CUDA GPU (what the worker's pick_attention would choose)."""
    if opts.attn:
        return opts.attn
    out = ["sdpa"]
    if gpu and importlib.util.find_spec("flash_attn") is not None:
        out.append("flash_attention_2")
    return out


def run_matrix(opts, dev: dict) -> list[dict]:
    gpu = dev["device"] == "cuda"
    tokenizer = load_tokenizer()
    rows = []
    for name in opts.models:
        for quant in opts.quant:
            arch = bench_arch(name, quant, opts, dev)
            if arch is None:
                rows.append({"model": name, "quant": quant, "status": "no layers fit"})
                continue
            for attn in attentions(opts, gpu):
                for gc in opts.gc:
                    t0 = time.perf_counter()
                    run = c.run_with_arch(spec_for(name, quant, attn, gc, opts.seq[0], opts, gpu), arch)
                    model = apply_zone_plan(c.build_random_model(run, "cuda" if gpu else "cpu", attn), run, gc)
                    print(
                        f"# built {name} ({arch.num_layers} layers, {quant}, {attn}, ckpt {'on' if gc else 'off'}) "
                        f"in {time.perf_counter() - t0:.1f} s",
                        flush=True,
                    )
                    for seq in opts.seq:
                        case_run = c.run_with_arch(spec_for(name, quant, attn, gc, seq, opts, gpu), arch)
                        for stage, packing in opts.shapes:
                            case = Case(name, arch, quant, attn, gc, seq, stage, packing)
                            rows.append(run_case(model, case_run, case, tokenizer, opts, dev))
                            if opts.verbose:
                                c.print_table(rows[-1:], COLUMNS)
                    del model
                    release(gpu)
    return rows


def spec_for(name: str, quant: str, attn: str, gc: bool, seq: int, opts, gpu: bool):
    return c.bench_spec(
        name, quant, attn=attn, gc=gc, seq=seq, batch=opts.batch, gpu=gpu, profile="1xh100-80gb" if gpu else "cpu"
    )


def release(gpu: bool) -> None:
    import torch

    pygc.collect()
    if gpu:
        torch.cuda.empty_cache()


def load_tokenizer():
    """The tiny model's tokenizer (ChatML, pad token set): the data are random tokens, so any tokenizer serves."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(c.tiny_model_dir()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ---- smoke: the accounting checked two (three) ways -------------------------------------------------------------


def check_accounting() -> list[str]:
    """Compare the accounting with the time model and with torch's FlopCounterMode on a tiny zone-LoRA model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    lines = []
    arch = get_arch("tiny")
    spec = c.bench_spec("tiny", "fp32", attn="eager", gc=True, seq=128, gpu=False, profile="cpu")
    run = c.run_with_arch(spec)
    model = apply_zone_plan(c.build_random_model(run, "cpu", "eager"), run, True)
    trainable = run.zones.trainable_params()
    n_live = live_matmul_params(model)
    n_reg = matmul_params(arch, trainable)
    assert n_live == n_reg, f"matmul params: live model {n_live} != registry {n_reg}"
    lines.append(f"N (matmul params) live model = registry = {n_live}")
    for gc in (False, True):
        for stage in ("sft", "dpo"):
            mine = flops_per_token(n_live, arch, 128, gc, stage, True)
            theirs = project_flops_per_token(arch, trainable, 128, gc, stage, True)
            assert math.isclose(mine, theirs, rel_tol=1e-12), (gc, stage, mine, theirs)
            lines.append(
                f"FLOPs/token {stage} ckpt={'on' if gc else 'off'} l=128: script {mine:.6g} = time_model {theirs:.6g}"
            )
    seq = 64
    ids = torch.randint(3, arch.vocab_size, (1, seq))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(input_ids=ids, use_cache=False)
    expected = seq * (2 * n_live + 2 * attention_forward(arch, seq))  # eager computes the full square: 2x causal
    assert fc.get_total_flops() == expected, (fc.get_total_flops(), expected)
    lines.append(f"forward FLOPs counted by torch {fc.get_total_flops()} = 2N*T + full-square attention {expected}")
    model.train()
    with FlopCounterMode(display=False) as fc:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    head = arch.vocab_size * arch.hidden_size
    # exact for frozen base + LoRA with checkpointing: linears 3 passes (fwd, grad-input, recompute), lm_head 2 (it is
    # outside the checkpointed layers), LoRA 4 (+ weight grads); attention 4x its full-square forward
    exact = seq * (6 * (n_live - head - trainable) + 4 * head + 8 * trainable + 8 * attention_forward(arch, seq))
    counted = fc.get_total_flops()
    assert 0.97 < counted / exact <= 1.0, (counted, exact)
    stated = seq * (flops_per_token(n_live, arch, seq, True, "sft", True) + 4 * attention_forward(arch, seq))
    lines.append(
        f"train step (ckpt on) FLOPs counted by torch {counted} = {counted / exact:.4f} x the exact count "
        f"{exact} (torch's non-reentrant checkpoint stops recomputing after the last saved tensor, so a "
        f"layer's trailing matmul is not recomputed); the stated 6N accounting (full-square attention) is "
        f"{stated / counted:.4f} x torch's count (lm_head is not recomputed; LoRA weight grads add 2N_lora)"
    )
    return lines


def smoke(opts) -> int:
    """Tiny shapes on CPU through the same code, then the accounting checks; exit 1 on any failure.

    fp32 (what CPU runs train in) over every stage and checkpointing setting, plus one NF4 case for the
    bitsandbytes path; `--quant`/`--seq`/`--stages` narrow or widen it."""
    dev = device_info(None)
    dev.update(device="cpu", memory_gb=None)
    opts.models, opts.seq = ["tiny"], opts.seq if opts.seq != DEFAULT_SEQ else [64]
    opts.warmup, opts.repeats = min(opts.warmup, 1), min(opts.repeats, 2)
    t0 = time.perf_counter()
    rows = []
    for quant in opts.quant if opts.quant != DEFAULT_QUANT else ["fp32", "nf4"]:
        narrow = quant == "nf4" and opts.quant == DEFAULT_QUANT
        sub = argparse.Namespace(
            **{
                **vars(opts),
                "quant": [quant],
                "gc": [True] if narrow else opts.gc,
                "shapes": [("sft", True)] if narrow else opts.shapes,
            }
        )
        rows += run_matrix(sub, dev)
    print_report(rows, dev, opts)
    bad = [r for r in rows if r.get("status") != "ok" or not r.get("tokens_per_s") or not r.get("tflops")]
    for line in check_accounting():
        print("ACCOUNTING OK:", line)
    print(f"SMOKE {'FAILED' if bad else 'OK'}: {len(rows)} cases in {time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if bad else 0


def print_report(rows: list[dict], dev: dict, opts) -> None:
    import torch

    print(
        f"\n# device: {dev['name']} ({dev['device']}), peak dense BF16: {dev['peak_tflops'] or 'unknown'} TFLOP/s; "
        f"torch {torch.__version__}; warmup {opts.warmup}, median of {opts.repeats} steps"
    )
    print(
        "# FLOPs: (4N or 6N with ckpt) + (3 or 4) x causal attention 2*layers*heads*head_dim*l per token; "
        "DPO + 2N + attention for the reference forward; real tokens only"
    )
    c.print_table(rows, COLUMNS)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU and the accounting checks")
    p.add_argument("--models", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b"])
    p.add_argument("--quant", nargs="+", default=DEFAULT_QUANT, choices=["bf16", "nf4", "fp32"])
    p.add_argument(
        "--attn",
        nargs="+",
        choices=["sdpa", "flash_attention_2", "eager"],
        help="default: sdpa, plus flash_attention_2 when flash-attn is installed",
    )
    p.add_argument("--seq", nargs="+", type=int, default=DEFAULT_SEQ)
    p.add_argument(
        "--gc",
        nargs="+",
        type=lambda v: v in ("on", "1", "true"),
        default=[True, False],
        help="gradient checkpointing: on off",
    )
    p.add_argument(
        "--stages", nargs="+", default=["sft-packed", "sft-padded", "dpo"], choices=["sft-packed", "sft-padded", "dpo"]
    )
    p.add_argument("--batch", type=int, default=1, help="per-device batch (the spec default is 1)")
    p.add_argument("--layers", type=int, help="force this many layers (default: all, or what fits for 72B)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, help="dense BF16 peak of the device (default: from its name)")
    p.add_argument("--json", help="write the rows and the device to this file")
    p.add_argument("--verbose", action="store_true", help="print each row as it finishes")
    opts = p.parse_args(argv)
    opts.shapes = [(s.split("-")[0], s == "sft-packed") for s in opts.stages]
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    c.quiet()
    if opts.smoke:
        return smoke(opts)
    dev = device_info(opts.peak_tflops)
    rows = run_matrix(opts, dev)
    print_report(rows, dev, opts)
    if opts.json:
        Path(opts.json).write_text(json.dumps({"device": dev, "meta": meta(argv), "rows": rows}, indent=1, default=str))
    return 0


def meta(argv: list[str] | None) -> dict:
    """What produced the figures: command, date, library versions, the FLOPs accounting."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "command": " ".join(["python", "bench/gpu_step.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        **{p: v(p) for p in ("torch", "transformers", "trl", "peft", "bitsandbytes", "flash-attn")},
        "flops": "SFT token: 4N + 3A(l), 6N + 4A(l) with checkpointing; DPO + 2N + A(l) reference forward; "
        "A(l) = 2*layers*heads*head_dim*l; real tokens only",
    }


if __name__ == "__main__":
    sys.exit(main())
