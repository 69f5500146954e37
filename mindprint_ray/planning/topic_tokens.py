"""Each topic's data in tokens, as the trainer sees it: the curriculum counted with the model's tokenizer and chat
template (or ~4 characters per token), after the over-long policy. The time model and the step budget read it.
Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from mindprint_ray.curriculum.data_stats import pair_lengths, sft_length
from mindprint_ray.curriculum.tokens import CHARS_PER_TOKEN, TokenCounter
from mindprint_ray.curriculum.topics import load_curriculum
from mindprint_ray.planning.run_plan import RunPlan

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


def count_topic_tokens(run: RunPlan, counter: TokenCounter | None = None) -> tuple[list[TopicTokens], str]:
    """Tokens per topic from the curriculum with the model's tokenizer (or ~4 chars/token), and how counted."""
    if counter is None:
        counter = TokenCounter.for_model(run.model_path)
    spec, drop = run.spec, run.spec.curriculum.overlong == "drop"
    rows = []
    for t in load_curriculum(spec):
        sft = [sft_length(counter, r) for r in t.sft]
        sft = [min(n, spec.sft.max_seq_length) for n in sft if not (drop and n > spec.sft.max_seq_length)]
        pairs = [pair_lengths(counter, r) for r in t.dpo_train] if spec.dpo.enabled else []  # held-out: not trained
        cap = spec.dpo.max_seq_length
        pairs = [(min(c, cap), min(r, cap)) for c, r in pairs if not (drop and max(c, r) > cap)]
        rows.append(
            TopicTokens(
                t.name,
                len(sft),
                sum(sft),
                len(pairs),
                sum(c + r for c, r in pairs),
                sum(2 * max(c, r) for c, r in pairs),
                tuple(sft),
            )
        )
    how = (
        "exact: the model's tokenizer and chat template"
        if counter.exact
        else f"approximate: ~{CHARS_PER_TOKEN:g} characters per token (no local tokenizer for {run.model_path})"
    )
    return rows, how
