"""Curriculum records as token ids with loss masks (SFT: assistant turns only; DPO: responses), and batches."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from mindprint_ray.curriculum.chat_template import conversation_tokens, with_system
from mindprint_ray.curriculum.topics import Record

PAD_MULTIPLE = 32  # batch widths are 1 + a multiple of this (see padded_width)


@dataclass
class Sequence:
    """Token ids and, per token, whether it is a training target."""

    tokens: list[int]
    target: list[bool]


@dataclass
class Pair:
    """A preference pair, with the reference model's summed log-probs of each response once precomputed."""

    chosen: Sequence
    rejected: Sequence
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


@dataclass
class Batch:
    """Right-padded tokens [B, T] and the target mask over positions 1..T-1 ([B, T-1])."""

    tokens: object
    mask: object
    num_tokens: int


def masked_sequence(
    tokenizer, messages: list[dict], max_len: int, assistant_only: bool = True, skip_turns: int = 0
) -> Sequence:
    """The conversation with its trained tokens marked by the core's rule (`chat_template.conversation_tokens`,
    as on the Ray path), cut to `max_len`."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper around the HF tokenizer
    ids, mask = conversation_tokens(hf, messages, assistant_only, skip_turns)
    return Sequence(ids[:max_len], [bool(t) for t in mask][:max_len])


def sft_sequence(tokenizer, messages: list[dict], max_len: int, assistant_only: bool = True) -> Sequence:
    return masked_sequence(tokenizer, messages, max_len, assistant_only)


def response_sequence(tokenizer, prompt: list[dict], response: list[dict], max_len: int) -> Sequence:
    """prompt + response with the response's assistant turns as targets."""
    earlier = sum(m["role"] == "assistant" for m in prompt)
    return masked_sequence(tokenizer, prompt + response, max_len, skip_turns=earlier)


def sft_sequences(
    tokenizer, records: list[Record], system: str | None, max_len: int, assistant_only: bool
) -> list[Sequence]:
    seqs = [sft_sequence(tokenizer, with_system(r.data["messages"], system), max_len, assistant_only) for r in records]
    return [s for s in seqs if any(s.target[1:])]


def dpo_pairs(tokenizer, records: list[Record], system: str | None, max_len: int) -> list[Pair]:
    pairs = []
    for r in records:
        prompt = with_system(r.data["prompt"], system)
        pair = Pair(
            response_sequence(tokenizer, prompt, r.data["chosen"], max_len),
            response_sequence(tokenizer, prompt, r.data["rejected"], max_len),
        )
        if any(pair.chosen.target[1:]) and any(pair.rejected.target[1:]):
            pairs.append(pair)
    return pairs


def padded_width(longest: int, multiple: int = PAD_MULTIPLE) -> int:
    """1 + the model's input positions (longest - 1) rounded up to `multiple`, as mlx-lm's batches: the compiled
    step is traced once per shape, so widths fall into few buckets. Right padding after the real tokens changes
    no real position's log-prob (causal attention); the mask excludes the padding from every loss."""
    return 1 + multiple * max(1, math.ceil((longest - 1) / multiple))


def pad(seqs: list[Sequence], pad_id: int = 0, multiple: int = PAD_MULTIPLE) -> Batch:
    import mlx.core as mx
    import numpy as np

    width = padded_width(max(len(s.tokens) for s in seqs), multiple)
    tokens = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.float32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s.tokens)] = s.tokens
        mask[i, : len(s.target)] = s.target
    return Batch(mx.array(tokens), mx.array(mask[:, 1:]), sum(len(s.tokens) for s in seqs))


def shuffled_batches(items: list, batch_size: int, seed: int) -> Iterator[list]:
    """Endless batches of `batch_size` items, reshuffled every pass (epoch), with a fixed seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(items)).tolist()
        for i in range(0, len(order), batch_size):
            yield [items[j] for j in order[i : i + batch_size]]
