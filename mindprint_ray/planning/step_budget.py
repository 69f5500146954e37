"""The step budget of every topic, told before anything is spent: optimizer steps of SFT and DPO, the warmup
against them, the peak learning rate actually reached and the passes over the data, with warnings and fixes.

What the spec's fields mean (the backends do this; spec.py and docs/estimates.md say the same):
- `batch_size` is per device. One optimizer step consumes a global batch of
  batch_size x gradient_accumulation x workers (RunPlan.num_workers on Ray; MLX trains in one process).
- `sft.max_steps` and `dpo.steps_per_topic` are optimizer steps of the whole worker group, not per device.

How the Ray backend's HF Trainer (transformers 5.24, TRL 1.16, accelerate 1.15) turns them into steps:
- rows of one pass: SFT with packing = the examples packed into sequences of `sft.max_seq_length` by best-fit
  decreasing (TRL's "bfd", in map batches of 1000 examples, in file order); without packing one row per example;
  DPO one row per pair. MLX never packs.
- accelerate deals the micro-batches out to the workers and pads the shards to equal length, so each device
  reads ceil(ceil(rows / batch_size) / workers) micro-batches per epoch, and an epoch is
  ceil(micro-batches / accumulation) optimizer steps (the last one with the remainder). SFT trains
  ceil(epochs x steps per epoch) steps, or `max_steps`; DPO `steps_per_topic`. MLX: ceil(epochs x rows /
  (batch x accumulation)) steps, or `max_steps`.
- learning rate: the scheduler starts at its factor for step 0 and advances after each optimizer step, so
  optimizer step k (1-based) applies lr x factor(k - 1); the last index applied is steps - 1. Linear warmup
  factor(s) = s / warmup for s < warmup (the first step applies 0), then 1 at s = warmup, then the decay. With
  warmup >= steps the peak is lr x (steps - 1) / warmup. MLX (local_mlx/stage.py lr_schedule, mlx.optimizers
  schedules) follows the same curve. `constant` ignores warmup. SFT uses `sft.scheduler`; DPO the trainer's
  default, linear.
Pure Python: no torch.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Callable
from dataclasses import dataclass

from mindprint_ray.curriculum.tokens import TokenCounter
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.planning.topic_tokens import TRAINING_STAGES, TopicTokens, count_topic_tokens

MIN_STEPS = 10  # fewer optimizer steps than this per topic and stage: the stage barely trains
MAX_DPO_PASSES = 8.0  # more DPO passes over a topic's pairs than this: the same pairs are revisited too often
PACK_BATCH = 1000  # TRL packs each `datasets.map` batch (1000 examples) on its own


@dataclass(frozen=True)
class StageBudget:
    """One stage (sft or dpo) of one topic as the backend will run it."""

    stage: str
    topic: str
    rows: int  # rows of one pass: packed sequences (SFT with packing), examples, or pairs (DPO)
    global_batch: int  # rows per optimizer step: batch_size x gradient_accumulation x workers
    steps_per_epoch: float  # Ray: whole steps (HF rounds up per device); MLX: rows / (batch x accumulation)
    steps: int  # optimizer steps of the whole worker group
    warmup_steps: int
    learning_rate: float  # the configured (peak) learning rate
    peak_fraction: float  # the highest learning rate applied, as a fraction of learning_rate

    @property
    def peak_lr(self) -> float:
        return self.learning_rate * self.peak_fraction

    @property
    def passes(self) -> float:
        """Passes over the topic's data (epochs): steps over steps per epoch."""
        return self.steps / self.steps_per_epoch

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "global_batch": self.global_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "learning_rate": self.learning_rate,
            "peak_lr": self.peak_lr,
            "peak_fraction": self.peak_fraction,
            "passes": round(self.passes, 3),
        }


@dataclass(frozen=True)
class TopicBudget:
    """One topic's SFT and DPO budgets (DPO is None when it is off or the topic has no pairs)."""

    topic: str
    sft: StageBudget
    dpo: StageBudget | None

    def stages(self) -> list[StageBudget]:
        return [self.sft] + ([self.dpo] if self.dpo else [])


@dataclass(frozen=True)
class BudgetWarning:
    """A budget problem shared by one or more topics: what it is, with numbers, and a fix naming a field."""

    stage: str
    kind: str  # warmup | few_steps | revisits
    topics: tuple[str, ...]
    message: str
    fix: str

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "kind": self.kind,
            "topics": list(self.topics),
            "message": self.message,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class StepBudget:
    """Every topic's budget for the run's backend and device count, and the warnings it raises."""

    backend: str
    workers: int
    sft_rows: str  # what an SFT row is (packed sequences or examples)
    topics: list[TopicBudget]
    warnings: list[BudgetWarning]

    def as_dict(self) -> dict:
        return {
            "backend": self.backend,
            "workers": self.workers,
            "sft_rows": self.sft_rows,
            "thresholds": {"min_steps": MIN_STEPS, "max_dpo_passes": MAX_DPO_PASSES},
            "topics": [
                {"topic": t.topic, "sft": t.sft.as_dict(), "dpo": t.dpo.as_dict() if t.dpo else None}
                for t in self.topics
            ],
            "warnings": [w.as_dict() for w in self.warnings],
        }


# ---- the rules --------------------------------------------------------------------------------------------


def _section(run: RunPlan, stage: str):
    return run.spec.stage(stage)


def _mlx(run: RunPlan) -> bool:
    return run.profile.backend == "mlx"


def workers(run: RunPlan) -> int:
    """Processes that train together: the Ray worker group, or the one MLX process."""
    return 1 if _mlx(run) else run.num_workers


def global_batch(run: RunPlan, stage: str) -> int:
    """Rows per optimizer step: batch_size (per device) x gradient_accumulation x workers."""
    s = _section(run, stage)
    return s.batch_size * s.gradient_accumulation * workers(run)


def packed_rows(lengths: list[int] | tuple[int, ...], capacity: int) -> int:
    """Sequences of `capacity` tokens that TRL's best-fit-decreasing packing fills with these examples."""
    total = 0
    for start in range(0, len(lengths), PACK_BATCH):
        rooms: list[int] = []  # free space of the open sequences, sorted
        for n in sorted((min(x, capacity) for x in lengths[start : start + PACK_BATCH] if x > 0), reverse=True):
            i = bisect_left(rooms, n)
            room = rooms.pop(i) if i < len(rooms) else capacity
            total += room == capacity
            insort(rooms, room - n)
    return total


def sft_rows(run: RunPlan, t: TopicTokens) -> int:
    """Rows of one SFT pass: packed sequences (from the example lengths, else tokens / max_seq_length) or examples."""
    s = run.spec.sft
    if not s.packing or _mlx(run):
        return t.sft_examples
    if t.sft_lengths:
        return packed_rows(t.sft_lengths, s.max_seq_length)
    return math.ceil(t.sft_tokens / s.max_seq_length)


def steps_per_epoch(run: RunPlan, stage: str, rows: int, accumulation: int | None = None) -> float:
    """Optimizer steps of one pass over `rows` (HF: per-device micro-batches over accumulation, rounded up)."""
    s = _section(run, stage)
    accumulation = accumulation or s.gradient_accumulation
    if _mlx(run):
        return rows / (s.batch_size * accumulation)
    per_device = math.ceil(math.ceil(rows / s.batch_size) / run.num_workers)
    return max(1, math.ceil(per_device / accumulation))


def stage_steps(run: RunPlan, stage: str, rows: int, accumulation: int | None = None) -> int:
    """Optimizer steps of one topic's stage: DPO steps_per_topic; SFT max_steps, else epochs x steps per epoch."""
    if stage == "dpo":
        return run.spec.dpo.steps_per_topic
    s = run.spec.sft
    if s.max_steps:
        return s.max_steps
    if _mlx(run):  # local_mlx/training.py sft_config, in its order of operations
        return max(1, math.ceil(s.epochs_per_topic * rows / (s.batch_size * (accumulation or s.gradient_accumulation))))
    return max(1, math.ceil(s.epochs_per_topic * steps_per_epoch(run, stage, rows, accumulation)))


def scheduler(run: RunPlan, stage: str) -> str:
    return run.spec.sft.scheduler if stage == "sft" else "linear"


def peak_fraction(run: RunPlan, stage: str, steps: int) -> float:
    """The highest learning rate the schedule applies in `steps` optimizer steps, over the configured one."""
    warmup = _section(run, stage).warmup_steps
    if scheduler(run, stage) == "constant" or steps > warmup:
        return 1.0
    return (steps - 1) / warmup  # Ray and MLX alike: step k applies lr x (k - 1) / warmup during the warmup


def stage_budget(run: RunPlan, t: TopicTokens, stage: str) -> StageBudget:
    s = _section(run, stage)
    rows = sft_rows(run, t) if stage == "sft" else t.dpo_pairs
    steps = stage_steps(run, stage, rows)
    return StageBudget(
        stage,
        t.topic,
        rows,
        global_batch(run, stage),
        steps_per_epoch(run, stage, rows),
        steps,
        s.warmup_steps,
        s.learning_rate,
        peak_fraction(run, stage, steps),
    )


def topic_budget(run: RunPlan, t: TopicTokens) -> TopicBudget:
    dpo = stage_budget(run, t, "dpo") if run.spec.dpo.enabled and t.dpo_pairs else None
    return TopicBudget(t.topic, stage_budget(run, t, "sft"), dpo)


def budget_for_run(run: RunPlan, counter: TokenCounter | None = None) -> StepBudget:
    """The step budget from the curriculum, counted with `counter` (validate's) or the model's tokenizer."""
    return step_budget(run, count_topic_tokens(run, counter)[0])


def step_budget(run: RunPlan, tokens: list[TopicTokens]) -> StepBudget:
    """The budget of every topic (tokens from topic_tokens.count_topic_tokens) and its warnings."""
    topics = [topic_budget(run, t) for t in tokens]
    s = run.spec.sft
    rows = (
        f"packed sequences of {s.max_seq_length:,} tokens (best-fit decreasing, as TRL's bfd)"
        if s.packing and not _mlx(run)
        else "examples (no packing)"
    )
    return StepBudget(run.profile.backend, workers(run), rows, topics, budget_warnings(run, topics))


# ---- warnings ----------------------------------------------------------------------------------------------


def span(values: list[float], fmt: str = "{:,.0f}") -> str:
    """ "3" or "2-3": the range of the values, formatted."""
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}-{high}"


def _topics(run: RunPlan, hits: list[StageBudget]) -> str:
    names = [h.topic for h in hits]
    if len(names) > 1 and len(names) == len(run.spec.curriculum.topics):
        return f"all {len(names)} topics"
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _rows_are(run: RunPlan, stage: str) -> str:
    if stage == "dpo":
        return "pairs"
    return "packed sequences" if run.spec.sft.packing and not _mlx(run) else "examples"


def _batch_terms(run: RunPlan, stage: str) -> str:
    s = _section(run, stage)
    return f"{s.batch_size} x {s.gradient_accumulation} x {workers(run)} device(s)"


def _warmup_hit(run: RunPlan, b: StageBudget) -> bool:
    return b.warmup_steps > 0 and b.warmup_steps >= b.steps and scheduler(run, b.stage) != "constant"


def _warmup_warning(run: RunPlan, hits: list[StageBudget]) -> tuple[str, str]:
    b, low = hits[0], min(h.steps for h in hits)
    message = (
        f"{b.stage.upper()} trains {span([h.steps for h in hits])} optimizer steps per topic "
        f"({_topics(run, hits)}) against {b.stage}.warmup_steps {b.warmup_steps}: the learning rate never "
        f"leaves warmup and peaks at {span([h.peak_lr for h in hits], '{:.2g}')} "
        f"({span([100 * h.peak_fraction for h in hits], '{:.0f}')}% of {b.learning_rate:g}); the first step applies 0"
    )
    limit = "to 0" if low <= 1 else f"<= {low - 1} (e.g. {low // 10})"
    return message, f"set {b.stage}.warmup_steps {limit} so that the learning rate reaches its peak"


def _few_steps_hit(run: RunPlan, b: StageBudget) -> bool:
    return b.steps < MIN_STEPS


def _few_steps_fix(run: RunPlan, hits: list[StageBudget]) -> str:
    stage, s = hits[0].stage, _section(run, hits[0].stage)
    if stage == "dpo":
        return f"raise dpo.steps_per_topic to {MIN_STEPS}"
    if s.max_steps:
        return f"raise sft.max_steps to {MIN_STEPS}"

    def enough(accumulation: int) -> bool:
        return all(stage_steps(run, stage, h.rows, accumulation) >= MIN_STEPS for h in hits)

    low, high = 0, s.gradient_accumulation - 1  # steps fall as accumulation grows: bisect for the largest that works
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if enough(mid) else (low, mid - 1)
    if low:
        return f"lower sft.gradient_accumulation to {low}"
    epochs = max(math.ceil(MIN_STEPS / h.steps_per_epoch) for h in hits)
    return (
        f"raise sft.epochs_per_topic to {epochs} ({epochs} passes over the data) or set sft.max_steps: "
        f"{MIN_STEPS}; more examples per topic give more steps per epoch"
    )


def _few_steps_warning(run: RunPlan, hits: list[StageBudget]) -> tuple[str, str]:
    b = hits[0]
    message = (
        f"{b.stage.upper()} has {span([h.steps for h in hits])} optimizer steps per topic "
        f"({_topics(run, hits)}), fewer than {MIN_STEPS}: one pass is {span([h.rows for h in hits])} "
        f"{_rows_are(run, b.stage)} against a global batch of {b.global_batch} ({_batch_terms(run, b.stage)}), "
        f"{span([h.steps_per_epoch for h in hits], '{:,.3g}')} step(s) per epoch"
    )
    return message, _few_steps_fix(run, hits)


def _revisits_hit(run: RunPlan, b: StageBudget) -> bool:
    return b.stage == "dpo" and b.passes > MAX_DPO_PASSES


def _revisits_warning(run: RunPlan, hits: list[StageBudget]) -> tuple[str, str]:
    b = hits[0]
    steps = max(1, math.floor(min(MAX_DPO_PASSES * h.steps_per_epoch for h in hits)))
    pairs = math.ceil(b.steps * b.global_batch / MAX_DPO_PASSES)
    message = (
        f"DPO revisits each topic's {span([h.rows for h in hits])} pairs "
        f"{span([h.passes for h in hits], '{:,.0f}')} times ({_topics(run, hits)}): {b.steps} steps of a global "
        f"batch of {b.global_batch} ({_batch_terms(run, 'dpo')}), "
        f"{span([h.steps_per_epoch for h in hits], '{:,.3g}')} step(s) per pass; more than "
        f"{MAX_DPO_PASSES:g} passes risks learning these pairs by heart"
    )
    fix = f"give each topic at least {pairs:,} pairs"  # fewer steps than MIN_STEPS would be a warning too
    return message, (f"lower dpo.steps_per_topic to {steps}, or {fix}" if steps >= MIN_STEPS else fix)


CHECKS: tuple[tuple[str, Callable, Callable], ...] = (
    ("warmup", _warmup_hit, _warmup_warning),
    ("few_steps", _few_steps_hit, _few_steps_warning),
    ("revisits", _revisits_hit, _revisits_warning),
)


def budget_warnings(run: RunPlan, topics: list[TopicBudget]) -> list[BudgetWarning]:
    """One warning per stage and problem, naming the topics it concerns, with numbers and a fix."""
    out = []
    for stage in TRAINING_STAGES:
        budgets = [b for t in topics for b in t.stages() if b.stage == stage]
        for kind, hit, describe in CHECKS:
            hits = [b for b in budgets if hit(run, b)]
            if hits:
                message, fix = describe(run, hits)
                out.append(BudgetWarning(stage, kind, tuple(h.topic for h in hits), message, fix))
    return out


# ---- the budget as a text table (plan, validate and the report show the same) ---------------------------------

TABLE_HEADERS = [
    "topic",
    "SFT rows",
    "SFT steps",
    "SFT peak LR",
    "SFT passes",
    "DPO pairs",
    "DPO steps",
    "DPO peak LR",
    "DPO passes",
]


def _cells(stage: dict | None) -> list[str]:
    if stage is None:
        return ["-"] * 4
    return [
        f"{stage['rows']:,}",
        f"{stage['steps']:,} ({stage['steps_per_epoch']:,.3g}/epoch)",
        f"{stage['peak_lr']:.2g} ({100 * stage['peak_fraction']:.0f}%)",
        f"{stage['passes']:,.3g}",
    ]


def table_rows(budget: dict) -> list[list[str]]:
    """One row of TABLE_HEADERS per topic, from StepBudget.as_dict()."""
    return [[t["topic"]] + _cells(t["sft"]) + _cells(t["dpo"]) for t in budget["topics"]]


def _stage_terms(name: str, stage: dict | None) -> str:
    if stage is None:
        return f"{name} off"
    return f"{name} global batch {stage['global_batch']}, lr {stage['learning_rate']:g}, warmup {stage['warmup_steps']}"


def headline(budget: dict) -> str:
    """What the table's numbers rest on: backend, devices, global batches, learning rates, warmups, rows."""
    first = budget["topics"][0]
    return (
        f"{budget['backend']}, {budget['workers']} device(s), optimizer steps of the whole group: "
        f"{_stage_terms('SFT', first['sft'])}, rows = {budget['sft_rows']}; {_stage_terms('DPO', first['dpo'])}"
    )
