"""Curriculum data: the topic layout, validation with file:line errors, and token statistics."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from .errors import UserError
from .spec import RunSpec

ROLES = ("system", "user", "assistant")
FILES = {"sft": "sft.jsonl", "dpo": "dpo.jsonl", "eval": "eval.jsonl"}


@dataclass
class Record:
    """One validated example with where it came from."""

    file: str
    line: int
    data: dict


@dataclass
class TopicData:
    name: str
    sft: list[Record] = field(default_factory=list)
    dpo: list[Record] = field(default_factory=list)
    eval: list[Record] = field(default_factory=list)


# ---- reading --------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; encoding and JSON errors name the line."""
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError("the file is empty", file=path, hint="add one JSON object per line, or remove the topic")
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})", file=path,
                            line=number, hint="save the file as UTF-8") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"invalid JSON: {e.msg} at column {e.colno}", file=path, line=number,
                            hint="each line must be one complete JSON object") from None
        if not isinstance(obj, dict):
            raise UserError(f"expected a JSON object, got {type(obj).__name__}", file=path, line=number)
        yield number, obj


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
            raise UserError(f"role '{role}' is not one of {', '.join(allowed)}", field=f"{f}.role",
                            hint="rename the role", **where)
        if "content" not in m:
            raise UserError("missing field 'content'", field=f"{f}.content", **where)
        _text(m["content"], f"{f}.content", where)
        if role == "system" and i != 0:
            raise UserError("a system message may only come first", field=f"{f}.role", **where)
        if role == previous and role != "system":
            raise UserError(f"two '{role}' turns in a row", field=f"{f}.role",
                            hint="alternate user and assistant turns", **where)
        previous = role
    return messages


def check_sft(obj: dict, where: dict) -> dict:
    messages = check_messages(_need(obj, "messages", where, 'write {"messages": [{"role": "user", ...}, ...]}'),
                              "messages", where)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("the conversation has no assistant turn", field="messages",
                        hint="add the teacher's answer as an assistant message", **where)
    if messages[-1]["role"] != "assistant":
        raise UserError("the conversation ends with a user turn", field=f"messages[{len(messages) - 1}]",
                        hint="end with the assistant's answer", **where)
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
        raise UserError("chosen is identical to rejected", field="rejected",
                        hint="the rejected answer must differ (a flat or wrong answer), or drop the pair", **where)
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
        raise UserError("an eval item needs a reference answer or multiple-choice options", field="reference",
                        hint="add 'reference' (open question) or 'choices' + 'answer'", **where)
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


def load_topic(data_dir: Path, topic: str, kinds: list[str]) -> TopicData:
    folder = data_dir / topic
    if not folder.is_dir():
        raise UserError(f"topic folder '{topic}' not found in {data_dir}", file=folder, field="curriculum.topics",
                        hint=f"create {folder}/ with {', '.join(FILES[k] for k in kinds)}, or remove the topic")
    data = TopicData(topic)
    for kind in kinds:
        path = folder / FILES[kind]
        if not path.is_file():
            raise UserError(f"missing {FILES[kind]} for topic '{topic}'", file=path,
                            hint="add the file" + (" or set dpo.enabled: false" if kind == "dpo" else "")
                            + (" or set eval.enabled: false" if kind == "eval" else ""))
        records = getattr(data, kind)
        for number, obj in read_jsonl(path):
            where = {"file": str(path), "line": number}
            records.append(Record(str(path), number, CHECKS[kind](obj, where)))
    return data


def load_curriculum(spec: RunSpec) -> list[TopicData]:
    """Validate every file of every topic; the first problem is raised as a UserError."""
    from .storage import materialize_data_dir

    data_dir = Path(materialize_data_dir(spec.curriculum.data_dir))
    if not data_dir.is_dir():
        raise UserError(f"data_dir '{data_dir}' does not exist", field="curriculum.data_dir",
                        hint="point curriculum.data_dir at the folder holding one sub-folder per topic")
    kinds = needed_files(spec)
    topics = [load_topic(data_dir, t, kinds) for t in spec.curriculum.topics]
    if spec.eval.enabled:
        load_persona(spec.persona_path)
    return topics


def load_persona(path: Path) -> dict:
    """The persona profile: lexicon terms and voice-marker groups (hedges, confidence, teaching)."""
    if not path.is_file():
        raise UserError("persona profile not found", file=path, field="curriculum.persona",
                        hint="add persona.yaml beside the data (lexicon + voice_markers), or set eval.enabled: false")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse persona profile: {e}", file=path) from None
    if not isinstance(data, dict):
        raise UserError("persona profile must be a mapping", file=path)
    lexicon, markers = data.get("lexicon"), data.get("voice_markers")
    if not isinstance(lexicon, list) or not lexicon or not all(isinstance(t, str) for t in lexicon):
        raise UserError("needs a non-empty list of terms", file=path, field="lexicon")
    if not isinstance(markers, dict) or not markers or not all(
        isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in markers.values()
    ):
        raise UserError("needs groups of marker phrases (hedges, confidence, teaching)", file=path,
                        field="voice_markers")
    return data
