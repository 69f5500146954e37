"""Curriculum data: the topic layout, validation with file:line errors, and token statistics."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mindprint_ray.errors import UserError
from mindprint_ray.runs.storage import materialize_data_dir
from mindprint_ray.spec.run_spec import EvalSection, RunSpec
from mindprint_ray.spec.yaml_lines import load_yaml

ROLES = ("system", "user", "assistant")
FILES = {"sft": "sft.jsonl", "dpo": "dpo.jsonl", "eval": "eval.jsonl"}
HELDOUT_DEFAULT: float = EvalSection.model_fields["heldout_pairs"].default  # the spec's eval.heldout_pairs


@dataclass
class Record:
    """One validated example with where it came from."""

    file: str
    line: int
    data: dict


@dataclass
class TopicData:
    """One topic's validated records. `heldout_fraction` (eval.heldout_pairs) of the DPO pairs is held out:
    DPO trains on `dpo_train`, the evaluation scores preference on `dpo_heldout` (see `split_pairs`)."""

    name: str
    sft: list[Record] = field(default_factory=list)
    dpo: list[Record] = field(default_factory=list)
    eval: list[Record] = field(default_factory=list)
    heldout_fraction: float = HELDOUT_DEFAULT
    digests: dict[str, str] = field(default_factory=dict)  # kind -> SHA-256 of the file the records came from

    @property
    def dpo_train(self) -> list[Record]:
        """The DPO pairs that training uses (all but the held-out ones, in file order)."""
        return split_pairs(self.dpo, self.heldout_fraction)[0]

    @property
    def dpo_heldout(self) -> list[Record]:
        """The DPO pairs that training never sees; the evaluation scores preference on these."""
        return split_pairs(self.dpo, self.heldout_fraction)[1]


# ---- held-out preference pairs ----------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: the form in which two questions count as the same."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def prompt_text(prompt: str | list[dict]) -> str:
    """A pair's prompt as one string: a bare string as it is, a message list as its contents, one per line."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def pair_id(prompt: str | list[dict]) -> str:
    """Stable id of a preference pair: 12 hex digits of the SHA-256 of its normalised prompt text."""
    return hashlib.sha256(normalize_text(prompt_text(prompt)).encode("utf-8")).hexdigest()[:12]


def heldout_count(n: int, fraction: float) -> int:
    """Pairs to hold out of `n`: fraction x n rounded half up, at least 1 from 4 pairs on, at most n - 1."""
    if fraction <= 0 or n < 2:
        return 0
    k = int(fraction * n + 0.5)
    return min(max(k, 1) if n >= 4 else k, n - 1)


def split_pairs(
    pairs: list, fraction: float, prompt: Callable[[Any], str | list[dict]] = lambda r: r.data["prompt"]
) -> tuple[list, list]:
    """(train, held_out), each in the input order: the pairs whose `pair_id` sorts first are held out.

    The one split rule (training, evaluation, the tiny model's warm-up and the time model all use it).
    A pair's side depends only on its prompt, so adding a pair moves at most one other pair across, and
    pairs sharing a prompt stay on the same side."""
    ids = [pair_id(prompt(p)) for p in pairs]
    held = heldout_ids(ids, fraction)
    return [p for p, i in zip(pairs, ids) if i not in held], [p for p, i in zip(pairs, ids) if i in held]


def heldout_ids(ids: list[str], fraction: float) -> set[str]:
    """The pair ids `split_pairs` holds out of pairs with these ids: the first in sorted order, until
    `heldout_count` pairs are covered (pairs sharing an id go together)."""
    want, counts, held, taken = heldout_count(len(ids), fraction), Counter(ids), set(), 0
    for key in sorted(counts):
        if taken >= want:
            break
        held.add(key)
        taken += counts[key]
    return held


# ---- reading --------------------------------------------------------------------------------------


MAX_LINE_BYTES = 8 * 1024**2  # one example; far above any context length the registry models have


def _lines(path: Path, digest=None) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a file read line by line, a line over MAX_LINE_BYTES refused without reading it all.
    `digest` (a hashlib object), when given, is updated with every byte read."""
    with path.open("rb") as f:
        number = 0
        while line := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            if digest is not None:
                digest.update(line)
            if len(line) > MAX_LINE_BYTES:
                raise UserError(
                    f"the line is longer than {MAX_LINE_BYTES // 1024**2} MiB",
                    file=path,
                    line=number,
                    hint="one JSON object per line; an example this long cannot fit any context",
                )
            yield number, line


def parse_json_line(text: str, path: Path, number: int) -> Any:
    """One JSON value; malformed, too deeply nested, or holding a number Python refuses is a UserError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"invalid JSON: {e.msg} at column {e.colno}",
            file=path,
            line=number,
            hint="each line must be one complete JSON object",
        ) from None
    except RecursionError:
        raise UserError(
            "the JSON is nested too deeply", file=path, line=number, hint="an example is a flat object of messages"
        ) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise UserError(f"invalid JSON value: {e}", file=path, line=number) from None


def read_jsonl(path: Path, digest=None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; encoding and JSON errors name the line."""
    seen = False
    for number, line in _lines(path, digest):
        if not line.strip():
            continue
        seen = True
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})",
                file=path,
                line=number,
                hint="save the file as UTF-8",
            ) from None
        obj = parse_json_line(text, path, number)
        if not isinstance(obj, dict):
            raise UserError(f"expected a JSON object, got {type(obj).__name__}", file=path, line=number)
        yield number, obj
    if not seen:
        raise UserError("the file is empty", file=path, hint="add one JSON object per line, or remove the topic")


# ---- record checks --------------------------------------------------------------------------------


def _need(obj: dict, key: str, where: dict, hint: str) -> Any:
    if key not in obj:
        raise UserError(f"missing field '{key}'", field=key, hint=hint, **where)
    return obj[key]


def _text(value: Any, fld: str, where: dict) -> str:
    if not isinstance(value, str):
        raise UserError(f"must be a string, got {type(value).__name__}", field=fld, **where)
    if not value.strip():
        raise UserError("is empty", field=fld, hint="write the text, or remove this example", **where)
    return value


def check_messages(messages: Any, fld: str, where: dict, allowed: tuple[str, ...] = ROLES) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError("must be a non-empty list of {role, content} messages", field=fld, **where)
    previous = None
    for i, m in enumerate(messages):
        f = f"{fld}[{i}]"
        if not isinstance(m, dict):
            raise UserError("each message must be an object with 'role' and 'content'", field=f, **where)
        if "role" not in m:
            raise UserError("missing field 'role'", field=f"{f}.role", hint="use system, user or assistant", **where)
        role = m["role"]
        if role not in allowed:
            raise UserError(
                f"role '{role}' is not one of {', '.join(allowed)}", field=f"{f}.role", hint="rename the role", **where
            )
        if "content" not in m:
            raise UserError("missing field 'content'", field=f"{f}.content", **where)
        _text(m["content"], f"{f}.content", where)
        if role == "system" and i != 0:
            raise UserError("a system message may only come first", field=f"{f}.role", **where)
        if role == previous and role != "system":
            raise UserError(
                f"two '{role}' turns in a row", field=f"{f}.role", hint="alternate user and assistant turns", **where
            )
        previous = role
    return messages


def check_sft(obj: dict, where: dict) -> dict:
    messages = check_messages(
        _need(obj, "messages", where, 'write {"messages": [{"role": "user", ...}, ...]}'), "messages", where
    )
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(
            "the conversation has no assistant turn",
            field="messages",
            hint="add the teacher's answer as an assistant message",
            **where,
        )
    if messages[-1]["role"] != "assistant":
        raise UserError(
            "the conversation ends with a user turn",
            field=f"messages[{len(messages) - 1}]",
            hint="end with the assistant's answer",
            **where,
        )
    return {"messages": messages}


def _as_messages(value: Any, fld: str, where: dict, role: str, allowed: tuple[str, ...]) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": _text(value, fld, where)}]
    return check_messages(value, fld, where, allowed)


def check_dpo(obj: dict, where: dict) -> dict:
    hint = "a preference pair needs prompt, chosen and rejected"
    prompt = _as_messages(_need(obj, "prompt", where, hint), "prompt", where, "user", ROLES)
    if prompt[-1]["role"] != "user":
        raise UserError("the prompt must end with a user turn", field="prompt", **where)
    chosen = _as_messages(_need(obj, "chosen", where, hint), "chosen", where, "assistant", ("assistant",))
    rejected = _as_messages(_need(obj, "rejected", where, hint), "rejected", where, "assistant", ("assistant",))
    if [m["content"].strip() for m in chosen] == [m["content"].strip() for m in rejected]:
        raise UserError(
            "chosen is identical to rejected",
            field="rejected",
            hint="the rejected answer must differ (a flat or wrong answer), or drop the pair",
            **where,
        )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def check_eval(obj: dict, where: dict) -> dict:
    question = _text(_need(obj, "question", where, "an eval item needs a question"), "question", where)
    out: dict[str, Any] = {"id": str(obj.get("id", where["line"])), "question": question}
    if "reference" in obj:
        out["reference"] = _text(obj["reference"], "reference", where)
    facts = obj.get("key_facts", [])
    if not isinstance(facts, list) or not all(isinstance(f, str) and f.strip() for f in facts):
        raise UserError("must be a list of non-empty strings", field="key_facts", **where)
    out["key_facts"] = facts
    if "choices" in obj:
        choices = obj["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise UserError("must be a list of at least two options", field="choices", **where)
        for i, c in enumerate(choices):
            _text(c, f"choices[{i}]", where)
        answer = _need(obj, "answer", where, "give the index of the correct choice")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise UserError(f"answer must be an index 0-{len(choices) - 1}", field="answer", **where)
        out["choices"], out["answer"] = choices, answer
    elif "reference" not in out:
        raise UserError(
            "an eval item needs a reference answer or multiple-choice options",
            field="reference",
            hint="add 'reference' (open question) or 'choices' + 'answer'",
            **where,
        )
    return out


CHECKS: dict[str, Callable[[dict, dict], dict]] = {"sft": check_sft, "dpo": check_dpo, "eval": check_eval}


# ---- topics ---------------------------------------------------------------------------------------


def needed_files(spec: RunSpec) -> list[str]:
    kinds = ["sft"]
    if spec.dpo.enabled:
        kinds.append("dpo")
    if spec.eval.enabled:
        kinds.append("eval")
    return kinds


def topic_files(data_dir: Path, topic: str, kinds: list[str]) -> dict[str, Path]:
    """kind -> path of each file the topic needs; a missing folder or file is a UserError."""
    folder = data_dir / topic
    if not folder.is_dir():
        raise UserError(
            f"topic folder '{topic}' not found in {data_dir}",
            file=folder,
            field="curriculum.topics",
            hint=f"create {folder}/ with {', '.join(FILES[k] for k in kinds)}, or remove the topic",
        )
    files = {}
    for kind in kinds:
        path = folder / FILES[kind]
        if not path.is_file():
            raise UserError(
                f"missing {FILES[kind]} for topic '{topic}'",
                file=path,
                hint="add the file"
                + (" or set dpo.enabled: false" if kind == "dpo" else "")
                + (" or set eval.enabled: false" if kind == "eval" else ""),
            )
        files[kind] = path
    return files


def read_records(path: Path, kind: str, digest=None) -> Iterator[Record]:
    """The file's checked records, one at a time (nothing else of the file is held)."""
    for number, obj in read_jsonl(path, digest):
        yield Record(str(path), number, CHECKS[kind](obj, {"file": str(path), "line": number}))


def load_topic(data_dir: Path, topic: str, kinds: list[str], heldout_fraction: float = HELDOUT_DEFAULT) -> TopicData:
    data = TopicData(topic, heldout_fraction=heldout_fraction)
    for kind, path in topic_files(data_dir, topic, kinds).items():
        digest = hashlib.sha256()
        getattr(data, kind).extend(read_records(path, kind, digest))
        data.digests[kind] = digest.hexdigest()
    return data


_DOWNLOADED: dict[str, str] = {}  # s3:// curricula this process has downloaded, and where to


def curriculum_dir(spec: RunSpec) -> Path:
    """The local folder of the curriculum (an `s3://` one downloaded to the cache once per process: validation
    reads the topics more than once); missing is a UserError."""
    uri = spec.curriculum.data_dir
    if uri not in _DOWNLOADED:
        local = materialize_data_dir(uri)
        if local != uri:
            _DOWNLOADED[uri] = local
    data_dir = Path(_DOWNLOADED.get(uri, uri))
    if not data_dir.is_dir():
        raise UserError(
            f"data_dir '{data_dir}' does not exist",
            field="curriculum.data_dir",
            hint="point curriculum.data_dir at the folder holding one sub-folder per topic",
        )
    return data_dir


def check_eval_files(spec: RunSpec) -> None:
    """The persona profile and the general-ability text, when the evaluation needs them."""
    if spec.eval.enabled:
        load_persona(spec.persona_path)
        if spec.eval.max_general_ppl_increase is not None:
            load_general_text(spec.general_text_path)


def load_curriculum(spec: RunSpec) -> list[TopicData]:
    """Validate every file of every topic; the first problem is raised as a UserError."""
    data_dir, kinds = curriculum_dir(spec), needed_files(spec)
    topics = [load_topic(data_dir, t, kinds, spec.eval.heldout_pairs) for t in spec.curriculum.topics]
    check_eval_files(spec)
    return topics


def load_persona(path: Path) -> dict:
    """The persona profile: lexicon terms and voice-marker groups (hedges, confidence, teaching)."""
    if not path.is_file():
        raise UserError(
            "persona profile not found",
            file=path,
            field="curriculum.persona",
            hint="add persona.yaml beside the data (lexicon + voice_markers), or set eval.enabled: false",
        )
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise UserError(
            "persona profile must be a mapping (lexicon: [...], voice_markers: {...})",
            file=path,
            hint="see data/curriculum/persona.yaml",
        )
    lexicon, markers = data.get("lexicon"), data.get("voice_markers")
    if not isinstance(lexicon, list) or not lexicon or not all(_phrase(t) for t in lexicon):
        raise UserError("needs a non-empty list of non-empty terms", file=path, field="lexicon")
    if (
        not isinstance(markers, dict)
        or not markers
        or not all(
            isinstance(k, str) and isinstance(v, list) and v and all(_phrase(x) for x in v) for k, v in markers.items()
        )
    ):
        raise UserError(
            "needs groups of marker phrases (hedges, confidence, teaching)", file=path, field="voice_markers"
        )
    return data


def _phrase(value: Any) -> bool:
    """A persona term or marker: a string with text in it (an empty one would match every answer)."""
    return isinstance(value, str) and bool(value.strip())


def load_general_text(path: Path) -> list[dict]:
    """The general-ability guard's neutral text: {question, answer} items from JSONL or YAML (`items:` or a list)."""
    if not path.is_file():
        raise UserError(
            "general-ability text not found",
            file=path,
            field="eval.general_text",
            hint="point eval.general_text at a JSONL/YAML file of {question, answer} items, "
            "or set eval.max_general_ppl_increase: null",
        )
    if path.suffix == ".jsonl":
        rows = [({"file": str(path), "line": n}, "", obj) for n, obj in read_jsonl(path)]
    else:
        data = load_yaml(path)
        items = data.get("items") if isinstance(data, dict) else data
        if not isinstance(items, list) or not items:
            raise UserError("needs a non-empty list of {question, answer} items", file=path, field="items")
        rows = [({"file": str(path)}, f"items[{i}].", obj) for i, obj in enumerate(items)]
    return [_general_item(obj, where, label) for where, label, obj in rows]


def _general_item(obj: Any, where: dict, label: str) -> dict:
    for key in ("question", "answer"):
        if not isinstance(obj, dict) or not isinstance(obj.get(key), str) or not obj[key].strip():
            raise UserError(
                f"needs a non-empty '{key}' string",
                field=label + key,
                hint="each item is {question: ..., answer: ...} in plain text",
                **where,
            )
    return {"question": obj["question"], "answer": obj["answer"]}


# ---- eval items that training has seen -------------------------------------------------------------


@dataclass
class Overlap:
    """An eval question (open or multiple-choice) that is also a training prompt: an SFT user turn, or the
    prompt of a DPO pair that DPO trains on (not a held-out one). `validate` prints it as a warning."""

    topic: str
    file: str
    line: int
    kind: str  # "SFT prompt" or "DPO prompt"
    other_file: str
    other_line: int
    question: str

    def message(self) -> str:
        short = self.question if len(self.question) <= 70 else self.question[:67] + "..."
        return (
            f'{self.file}:{self.line}: eval question "{short}" is also a trained {self.kind} at '
            f"{self.other_file}:{self.other_line}; it does not measure held-out ability"
        )


def training_prompts(topics: list[TopicData]) -> dict[str, tuple[str, Record]]:
    """Normalised user turn -> (kind, first record) over every topic's SFT examples and DPO train pairs."""
    seen: dict[str, tuple[str, Record]] = {}
    for t in topics:
        for kind, records, key in (("SFT prompt", t.sft, "messages"), ("DPO prompt", t.dpo_train, "prompt")):
            for r in records:
                for msg in r.data[key]:
                    if msg["role"] == "user":
                        seen.setdefault(normalize_text(msg["content"]), (kind, r))
    return seen


def eval_overlaps(topics: list[TopicData]) -> list[Overlap]:
    """Eval questions of any topic that equal (case, whitespace and punctuation aside) a trained prompt."""
    trained, out = training_prompts(topics), []
    for t in topics:
        for r in t.eval:
            hit = trained.get(normalize_text(r.data["question"]))
            if hit:
                kind, other = hit
                out.append(Overlap(t.name, r.file, r.line, kind, other.file, other.line, r.data["question"]))
    return out
