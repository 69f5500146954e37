"""The one YAML reader for everything users hand in (run specs, persona, model configs, price files, the cluster
runtime env, a run's spec.yaml): plain data plus a map from field path to line number, for error messages.

Bounded: a file over MAX_BYTES, a document whose aliases expand to more than MAX_NODES nodes ("billion laughs"),
nesting deeper than MAX_DEPTH, a recursive alias, or a key given twice in one mapping is a UserError naming the
file and line, never a hang, a traceback or a silently dropped value.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mindprint_ray.errors import UserError

MAX_BYTES = 16 * 1024**2
MAX_NODES = 100_000  # nodes after alias expansion; the largest shipped spec has a few hundred
MAX_DEPTH = 64
MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlLimit(Exception):
    """A document over one of the bounds; `line` is where it was noticed."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message, self.line = message, line


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_keys(node: yaml.MappingNode) -> None:
    """A key given twice in one mapping: YAML would keep only the last value without a word."""
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == MERGE_TAG:
            continue
        line = key.start_mark.line + 1
        if key.value in seen:
            raise YamlLimit(
                f"key '{key.value}' is given twice (lines {seen[key.value]} and {line}); YAML would "
                "silently keep only the last",
                line,
            )
        seen[key.value] = line


def check_bounds(root: yaml.Node) -> None:
    """Expanded size and depth of the node graph (an alias counts at every use), without expanding it."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, depth)
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key, line = id(node), node.start_mark.line + 1
        if finished:
            kids = [done[id(k)] for k in _children(node)]
            size, depth = 1 + sum(k[0] for k in kids), 1 + max((k[1] for k in kids), default=0)
            open_.discard(key)
            done[key] = (size, depth)
            if size > MAX_NODES:
                raise YamlLimit(f"the document expands to more than {MAX_NODES:,} values (YAML aliases)", line)
            if depth > MAX_DEPTH:
                raise YamlLimit(f"nested more than {MAX_DEPTH} levels deep", line)
            continue
        if key in done:
            continue
        if key in open_:
            raise YamlLimit("a YAML alias refers to the node that contains it (recursive alias)", line)
        if isinstance(node, yaml.MappingNode):
            _check_keys(node)
        open_.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in done)


def compose_bounded(text: str) -> tuple[yaml.Node | None, object]:
    """(node graph, data) of one YAML document, bounds checked before any value is built.

    Raises yaml.YAMLError for syntax errors and YamlLimit for documents over a bound."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YamlLimit(f"nested more than {MAX_DEPTH} levels deep", None) from None
        if node is None:
            return None, None
        check_bounds(node)
        return node, loader.construct_document(node)
    finally:
        loader.dispose()


def _walk(node: yaml.Node, path: tuple, lines: dict) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (key.value if isinstance(key, yaml.ScalarNode) else "?",)
            _walk(value, child, lines)
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines)


def read_text(path: str | Path, hint: str = "check the path of the file") -> str:
    """A user's text file as UTF-8; missing, unreadable, too large or mis-encoded is a UserError naming it."""
    path = Path(path)
    try:
        if path.is_dir():
            raise UserError("is a folder, not a file", file=path, hint=hint)
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise UserError("file not found", file=path, hint=hint) from None
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror}", file=path, hint=hint) from None
    except ValueError:  # a NUL character in the path
        raise UserError("is not a valid path", field="path", hint=hint) from None
    if len(raw) > MAX_BYTES:
        raise UserError(f"larger than {MAX_BYTES // 1024**2} MiB", file=path, hint="this is not a config file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"not UTF-8 (byte 0x{raw[e.start]:02x})", file=path, line=line, hint="save the file as UTF-8"
        ) from None


def parse_yaml(text: str, file: str | Path | None = None) -> tuple[object, dict[tuple, int]]:
    """Parse YAML text; syntax errors and documents over a bound become a UserError naming file and line."""
    try:
        node, data = compose_bounded(text)
    except YamlLimit as e:
        raise UserError(
            e.message,
            file=file,
            line=e.line,
            hint="write the values out; anchors and aliases may not multiply a document",
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(
            f"YAML syntax error: {problem}",
            file=file,
            line=mark.line + 1 if mark else None,
            hint="fix the YAML syntax at that line",
        ) from None
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def load_yaml_with_lines(path: str | Path) -> tuple[object, dict[tuple, int]]:
    """Read and parse a YAML file: (data, field path -> line)."""
    return parse_yaml(read_text(path, "check the path of the config file"), path)


def load_yaml(path: str | Path, hint: str = "check the path of the file") -> object:
    """Read and parse a YAML file (the data only)."""
    return parse_yaml(read_text(path, hint), path)[0]


def yaml_value(raw: str, field: str) -> object:
    """A command-line value parsed as YAML (numbers, lists, booleans); text that is not YAML stays text."""
    try:
        return compose_bounded(raw)[1]
    except YamlLimit as e:
        raise UserError(e.message, field=field, hint="write the value out") from None
    except yaml.YAMLError:
        return raw


def line_for(lines: dict[tuple, int], path: tuple) -> int | None:
    """The line of the deepest known prefix of `path` (a missing field points at its parent)."""
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None
