"""Which characters of a rendered conversation are the assistant's, for any chat template.

Assistant-only loss needs to know where each assistant turn starts and ends in the text the chat template
renders. Templates with `{% generation %}` markers say so themselves; most templates (SmolLM2's, and those of
many user models) do not. This module finds the turns by rendering prefixes: the text of messages[:i] with the
generation prompt ends where assistant turn i begins, and the text of messages[:i+1] ends just after it. The
turn is its content and the template's end-of-turn token (trailing whitespace the template adds is not), so the
model learns to stop. Templates where a shorter conversation does not render as a prefix of a longer one
(e.g. ones that rewrite earlier turns) cannot be split this way and are refused before training.

Pure Python: `render(messages, add_generation_prompt) -> str` is passed in, from jinja2 in the core
(`tokens.TokenCounter`) or from a tokenizer's `apply_chat_template` in the backends.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence

from mindprint_ray.curriculum import scan_cache
from mindprint_ray.curriculum.topics import Record
from mindprint_ray.errors import UserError

Render = Callable[[list[dict], bool], str]
PROBE = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi there."}]


class TemplateError(ValueError):
    """The chat template cannot be used for assistant-only loss; the message says why."""


def with_system(messages: list[dict] | str, system_prompt: str | None) -> list[dict]:
    """User text or a message list, with the spec's system prompt first when one is set and none is there."""
    messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    if system_prompt and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def assistant_spans(render: Render, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn in it."""
    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not full.startswith(through) or not through.startswith(before):
            raise TemplateError(
                f"the template does not render turn {i} as a prefix of the whole conversation "
                "(it rewrites earlier turns), so assistant turns cannot be located"
            )
        end = len(through.rstrip())
        if end <= len(before) or message["content"].strip() not in through[len(before) : end]:
            raise TemplateError(f"assistant turn {i}'s text is not where the template's generation prompt ends")
        spans.append((len(before), end))
    return full, spans


def end_of_turn_token(render: Render, special_tokens: Sequence[str]) -> str:
    """The special token that closes an assistant turn (e.g. `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`)."""
    text, [(start, end)] = assistant_spans(render, PROBE)
    turn = text[start:end]
    closing = [t for t in special_tokens if t and turn.endswith(t)]
    if not closing:
        raise TemplateError(
            "the template closes an assistant turn with no special token, so a trained model "
            f"would not know when to stop (an assistant turn renders as {turn!r})"
        )
    return max(closing, key=len)


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token that starts inside an assistant span, else 0 (offsets are per-token character spans)."""
    mask = []
    for start, end in offsets:
        inside = end > start and any(lo <= start < hi for lo, hi in spans)
        mask.append(int(inside))
    return mask


def conversation_tokens(
    tokenizer, messages: list[dict], assistant_only: bool = True, skip_turns: int = 0
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation through a Hugging Face tokenizer's chat template and, per token, 1 where it
    is trained: the assistant turns (content and end-of-turn token; the first `skip_turns` of them excepted),
    or every token when not `assistant_only`. One rule for the Ray and MLX backends."""
    text, spans = assistant_spans(hf_renderer(tokenizer), messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    return ids, token_mask(enc["offset_mapping"], spans[skip_turns:]) if assistant_only else [1] * len(ids)


def hf_renderer(tokenizer) -> Render:
    """`render(messages, add_generation_prompt)` through a Hugging Face tokenizer's own chat template."""

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def check_tokenizer(tokenizer, topics: Sequence, system_prompt: str | None, where: str) -> str:
    """`check_template` through a loaded tokenizer (what the trainers use) on every topic's SFT conversations
    and preference pairs (prompt + chosen); returns the end-of-turn token. A pass is remembered in the scan cache
    (`tokenizer_check_key`), so a restart on unchanged files, template and tokenizer does not render them again."""
    key = tokenizer_check_key(tokenizer, topics, system_prompt)
    entry = scan_cache.load(key) if key else None
    if entry is not None:
        return entry["end_of_turn"]
    eot = check_template(
        hf_renderer(tokenizer), tokenizer.all_special_tokens, training_conversations(topics), system_prompt, where
    )
    if key:
        scan_cache.store(key, {"end_of_turn": eot})
    return eot


def tokenizer_check_key(tokenizer, topics: Sequence, system_prompt: str | None) -> str | None:
    """What a template check through transformers depends on: the transformers version, the tokenizer's template
    and special tokens, the system prompt, and per topic the SHA-256 of its sft/dpo files with the lines of the
    records checked (the over-long policy may have dropped some). None when a topic does not say where its
    records came from (`TopicData.digests`)."""
    from importlib.metadata import version

    files = []
    for t in topics:
        for kind in ("sft", "dpo"):
            records = getattr(t, kind)
            if records and kind not in getattr(t, "digests", {}):
                return None
            files.append([t.digests.get(kind), [r.line for r in records]])
    parts = [
        "hf-template-check",
        scan_cache.SCAN_VERSION,
        version("transformers"),
        tokenizer.chat_template,
        sorted(tokenizer.all_special_tokens),
        {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        system_prompt,
        files,
    ]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def training_conversations(topics: Sequence) -> list[Record]:
    """Every conversation the trainers render: the SFT examples and each pair's prompt + chosen answer."""
    pairs = [Record(r.file, r.line, {"messages": r.data["prompt"] + r.data["chosen"]}) for t in topics for r in t.dpo]
    return [r for t in topics for r in t.sft] + pairs


def template_hint() -> str:
    return (
        "give the model a chat template whose assistant turns end with a special token (e.g. ChatML's "
        "<|im_end|>) and that renders a conversation as a prefix of its continuations"
    )


def check_template(
    render: Render, special_tokens: Sequence[str], records: Iterable, system_prompt: str | None, template_file: str
) -> str:
    """Refuse a template that cannot train or stop; returns its end-of-turn token. `records` are SFT records
    (`file`, `line`, `data["messages"]`): a conversation the template cannot split names its file and line."""
    hint = template_hint()
    try:
        eot = end_of_turn_token(render, special_tokens)
    except TemplateError as e:
        raise UserError(f"chat template: {e}", file=template_file, hint=hint) from None
    except Exception as e:  # the template itself fails (raise_exception, bad syntax, missing variables)
        raise UserError(f"chat template does not render: {e}", file=template_file, hint=hint) from None
    for record in records:
        try:
            assistant_spans(render, with_system(record.data["messages"], system_prompt))
        except TemplateError as e:
            raise UserError(
                f"chat template of {template_file}: {e}",
                file=record.file,
                line=record.line,
                field="messages",
                hint=hint,
            ) from None
        except Exception as e:
            raise UserError(
                f"chat template of {template_file} fails on this conversation: {e}",
                file=record.file,
                line=record.line,
                field="messages",
                hint=hint,
            ) from None
    return eot
