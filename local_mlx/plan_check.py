"""What a Mac run needs before it starts: memory vs the GPU wired limit, the sysctl that raises it, hours per topic."""
from __future__ import annotations

import math
from dataclasses import dataclass

from mindprint_ray.data_stats import TopicStats
from mindprint_ray.estimates import memory_for_run, remedies
from mindprint_ray.memory import MemoryBudget
from mindprint_ray.run import RunPlan

# macOS wires ~75% of RAM for the GPU by default (the profile's capacity). `sudo sysctl iogpu.wired_limit_mb=N`
# raises it; we leave this much to macOS and everything else (an assumption, stated in the output).
RESERVED_FOR_MACOS_GB = 8.0
MIB = 2 ** 20


@dataclass(frozen=True)
class MemoryVerdict:
    phases: dict[str, MemoryBudget]
    limit_gb: float  # the default wired limit
    ceiling_gb: float  # the most a raised limit should give the GPU

    @property
    def need_gb(self) -> float:
        return max(b.total for b in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: self.phases[p].total)

    @property
    def status(self) -> str:
        """'fits', 'raise' (fits once the wired limit is raised) or 'no'."""
        if self.need_gb <= self.limit_gb:
            return "fits"
        return "raise" if self.need_gb <= self.ceiling_gb else "no"

    @property
    def wired_limit_mb(self) -> int:
        """The limit to set: the need plus 1 GB of headroom, rounded up to 1 GiB, within the ceiling."""
        wanted = math.ceil((self.need_gb + 1.0) * 1e9 / MIB / 1024) * 1024
        return min(wanted, int(self.ceiling_gb * 1e9 / MIB))

    @property
    def sysctl(self) -> str:
        return f"sudo sysctl iogpu.wired_limit_mb={self.wired_limit_mb}"


def memory_verdict(run: RunPlan) -> MemoryVerdict:
    phases = {"sft": memory_for_run(run, "sft")}
    if run.spec.dpo.enabled:
        phases["dpo"] = memory_for_run(run, "dpo")
    return MemoryVerdict(phases, run.profile.capacity_gb, run.profile.memory_gb - RESERVED_FOR_MACOS_GB)


def memory_lines(run: RunPlan, v: MemoryVerdict) -> list[str]:
    """The memory table and the verdict, as printed by dry-run."""
    terms = ("base_weights", "lora_weights", "optimizer", "gradients", "activations", "overhead")
    head = f"  {'GB':<14}" + "".join(f"{p.upper():>10}" for p in v.phases)
    rows = [head] + [f"  {t:<14}" + "".join(f"{getattr(b, t):>10.2f}" for b in v.phases.values()) for t in terms]
    rows.append(f"  {'total':<14}" + "".join(f"{b.total:>10.2f}" for b in v.phases.values()))
    rows.append(f"  GPU wired limit {v.limit_gb:.1f} GB (default {run.profile.wired_limit_fraction or 1:.0%} of "
                f"{run.profile.memory_gb:.0f} GB); raisable to about {v.ceiling_gb:.1f} GB "
                f"(leaving {RESERVED_FOR_MACOS_GB:.0f} GB to macOS)")
    if v.status == "fits":
        rows.append(f"  fits: {v.peak_phase.upper()} peaks at {v.need_gb:.1f} GB <= {v.limit_gb:.1f} GB")
    elif v.status == "raise":
        rows.append(f"  fits only after raising the wired limit: {v.peak_phase.upper()} needs {v.need_gb:.1f} GB > "
                    f"{v.limit_gb:.1f} GB. Before training run:\n    {v.sysctl}")
    else:
        rows.append(f"  DOES NOT FIT: {v.peak_phase.upper()} needs {v.need_gb:.1f} GB, more than the "
                    f"{v.ceiling_gb:.1f} GB a raised wired limit can give")
        for r in remedies(run):
            status = "fits" if r["total_gb"] <= v.limit_gb else (
                "fits after sysctl" if r["total_gb"] <= v.ceiling_gb else "still too big")
            rows.append(f"    - {r['remedy']}: {r['total_gb']:.1f} GB ({status})")
    return rows


# ---- time ------------------------------------------------------------------------------------------------


def profile_flops(run: RunPlan) -> float:
    """Sustained FLOP/s: the profile's peak times the assumed MFU (spec hardware.mfu overrides)."""
    mfu = run.spec.hardware.mfu or run.profile.mfu.get(run.quant) or run.profile.mfu.get("bf16", 0.2)
    return run.profile.peak_tflops * 1e12 * mfu


def topic_tokens(run: RunPlan, row: TopicStats) -> dict[str, float]:
    """Tokens one topic processes: SFT (epochs or max_steps), DPO training (chosen + rejected) and reference."""
    s, d = run.spec.sft, run.spec.dpo
    mean_sft = row.sft_tokens / max(row.sft, 1)
    sft = s.max_steps * s.batch_size * s.gradient_accumulation * mean_sft if s.max_steps else s.epochs_per_topic * row.sft_tokens
    pair = 2 * row.dpo_tokens / max(row.dpo, 1)  # dpo_tokens counts the longer response of each pair
    dpo = d.steps_per_topic * d.batch_size * d.gradient_accumulation * pair if d.enabled and row.dpo else 0.0
    reference = 2 * row.dpo_tokens if dpo else 0.0
    return {"sft": sft, "dpo": dpo, "reference": reference}


def topic_hours(run: RunPlan, row: TopicStats, measured: dict[str, float] | None = None) -> dict[str, float]:
    """Hours for SFT and DPO of one topic: 4N FLOPs per trained token and 2N per reference token at the
    profile's FLOP/s, or the tokens over the measured tokens/s when the configured model itself ran."""
    tokens = topic_tokens(run, row)
    if measured:
        return {"sft": tokens["sft"] / measured["sft"] / 3600,
                "dpo": (tokens["dpo"] + tokens["reference"] / 2) / measured.get("dpo", measured["sft"]) / 3600}
    n, rate = run.arch.total_params(), profile_flops(run)
    return {"sft": tokens["sft"] * 4 * n / rate / 3600,
            "dpo": (tokens["dpo"] * 4 * n + tokens["reference"] * 2 * n) / rate / 3600}


def hours_lines(run: RunPlan, rows: list[TopicStats], measured: dict[str, float] | None) -> list[str]:
    source = ("measured tokens/s of this model" if measured else
              f"{run.profile.peak_tflops:g} TFLOP/s x MFU {profile_flops(run) / run.profile.peak_tflops / 1e12:.2f}, "
              f"4N FLOPs/trained token, N = {run.arch.total_params():,}")
    lines = [f"  hours per topic ({source}):"]
    total = 0.0
    for row in rows:
        h = topic_hours(run, row, measured)
        total += h["sft"] + h["dpo"]
        lines.append(f"    {row.topic:<20} SFT {h['sft']:7.2f} h   DPO {h['dpo']:7.2f} h   "
                     f"({row.sft} SFT examples, {row.dpo} DPO pairs)")
    lines.append(f"    all {len(rows)} topics: {total:.1f} h ({total / 24:.1f} days)")
    return lines
