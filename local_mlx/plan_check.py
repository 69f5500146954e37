"""What a Mac run needs before it starts: memory vs the GPU wired limit, the sysctl that raises it, hours per topic.

Formatting only: the wired-limit value comes from mindprint_ray.planning.estimates and the hours from
mindprint_ray.planning.time_model,the computations `mindprint-ray plan` prints.
"""

from __future__ import annotations

from dataclasses import dataclass

from mindprint_ray.planning.estimates import (
    RESERVED_FOR_MACOS_GB,
    memory_for_run,
    remedies,
    sysctl_command,
    wired_ceiling_gb,
    wired_limit_mb,
)
from mindprint_ray.planning.memory import MemoryBudget
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.planning.time_model import Mfu, topic_times
from mindprint_ray.planning.topic_tokens import TopicTokens


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
        """The limit to set (estimates.wired_limit_mb: the need plus headroom, in MiB, within the ceiling)."""
        return wired_limit_mb(self.need_gb, self.ceiling_gb)

    @property
    def sysctl(self) -> str:
        return sysctl_command(self.need_gb, self.ceiling_gb)


def memory_verdict(run: RunPlan) -> MemoryVerdict:
    phases = {"sft": memory_for_run(run, "sft")}
    if run.spec.dpo.enabled:
        phases["dpo"] = memory_for_run(run, "dpo")
    return MemoryVerdict(phases, run.profile.capacity_gb, wired_ceiling_gb(run))


def memory_lines(run: RunPlan, v: MemoryVerdict) -> list[str]:
    """The memory table and the verdict, as printed by dry-run."""
    terms = ("base_weights", "lora_weights", "optimizer", "gradients", "activations", "overhead")
    head = f"  {'GB':<14}" + "".join(f"{p.upper():>10}" for p in v.phases)
    rows = [head] + [f"  {t:<14}" + "".join(f"{getattr(b, t):>10.2f}" for b in v.phases.values()) for t in terms]
    rows.append(f"  {'total':<14}" + "".join(f"{b.total:>10.2f}" for b in v.phases.values()))
    rows.append(
        f"  GPU wired limit {v.limit_gb:.1f} GB (default {run.profile.wired_limit_fraction or 1:.0%} of "
        f"{run.profile.memory_gb:.0f} GB); raisable to about {v.ceiling_gb:.1f} GB "
        f"(leaving {RESERVED_FOR_MACOS_GB:.0f} GB to macOS)"
    )
    if v.status == "fits":
        rows.append(f"  fits: {v.peak_phase.upper()} peaks at {v.need_gb:.1f} GB <= {v.limit_gb:.1f} GB")
    elif v.status == "raise":
        rows.append(
            f"  fits only after raising the wired limit: {v.peak_phase.upper()} needs {v.need_gb:.1f} GB > "
            f"{v.limit_gb:.1f} GB. Before training run:\n    {v.sysctl}"
        )
    else:
        rows.append(
            f"  DOES NOT FIT: {v.peak_phase.upper()} needs {v.need_gb:.1f} GB, more than the "
            f"{v.ceiling_gb:.1f} GB a raised wired limit can give"
        )
        for r in remedies(run):
            status = (
                "fits"
                if r["total_gb"] <= v.limit_gb
                else ("fits after sysctl" if r["total_gb"] <= v.ceiling_gb else "still too big")
            )
            rows.append(f"    - {r['remedy']}: {r['total_gb']:.1f} GB ({status})")
    return rows


# ---- time ------------------------------------------------------------------------------------------------


def hours_lines(run: RunPlan, tokens: list[TopicTokens], mfu: Mfu) -> list[str]:
    """Hours per topic from the core time model (time_model.topic_times, as `plan` prints them) at `mfu`: the
    profile's, a calibration's, or the one the configured model's measured tokens/s implies."""
    source = (
        "measured tokens/s of this model"
        if mfu.source == "measured"
        else f"{run.profile.peak_tflops:g} TFLOP/s x MFU {mfu.sft:.2f} SFT / {mfu.dpo:.2f} DPO ({mfu.source})"
    )
    lines = [f"  hours per topic ({source}):"]
    times = topic_times(run, tokens, mfu)
    for t, row in zip(times, tokens):
        dpo = t.dpo.seconds / 3600 if t.dpo else 0.0
        lines.append(
            f"    {t.topic:<20} SFT {t.sft.seconds / 3600:7.2f} h   DPO {dpo:7.2f} h   "
            f"({row.sft_examples} SFT examples, {row.dpo_pairs} DPO pairs)"
        )
    total = sum(t.hours for t in times)
    lines.append(f"    all {len(times)} topics: {total:.2f} h ({total / 24:.1f} days)")
    return lines
