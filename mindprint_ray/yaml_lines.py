"""Read a YAML file into plain data plus a map from field path to line number, for error messages."""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import UserError

Path_ = tuple  # a field path such as ("sft", "learning_rate") or ("lora", "zones", 0, "modules")


def _walk(node: yaml.Node, path: tuple, lines: dict) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (key.value,)
            _walk(value, child, lines)
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines)


def load_yaml_with_lines(path: str | Path) -> tuple[object, dict[tuple, int]]:
    """Parse a YAML file; syntax and encoding problems become a UserError naming file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError("file not found", file=path, hint="check the path of the config file") from None
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror}", file=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 (byte 0x{raw[e.start]:02x})", file=path, line=line,
                        hint="save the file as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"YAML syntax error: {problem}", file=path,
                        line=mark.line + 1 if mark else None, hint="fix the YAML syntax at that line") from None
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def line_for(lines: dict[tuple, int], path: tuple) -> int | None:
    """The line of the deepest known prefix of `path` (a missing field points at its parent)."""
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None
