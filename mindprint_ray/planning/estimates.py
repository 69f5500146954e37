"""Estimates for a run plan: memory per device for SFT and DPO, and what would make a plan fit."""

from __future__ import annotations

import math
from dataclasses import replace

from mindprint_ray.planning.dpo_reference import keeps_reference_copy
from mindprint_ray.planning.memory import GB, MemoryBudget, MemoryInputs, estimate_memory
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.planning.zones import ZonePlan, build_plan

# macOS wires ~75% of RAM for the GPU by default (the profile's capacity). `sudo sysctl iogpu.wired_limit_mb=N`
# raises it; we leave this much to macOS and everything else (an assumption, stated in the output).
RESERVED_FOR_MACOS_GB = 8.0
WIRED_HEADROOM_GB = 1.0
MIB = 2**20  # iogpu.wired_limit_mb counts MiB; every other figure here is decimal GB


def memory_inputs(run: RunPlan, phase: str = "sft") -> MemoryInputs:
    section = run.spec.stage(phase)
    gpu_like = run.profile.is_gpu or run.profile.backend == "mlx"
    return MemoryInputs(
        quant=run.quant,
        backend=run.profile.backend,
        trainable_params=run.zones.trainable_params(),
        seq_len=section.max_seq_length,
        micro_batch=section.batch_size,
        gradient_checkpointing=section.gradient_checkpointing,
        zero_stage=run.deepspeed_stage,
        devices=run.num_workers,  # all nodes' devices: ZeRO shards over the whole worker group
        is_gpu=run.profile.is_gpu,
        sequences_per_example=2 if phase == "dpo" else 1,
        reference_adapter=phase == "dpo" and run.spec.dpo.reference == "sft" and keeps_reference_copy(run),
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
        options.append(
            {"remedy": what, "total_gb": round(total, 2), "capacity_gb": round(cap, 2), "fits": total <= cap}
        )

    def every(**changes) -> dict[str, MemoryInputs]:
        return {k: replace(m, **changes) for k, m in phases.items()}

    m = phases[peak_memory(run)[0]]
    if m.micro_batch > 1:
        add("micro-batch 1", every(micro_batch=1))
    for seq in (2048, 1024, 512):
        if max(p.seq_len for p in phases.values()) > seq:
            add(
                f"max_seq_length {seq} (sft and dpo)",
                {k: replace(p, seq_len=min(p.seq_len, seq)) for k, p in phases.items()},
            )
    if max(z.rank for z in run.zones.zones) > 4:
        add("LoRA rank 4", every(trainable_params=rank_plan(run, 4).trainable_params()))
    if not all(p.gradient_checkpointing for p in phases.values()):
        add("gradient checkpointing on", every(gradient_checkpointing=True))
    if m.quant == "bf16":
        add("QLoRA (nf4)", every(quant="nf4"))
    if m.backend == "ray" and m.zero_stage < 3 and m.devices > 1:
        add(f"DeepSpeed ZeRO-3 over {m.devices} devices", every(zero_stage=3))
    if m.backend == "ray" and m.is_gpu:
        per_node = run.profile.devices_per_node
        nodes = math.ceil(2 * m.devices / per_node)  # more devices than one node holds: more nodes (s3:// storage)
        add(
            f"ZeRO-3 over {2 * m.devices} devices ({nodes} nodes of {per_node})",
            every(zero_stage=3, devices=2 * m.devices),
        )
    if m.backend == "mlx":
        _wired_limit_remedies(run, phases, add)
    return options


def rank_plan(run: RunPlan, rank: int) -> ZonePlan:
    """The run's own zone plan (the user's `lora.zones`, modules and spans) with every zone at `rank`."""
    lora = run.spec.lora
    zones = [{**z.model_dump(), "rank": None} for z in lora.zones] if lora.zones else None
    return build_plan(run.arch, lora.strategy, zones, rank, lora.alpha, lora.dropout, lora.use_rslora)


def wired_ceiling_gb(run: RunPlan) -> float:
    """The most a raised GPU wired limit should give on a Mac: the RAM less RESERVED_FOR_MACOS_GB."""
    return run.profile.memory_gb - RESERVED_FOR_MACOS_GB


def wired_limit_mb(need_gb: float, ceiling_gb: float) -> int:
    """The `iogpu.wired_limit_mb` value (MiB, as macOS reads it) for a need in decimal GB: the need plus
    WIRED_HEADROOM_GB, rounded up to a whole GiB, at most the ceiling. `plan` and `dry-run` both print this."""
    wanted = math.ceil((need_gb + WIRED_HEADROOM_GB) * GB / MIB / 1024) * 1024
    return min(wanted, int(ceiling_gb * GB / MIB))


def sysctl_command(need_gb: float, ceiling_gb: float) -> str:
    return f"sudo sysctl iogpu.wired_limit_mb={wired_limit_mb(need_gb, ceiling_gb)}"


def _wired_limit_remedies(run: RunPlan, phases: dict[str, MemoryInputs], add) -> None:
    """On a Mac: raise the GPU wired-memory limit to what the option needs (at most the ceiling), alone and with
    shorter sequences."""
    ceiling = wired_ceiling_gb(run)
    options = [("", phases)] + [
        (f" + max_seq_length {seq}", {k: replace(p, seq_len=min(p.seq_len, seq)) for k, p in phases.items()})
        for seq in (2048, 1024)
    ]
    for suffix, changed in options:
        need = _peak_total(run, changed, run.spec.quantization.double_quant)
        limit = wired_limit_mb(need, ceiling)
        add(
            f"sudo sysctl iogpu.wired_limit_mb={limit} (GPU may wire {limit * MIB / GB:.1f} of "
            f"{run.profile.memory_gb:.0f} GB){suffix}",
            changed,
            ceiling,
        )
