"""Each topic's data in tokens, as the trainer sees it: the curriculum counted with the model's tokenizer and chat
template (or ~4 characters per token), after the over-long policy. The time model and the step budget read it.
Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from mindprint_ray.curriculum.data_scan import TopicScan, scan_curriculum
from mindprint_ray.curriculum.tokens import CHARS_PER_TOKEN, TokenCounter
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.spec.run_spec import RunSpec

TRAINING_STAGES = ("sft", "dpo")  # the trained stages of a topic, in order


@dataclass(frozen=True)
class TopicTokens:
    """One topic's data in tokens, as the trainer sees it (after the over-long policy)."""

    topic: str
    sft_examples: int
    sft_tokens: int  # one epoch, sum of example lengths (packing: no padding)
    dpo_pairs: int
    dpo_tokens: int  # one pass: prompt+chosen plus prompt+rejected per pair (real tokens)
    dpo_padded_tokens: int  # one pass: 2 x the longer side per pair (what the device computes)
    sft_lengths: tuple[int, ...] = ()  # each SFT example's length, in file order (what packing bins)

    @property
    def mean_sft_length(self) -> float:
        return self.sft_tokens / max(self.sft_examples, 1)

    @property
    def mean_dpo_length(self) -> float:
        return self.dpo_padded_tokens / max(2 * self.dpo_pairs, 1)


def topic_tokens(spec: RunSpec, scan: TopicScan) -> TopicTokens:
    """One topic's tokens from its files' scan: over-long examples dropped or capped as the policy says, DPO
    counted over the pairs DPO trains on (the held-out ones are not trained, split as training splits them)."""
    lengths, cap = scan.get("sft").lengths, spec.sft.max_seq_length
    sft = [min(lengths[i], cap) for i in scan.sft_train(spec)]
    d, cap = scan.get("dpo"), spec.dpo.max_seq_length
    trained = scan.dpo_train(spec) if spec.dpo.enabled else []  # over-long pairs already dropped under `drop`
    pairs = [(min(d.lengths[i], cap), min(d.rejected[i], cap)) for i in trained]
    return TopicTokens(
        scan.name,
        len(sft),
        sum(sft),
        len(pairs),
        sum(c + r for c, r in pairs),
        sum(2 * max(c, r) for c, r in pairs),
        tuple(sft),
    )


def count_topic_tokens(run: RunPlan, counter: TokenCounter | None = None) -> tuple[list[TopicTokens], str]:
    """Tokens per topic from the curriculum with the model's tokenizer (or ~4 chars/token), and how counted.
    Topics are scanned one at a time (`data_scan`, cached by content): no topic's records are held."""
    if counter is None:
        counter = TokenCounter.for_model(run.model_path)
    rows = [topic_tokens(run.spec, scan) for scan in scan_curriculum(run.spec, counter)]
    how = (
        "exact: the model's tokenizer and chat template"
        if counter.exact
        else f"approximate: ~{CHARS_PER_TOKEN:g} characters per token (no local tokenizer for {run.model_path})"
    )
    return rows, how
