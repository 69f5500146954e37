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


def _phases(run: RunPlan) -> dict[str, MemoryInputs]:
    out = {"sft": memory_inputs(run, "sft")}
    if run.spec.dpo.enabled:
        out["dpo"] = memory_inputs(run, "dpo")
    return out


def _peak_total(run: RunPlan, phases: dict[str, MemoryInputs], double_quant: bool = True) -> float:
    return max(estimate_memory(run.arch, m, double_quant).total for m in phases.values())


def remedies(run: RunPlan) -> list[dict]:
    """The seed's remedies for a plan that does not fit, in its order, each with its estimated peak total."""
    phases = _phases(run)
    capacity = run.profile.capacity_gb
    options = []

    def add(what: str, changed: dict[str, MemoryInputs], cap: float = capacity) -> None:
        total = _peak_total(run, changed, run.spec.quantization.double_quant)
        options.append({"remedy": what, "total_gb": round(total, 2), "capacity_gb": round(cap, 2),
                        "fits": total <= cap})

    def every(**changes) -> dict[str, MemoryInputs]:
        return {k: replace(m, **changes) for k, m in phases.items()}

    m = phases[peak_memory(run)[0]]
    if m.micro_batch > 1:
        add("micro-batch 1", every(micro_batch=1))
    for seq in (2048, 1024, 512):
        if max(p.seq_len for p in phases.values()) > seq:
            add(f"max_seq_length {seq} (sft and dpo)", {k: replace(p, seq_len=min(p.seq_len, seq))
                                                         for k, p in phases.items()})
    if run.zones.rank > 4:
        low = build_plan(run.arch, run.zones.strategy, None, 4, 8, run.zones.dropout)
        add("LoRA rank 4", every(trainable_params=low.trainable_params()))
    if not all(p.gradient_checkpointing for p in phases.values()):
        add("gradient checkpointing on", every(gradient_checkpointing=True))
    if m.quant == "bf16":
        add("QLoRA (nf4)", every(quant="nf4"))
    if m.backend == "ray" and m.zero_stage < 3 and m.devices > 1:
        add(f"DeepSpeed ZeRO-3 over {m.devices} devices", every(zero_stage=3))
    if m.backend == "ray" and m.is_gpu:
        add(f"ZeRO-3 over {2 * m.devices} devices", every(zero_stage=3, devices=2 * m.devices))
    if m.backend == "mlx":
        _wired_limit_remedies(run, phases, add)
    return options


def _wired_limit_remedies(run: RunPlan, phases: dict[str, MemoryInputs], add) -> None:
    """On a Mac: raise the GPU wired-memory limit (leaving 8 GB to macOS), alone and with shorter sequences."""
    ram_mb = run.profile.memory_gb * 1000
    limit_mb = int(ram_mb - 8000)
    what = f"sudo sysctl iogpu.wired_limit_mb={limit_mb} (GPU may wire {limit_mb / 1000:.0f} of {ram_mb / 1000:.0f} GB)"
    add(what, phases, limit_mb / 1000)
    for seq in (2048, 1024):
        add(f"{what} + max_seq_length {seq}", {k: replace(p, seq_len=min(p.seq_len, seq)) for k, p in phases.items()},
            limit_mb / 1000)
