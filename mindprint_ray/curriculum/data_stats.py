"""Per-topic token statistics and the over-long policy (drop / truncate / error), never silent."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mindprint_ray.curriculum.tokens import TokenCounter
from mindprint_ray.curriculum.topics import Record, TopicData
from mindprint_ray.errors import UserError
from mindprint_ray.evaluation.metrics import interpolated_percentile
from mindprint_ray.spec.run_spec import RunSpec


@dataclass
class TopicStats:
    topic: str
    sft: int
    dpo: int
    eval: int
    sft_tokens: int
    dpo_tokens: int
    p50: int  # SFT example lengths: interpolated percentiles, rounded up to whole tokens (length_percentile)
    p95: int
    max: int
    sft_over: int
    dpo_over: int
    action: str


def length_percentile(lengths: list[int], q: float) -> int:
    """The interpolated q-th percentile of token lengths, rounded up to a whole token (0 without lengths)."""
    value = interpolated_percentile(lengths, q)
    return 0 if value is None else math.ceil(value)


def sft_length(counter: TokenCounter, record: Record) -> int:
    return counter.count(record.data["messages"])


def pair_lengths(counter: TokenCounter, record: Record) -> tuple[int, int]:
    """Tokens of prompt+chosen and of prompt+rejected."""
    d = record.data
    return counter.count(d["prompt"] + d["chosen"]), counter.count(d["prompt"] + d["rejected"])


def dpo_length(counter: TokenCounter, record: Record) -> int:
    """The longer of prompt+chosen and prompt+rejected."""
    return max(pair_lengths(counter, record))


def _overlong_error(topic: str, over: dict[str, list[Record]]) -> UserError:
    kind = "sft" if over["sft"] else "dpo"
    first = over[kind][0]
    return UserError(
        f"example is longer than {kind}.max_seq_length ({len(over['sft'])} SFT and {len(over['dpo'])} DPO "
        f"examples over the limit in topic '{topic}')",
        file=first.file,
        line=first.line,
        field=f"{kind}.max_seq_length",
        hint="shorten the example, raise max_seq_length, or set curriculum.overlong to drop or truncate",
    )


def apply_overlong(spec: RunSpec, topics: list[TopicData], counter: TokenCounter) -> list[TopicStats]:
    """Count tokens, find examples over max_seq_length and apply the policy; returns the table rows."""
    policy = spec.curriculum.overlong
    rows = []
    for t in topics:
        sft = [(r, sft_length(counter, r)) for r in t.sft]
        dpo = [(r, dpo_length(counter, r)) for r in t.dpo]
        over = {
            "sft": [r for r, n in sft if n > spec.sft.max_seq_length],
            "dpo": [r for r, n in dpo if n > spec.dpo.max_seq_length],
        }
        n_over = len(over["sft"]) + len(over["dpo"])
        if policy == "error" and n_over:
            raise _overlong_error(t.name, over)
        if policy == "drop":
            sft = [(r, n) for r, n in sft if n <= spec.sft.max_seq_length]
            dpo = [(r, n) for r, n in dpo if n <= spec.dpo.max_seq_length]
            if not sft:
                raise UserError(
                    f"every SFT example of topic '{t.name}' is over max_seq_length and would be dropped",
                    field="sft.max_seq_length",
                    hint="raise max_seq_length or use overlong: truncate",
                )
            t.sft, t.dpo = [r for r, _ in sft], [r for r, _ in dpo]
        lengths = [n for _, n in sft]
        rows.append(
            TopicStats(
                topic=t.name,
                sft=len(t.sft),
                dpo=len(t.dpo),
                eval=len(t.eval),
                sft_tokens=sum(lengths),
                dpo_tokens=sum(n for _, n in dpo),
                p50=length_percentile(lengths, 50),
                p95=length_percentile(lengths, 95),
                max=max(lengths, default=0),
                sft_over=len(over["sft"]),
                dpo_over=len(over["dpo"]),
                action=({"drop": "dropped", "truncate": "truncated"}.get(policy, "-") if n_over else "-"),
            )
        )
    return rows
