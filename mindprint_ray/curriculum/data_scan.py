"""One streaming pass over a topic's data files: what validation, token statistics and the overlap warning need,
without holding the records.

Each record is checked (`topics.CHECKS`, errors with file, line and field), its conversation (the spec's system
prompt first) is rendered through the chat template and, with a local tokenizer, split into turns as the trainers
split it (`chat_template.assistant_spans`; a conversation the template cannot split names its line), and its
tokens are counted in batches. A file's scan keeps per record only its line, token lengths and short digests;
it is stored in `scan_cache` and reused while the file, tokenizer, template and system prompt are unchanged.
Memory is one batch of records plus a few integers per record of one topic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mindprint_ray.curriculum import scan_cache
from mindprint_ray.curriculum.chat_template import TemplateError, assistant_spans, template_hint, with_system
from mindprint_ray.curriculum.tokens import TokenCounter
from mindprint_ray.curriculum.topics import (
    Overlap,
    check_eval_files,
    curriculum_dir,
    heldout_ids,
    needed_files,
    normalize_text,
    pair_id,
    read_records,
    topic_files,
)
from mindprint_ray.errors import UserError
from mindprint_ray.spec.run_spec import RunSpec

BATCH = 512  # records rendered before their texts are counted in one tokenizer batch


def text_digest(text: str) -> str:
    """16 hex digits of the BLAKE2b of the normalised text: two texts with one digest count as the same."""
    return hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=8).hexdigest()


@dataclass
class FileScan:
    """One data file, record by record in file order, without its text."""

    kind: str  # sft, dpo or eval
    lines: list[int] = field(default_factory=list)  # each record's line number
    lengths: list[int] = field(default_factory=list)  # tokens: the SFT conversation / a pair's prompt + chosen
    rejected: list[int] = field(default_factory=list)  # DPO: tokens of prompt + rejected
    pair_ids: list[str] = field(default_factory=list)  # DPO: topics.pair_id of the prompt (the held-out split)
    prompts: list[list[str]] = field(default_factory=list)  # SFT/DPO: text_digest of each user turn
    questions: list[list[str]] = field(default_factory=list)  # eval: [text_digest, question]

    def __len__(self) -> int:
        return len(self.lines)


@dataclass
class TopicScan:
    """A topic's files (kind -> path) and their scans."""

    name: str
    paths: dict[str, str]
    files: dict[str, FileScan]
    heldout_fraction: float

    def get(self, kind: str) -> FileScan:
        return self.files.get(kind) or FileScan(kind)

    def sft_train(self, spec: RunSpec) -> list[int]:
        """Indices of the SFT examples that training uses (all but the over-long ones under `overlong: drop`)."""
        dropped = set(overlong(spec, self)[0]) if spec.curriculum.overlong == "drop" else set()
        return [i for i in range(len(self.get("sft"))) if i not in dropped]

    def dpo_train(self, spec: RunSpec) -> list[int]:
        """Indices of the DPO pairs that training uses, as `validate_run`'s records give them: the pairs the
        over-long policy keeps, less those `topics.split_pairs` holds out of them (`TopicData.dpo_train`)."""
        ids = self.get("dpo").pair_ids
        dropped = set(overlong(spec, self)[1]) if spec.curriculum.overlong == "drop" else set()
        kept = [i for i in range(len(ids)) if i not in dropped]
        held = heldout_ids([ids[i] for i in kept], self.heldout_fraction)
        return [i for i in kept if ids[i] not in held]


def overlong(spec: RunSpec, scan: TopicScan) -> tuple[list[int], list[int]]:
    """Indices (file order) of the SFT examples and DPO pairs longer than their stage's max_seq_length."""
    d = scan.get("dpo")
    sft = [i for i, n in enumerate(scan.get("sft").lengths) if n > spec.sft.max_seq_length]
    dpo = [i for i, pair in enumerate(zip(d.lengths, d.rejected)) if max(pair) > spec.dpo.max_seq_length]
    return sft, dpo


# ---- one record ----------------------------------------------------------------------------------------------


def checked_text(counter: TokenCounter, messages: list[dict], where: dict) -> str:
    """The conversation as the template renders it; with a local tokenizer, split into its assistant turns too
    (what training needs), a conversation that cannot be split being a UserError at its line."""
    if not counter.exact:
        return counter.render(messages)
    try:
        text, _ = assistant_spans(lambda m, gen: counter.render_chat(m, gen), messages)
    except TemplateError as e:
        raise UserError(
            f"chat template of {counter.template_file}: {e}", field="messages", hint=template_hint(), **where
        ) from None
    except Exception as e:  # the template fails on this conversation (raise_exception, missing variables)
        raise UserError(
            f"chat template of {counter.template_file} fails on this conversation: {e}",
            field="messages",
            hint=template_hint(),
            **where,
        ) from None
    return text


def user_digests(messages: list[dict]) -> list[str]:
    return [text_digest(m["content"]) for m in messages if m["role"] == "user"]


def record_texts(kind: str, data: dict, counter: TokenCounter, system: str | None, where: dict) -> list[str]:
    """The texts whose tokens a record costs: the SFT conversation; prompt + chosen and prompt + rejected."""
    if kind == "sft":
        return [checked_text(counter, with_system(data["messages"], system), where)]
    prompt = with_system(data["prompt"], system)
    return [checked_text(counter, prompt + data["chosen"], where), counter.render(prompt + data["rejected"])]


# ---- one file ------------------------------------------------------------------------------------------------


def scan_file(path: Path, kind: str, counter: TokenCounter, system: str | None) -> FileScan:
    """Check and measure every record of one file, holding at most BATCH of them."""
    out, texts = FileScan(kind), []
    for record in read_records(path, kind):
        out.lines.append(record.line)
        data = record.data
        if kind == "eval":
            out.questions.append([text_digest(data["question"]), data["question"]])
            continue
        if kind == "dpo":
            out.pair_ids.append(pair_id(data["prompt"]))
        out.prompts.append(user_digests(data["messages"] if kind == "sft" else data["prompt"]))
        texts.extend(record_texts(kind, data, counter, system, {"file": record.file, "line": record.line}))
        if len(texts) >= BATCH:
            _count(out, counter.lengths(texts))
            texts = []
    if texts:
        _count(out, counter.lengths(texts))
    return out


def _count(out: FileScan, lengths: list[int]) -> None:
    if out.kind == "sft":
        out.lengths.extend(lengths)
    else:
        out.lengths.extend(lengths[0::2])
        out.rejected.extend(lengths[1::2])


def cached_scan(path: Path, kind: str, counter: TokenCounter, system: str | None) -> FileScan:
    """The file's scan from the cache, or scanned now (and stored)."""
    key = scan_cache.scan_key(kind, scan_cache.file_digest(path), counter.fingerprint, system)
    entry = scan_cache.load(key)
    if entry is not None:
        return FileScan(**entry["scan"])
    scan = scan_file(path, kind, counter, system)
    scan_cache.store(key, {"scan": asdict(scan)})
    return scan


# ---- the curriculum ------------------------------------------------------------------------------------------


def scan_topic(data_dir: Path, name: str, spec: RunSpec, counter: TokenCounter, kinds: list[str]) -> TopicScan:
    paths = topic_files(data_dir, name, kinds)
    system = spec.curriculum.system_prompt
    files = {kind: cached_scan(path, kind, counter, system) for kind, path in paths.items()}
    return TopicScan(name, {k: str(p) for k, p in paths.items()}, files, spec.eval.heldout_pairs)


def scan_curriculum(spec: RunSpec, counter: TokenCounter) -> Iterator[TopicScan]:
    """Each topic's scan in spec order, one at a time; the persona and general text are checked after the last."""
    data_dir, kinds = curriculum_dir(spec), needed_files(spec)
    for name in spec.curriculum.topics:
        yield scan_topic(data_dir, name, spec, counter, kinds)
    check_eval_files(spec)


def scan_overlaps(spec: RunSpec, counter: TokenCounter) -> list[Overlap]:
    """`topics.eval_overlaps` from the scans: the eval questions of every topic first (few), then each topic's
    trained prompts (SFT user turns, the user turns of the pairs DPO trains on) looked up among them, one topic at
    a time."""
    evals = []
    for scan in scan_curriculum(spec, counter):
        e = scan.get("eval")
        evals += [(scan.name, scan.paths["eval"], line, d, q) for line, (d, q) in zip(e.lines, e.questions)]
    wanted, found = {e[3] for e in evals}, {}
    for scan in scan_curriculum(spec, counter):
        trained = [("SFT prompt", "sft", i) for i in scan.sft_train(spec)]
        trained += [("DPO prompt", "dpo", i) for i in scan.dpo_train(spec)]
        for label, kind, i in trained:
            for d in scan.get(kind).prompts[i]:
                if d in wanted:
                    found.setdefault(d, (label, scan.paths[kind], scan.get(kind).lines[i]))
    return [Overlap(topic, file, line, *found[d], q) for topic, file, line, d, q in evals if d in found]
