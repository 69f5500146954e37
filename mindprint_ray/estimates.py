"""Estimates for a run plan: memory per device for SFT and DPO, and what would make a plan fit."""
from __future__ import annotations

from dataclasses import replace

from .memory import MemoryBudget, MemoryInputs, estimate_memory
from .run import RunPlan
from .zones import build_plan


def memory_inputs(run: RunPlan, phase: str = "sft") -> MemoryInputs:
    section = run.spec.sft if phase == "sft" else run.spec.dpo
    gpu_like = run.profile.is_gpu or run.profile.backend == "mlx"
    return MemoryInputs(
        quant=run.quant,
        backend=run.profile.backend,
        trainable_params=run.zones.trainable_params(),
        seq_len=section.max_seq_length,
        micro_batch=section.batch_size,
        gradient_checkpointing=section.gradient_checkpointing,
        zero_stage=run.deepspeed_stage,
        devices=run.num_workers,
        is_gpu=run.profile.is_gpu,
        sequences_per_example=2 if phase == "dpo" else 1,
        activation_bytes=2 if gpu_like and run.spec.sft.bf16 else 4,
    )


def memory_for_run(run: RunPlan, phase: str = "sft") -> MemoryBudget:
    return estimate_memory(run.arch, memory_inputs(run, phase), run.spec.quantization.double_quant)


def peak_memory(run: RunPlan) -> tuple[str, MemoryBudget]:
    """The phase (sft or dpo) with the larger per-device total, and its budget."""
    phases = [("sft", memory_for_run(run, "sft"))]
    if run.spec.dpo.enabled:
        phases.append(("dpo", memory_for_run(run, "dpo")))
    return max(phases, key=lambda p: p[1].total)


def remedies(run: RunPlan) -> list[dict]:
    """The seed's remedies for a plan that does not fit, in its order, each with its estimated total."""
    m = memory_inputs(run, peak_memory(run)[0])
    capacity = run.profile.capacity_gb
    options = []

    def add(what: str, inputs: MemoryInputs, double_quant: bool = True) -> None:
        total = estimate_memory(run.arch, inputs, double_quant).total
        options.append({"remedy": what, "total_gb": round(total, 2), "fits": total <= capacity})

    if m.micro_batch > 1:
        add("micro-batch 1", replace(m, micro_batch=1))
    for seq in (2048, 1024):
        if m.seq_len > seq:
            add(f"max_seq_length {seq}", replace(m, seq_len=seq))
    if run.zones.rank > 4:
        low = build_plan(run.arch, run.zones.strategy, None, 4, 8, run.zones.dropout)
        add("LoRA rank 4", replace(m, trainable_params=low.trainable_params()))
    if not m.gradient_checkpointing:
        add("gradient checkpointing on", replace(m, gradient_checkpointing=True))
    if m.quant == "bf16":
        add("QLoRA (nf4)", replace(m, quant="nf4"))
    if m.backend == "ray" and m.zero_stage < 3 and m.devices > 1:
        add(f"DeepSpeed ZeRO-3 over {m.devices} devices", replace(m, zero_stage=3))
    if m.backend == "ray" and m.is_gpu:
        add(f"ZeRO-3 over {2 * m.devices} devices", replace(m, zero_stage=3, devices=2 * m.devices))
    return options
