"""Estimated vs measured peak memory and step time for tiny real LoRA trainings (transformers + PEFT, no Ray).

Each case runs in a fresh subprocess: a random-weight Qwen2-shaped model, the zone-LoRA conservative plan, AdamW,
a few training steps on random tokens. On CPU, memory is the growth of the process's max RSS over its RSS before
the first step (LoRA states + activations + transients); on a GPU it is torch.cuda.max_memory_allocated over the
allocation before the first step, with bf16 autocast. Step time is the mean of the steps after the first.

    .venv/bin/python bench/estimate_accuracy.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from mindprint_ray.planning.hardware import get_profile
from mindprint_ray.planning.memory import MemoryInputs, estimate_memory
from mindprint_ray.planning.registry import arch_from_hf_config
from mindprint_ray.planning.time_model import train_flops_per_token
from mindprint_ray.planning.zones import build_plan

CONFIG = dict(
    model_type="qwen2",
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=16000,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


CASES = [(128, 1), (512, 1), (1024, 1), (128, 4), (512, 4), (1024, 2)]
STEPS = 4


def bench_plan():
    """The zone plan every case trains: conservative, r=8, alpha=16, no dropout, on the CONFIG architecture."""
    return build_plan(arch_from_hf_config(CONFIG, "bench", "bench"), "conservative", None, 8, 16, 0.0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(seq: int, batch: int, checkpointing: bool) -> dict:
    """Run one case in this process; returns measured peak bytes over the pre-step baseline and step seconds."""
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    gpu = torch.cuda.is_available()
    torch.manual_seed(0)
    plan = bench_plan()
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG, use_cache=False))
    model = get_peft_model(model.to(torch.bfloat16 if gpu else torch.float32), LoraConfig(**plan.peft_kwargs()))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    device = "cuda" if gpu else "cpu"
    model.to(device).train()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq), device=device)
    if gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "peak_bytes": peak - base,
        "step_s": sum(times[1:]) / len(times[1:]),
        "gpu": gpu,
        "trainable": plan.trainable_params(),
    }


def estimate(seq: int, batch: int, checkpointing: bool, gpu: bool) -> dict:
    """The memory model's training-step terms (LoRA weights excluded: loaded before the baseline) and FLOPs."""
    plan = bench_plan()
    arch, trainable = plan.arch, plan.trainable_params()
    m = MemoryInputs(
        "bf16" if gpu else "fp32",
        "ray",
        trainable,
        seq,
        batch,
        checkpointing,
        0,
        1,
        gpu,
        activation_bytes=2 if gpu else 4,
    )
    b = estimate_memory(arch, m)
    step_bytes = (b.gradients + b.optimizer + b.activations) * 1e9
    flops = batch * seq * train_flops_per_token(arch, trainable, seq, checkpointing)
    return {"step_bytes": step_bytes, "flops": flops}


def run_case(seq: int, batch: int, checkpointing: bool) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, 'bench'); from estimate_accuracy import measure; "
        f"print(json.dumps(measure({seq}, {batch}, {checkpointing})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first three cases only")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    args = parser.parse_args()

    cases = CASES[:3] if args.quick else CASES
    rows, first_rate = [], None
    for seq, batch in cases:
        m = run_case(seq, batch, args.checkpointing)
        e = estimate(seq, batch, args.checkpointing, m["gpu"])
        profile = get_profile("1xh100-80gb" if m["gpu"] else "cpu")
        mfu = profile.mfu.get("bf16")
        est_s = e["flops"] / (profile.peak_tflops * 1e12 * mfu)
        first_rate = first_rate or e["flops"] / m["step_s"]
        rows.append(
            (
                seq,
                batch,
                e["step_bytes"] / 1e6,
                m["peak_bytes"] / 1e6,
                est_s,
                e["flops"] / first_rate,
                m["step_s"],
                e["flops"] / m["step_s"] / 1e9,
            )
        )
    kind = "GPU (torch.cuda.max_memory_allocated)" if m["gpu"] else "CPU (max RSS growth)"
    print(
        f"model: Qwen2-shaped {CONFIG}, LoRA conservative r=8 ({m['trainable']:,} trainable), "
        f"checkpointing {'on' if args.checkpointing else 'off'}; memory measured on {kind}"
    )
    print(
        "| seq | batch | est. MB | measured MB | err | est. s (profile MFU) | err | est. s (MFU of case 1) | err "
        "| measured s | GFLOP/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seq, batch, est_mb, mb, est_s, cal_s, s, rate in rows:
        print(
            f"| {seq} | {batch} | {est_mb:,.1f} | {mb:,.1f} | {100 * (est_mb - mb) / mb:+.1f}% | {est_s:.3f} | "
            f"{100 * (est_s - s) / s:+.0f}% | {cal_s:.3f} | {100 * (cal_s - s) / s:+.1f}% | {s:.3f} | {rate:.1f} |"
        )


if __name__ == "__main__":
    main()
