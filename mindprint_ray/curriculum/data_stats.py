"""Per-topic token statistics and the over-long policy (drop / truncate / error), never silent, from the data
files' scans (`data_scan`): no record is held to count a topic."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mindprint_ray.curriculum.data_scan import TopicScan, overlong
from mindprint_ray.curriculum.topics import FILES, TopicData
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


def _overlong_error(spec: RunSpec, scan: TopicScan, sft: list[int], dpo: list[int]) -> UserError:
    kind = "sft" if sft else "dpo"
    first = scan.get(kind).lines[(sft or dpo)[0]]
    return UserError(
        f"example is longer than {kind}.max_seq_length ({len(sft)} SFT and {len(dpo)} DPO "
        f"examples over the limit in topic '{scan.name}')",
        file=scan.paths[kind],
        line=first,
        field=f"{kind}.max_seq_length",
        hint="shorten the example, raise max_seq_length, or set curriculum.overlong to drop or truncate",
    )


def topic_stats(spec: RunSpec, scan: TopicScan) -> TopicStats:
    """Token counts of one topic and its examples over max_seq_length, with the over-long policy applied."""
    policy = spec.curriculum.overlong
    sft_over, dpo_over = overlong(spec, scan)
    if policy == "error" and (sft_over or dpo_over):
        raise _overlong_error(spec, scan, sft_over, dpo_over)
    d = scan.get("dpo")
    lengths, pairs = scan.get("sft").lengths, [max(pair) for pair in zip(d.lengths, d.rejected)]
    if policy == "drop":
        lengths, pairs = _without(lengths, sft_over), _without(pairs, dpo_over)
        if not lengths:
            raise UserError(
                f"every SFT example of topic '{scan.name}' is over max_seq_length and would be dropped",
                field="sft.max_seq_length",
                hint="raise max_seq_length or use overlong: truncate",
            )
    n_over = len(sft_over) + len(dpo_over)
    return TopicStats(
        topic=scan.name,
        sft=len(lengths),
        dpo=len(pairs),
        eval=len(scan.get("eval")),
        sft_tokens=sum(lengths),
        dpo_tokens=sum(pairs),
        p50=length_percentile(lengths, 50),
        p95=length_percentile(lengths, 95),
        max=max(lengths, default=0),
        sft_over=len(sft_over),
        dpo_over=len(dpo_over),
        action=({"drop": "dropped", "truncate": "truncated"}.get(policy, "-") if n_over else "-"),
    )


def _without(values: list, indices: list[int]) -> list:
    skip = set(indices)
    return [v for i, v in enumerate(values) if i not in skip]


def drop_overlong(spec: RunSpec, topic: TopicData, scan: TopicScan) -> None:
    """Under `overlong: drop`, remove the topic's over-long records (the scan of the same files says which)."""
    for kind, records in (("sft", topic.sft), ("dpo", topic.dpo), ("eval", topic.eval)):
        if [r.line for r in records] != scan.get(kind).lines:
            raise UserError(
                f"{FILES[kind]} of topic '{topic.name}' changed while it was being read",
                file=scan.paths.get(kind),
                hint="run again once the file is written",
            )
    if spec.curriculum.overlong == "drop":
        sft, dpo = overlong(spec, scan)
        topic.sft, topic.dpo = _without(topic.sft, sft), _without(topic.dpo, dpo)
