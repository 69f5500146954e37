"""The rules for what users type that names a place: run and topic names, URLs, local paths, output targets.

Each rule lives here once; the spec, the command line, the MLX entry point and the Python facade call it.
Pure Python (no torch, ray or mlx). Every refusal is a UserError, and none echoes a secret it found.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from mindprint_ray.errors import UserError

NAME_MAX = 100
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_HINT = f"use letters, digits, '_', '.' and '-' (first a letter or digit, no '..', at most {NAME_MAX} characters)"
QUERY_SECRET = re.compile(  # query parameters of signed or keyed URLs
    r"(?:.*[_-])?(?:secret|password|passwd|pwd|token|key|sig|signature|credentials?)|x-amz-.*", re.IGNORECASE
)
URL_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]*@")
URL_QUERY_KEY = re.compile(r"://[^\s?#]*\?([^\s#]*)")
SECRET_HINT = (
    "remove it and provide credentials through the environment or an instance role "
    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN, WANDB_API_KEY, ...)"
)
PATH_MAX, PART_MAX = 4096, 255


# ---- names (runs, sweeps, topics) -----------------------------------------------------------------------


def name_problem(name: Any) -> str | None:
    """Why `name` cannot be a run or topic name (one folder, one S3 key segment), or None."""
    if not isinstance(name, str) or not name:
        return "is empty" if name == "" else f"must be a string, got {type(name).__name__}"
    if len(name) > NAME_MAX:
        return f"is {len(name)} characters long (at most {NAME_MAX})"
    if not NAME.fullmatch(name):
        return "may only hold letters, digits, '_', '.' and '-', and must start with a letter or digit"
    if ".." in name:
        return "may not hold '..'"
    return None


def check_run_name(name: Any, field: str = "name", file: str | Path | None = None, line: int | None = None) -> str:
    """A run or sweep name, wherever it enters (spec `name`, `--name`, the facade); returns it."""
    problem = name_problem(name)
    if problem:
        shown = repr(name) if isinstance(name, str) and len(name) <= NAME_MAX and "\0" not in name else "the name"
        raise UserError(
            f"run name {shown} {problem}",
            file=file,
            line=line,
            field=field,
            hint=f"{NAME_HINT}: a run is one folder under the storage path",
        )
    return name


def check_topic_name(topic: Any, field: str = "--topic") -> str:
    """A topic name given on the command line (`export --topic`, `eval --topics`): the same folder-name rule."""
    problem = name_problem(topic)
    if problem:
        raise UserError(
            f"topic {topic!r} {problem}", field=field, hint=f"{NAME_HINT}: a topic is one folder of data_dir"
        )
    return topic


# ---- strings of a config: credentials in URLs, NUL characters ---------------------------------------------


def url_has_credentials(value: str) -> bool:
    """True when a URL inside `value` carries user info (`scheme://KEY:SECRET@host`) or a secret query key."""
    if URL_USERINFO.search(value):
        return True
    for query in URL_QUERY_KEY.findall(value):
        if any(QUERY_SECRET.fullmatch(part.partition("=")[0]) for part in query.split("&")):
            return True
    return False


def string_problem(value: str) -> str | None:
    """Why a string may not stand in a config (without quoting it), or None."""
    if url_has_credentials(value):
        return (
            "holds a URL with credentials (user:password@ or a secret query parameter); "
            "secrets never go in config files"
        )
    if "\0" in value:
        return "holds a NUL character"
    return None


def find_bad_string(data: Any, path: tuple = ()) -> tuple[tuple, str] | None:
    """(path, problem) of the first string value (or key) of `data` that `string_problem` refuses."""
    if isinstance(data, str):
        problem = string_problem(data)
        return (path, problem) if problem else None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = find_bad_string(key, path) if isinstance(key, str) else None
        found = found or find_bad_string(value, path + (key,))
        if found:
            return found
    return None


def check_url_credentials(value: str, field: str) -> None:
    """Refuse a URL with credentials in it (the error names the field, never the secret)."""
    if url_has_credentials(value):
        raise UserError(
            "the URL holds credentials (user:password@ or a secret query parameter)", field=field, hint=SECRET_HINT
        )


# ---- local paths --------------------------------------------------------------------------------------------


def looks_like_local_path(value: str) -> bool:
    """What can only be a local path: /abs, ./x, ../x, ~, a backslash or drive letter, more than one '/', or an
    `a/b` whose first part exists here. A hub id `org/name` (or a bare name) is not."""
    if value.startswith(("/", "./", "../", "~")) or value in (".", "..") or "\\" in value:
        return True
    if re.match(r"[A-Za-z]:[\\/]", value):
        return True
    parts = value.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).exists())


def path_problem(value: str) -> str | None:
    """Why a local path cannot be opened on any file system here (too long), or None."""
    if len(value.encode("utf-8", "surrogateescape")) > PATH_MAX:
        return f"is longer than {PATH_MAX} bytes"
    if any(len(p.encode("utf-8", "surrogateescape")) > PART_MAX for p in re.split(r"[\\/]", value)):
        return f"has a part longer than {PART_MAX} bytes"
    return None


# ---- output targets -----------------------------------------------------------------------------------------


def _ancestor_file(path: Path) -> Path | None:
    """The first existing ancestor of `path` when it is a file (then nothing can be created below it)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_dir(path: str | Path, field: str, marker: str | None = None) -> Path:
    """A folder a command writes into: missing (it is created) or a folder. With `marker`, an existing non-empty
    folder must hold that file (an earlier output of the same command), so nothing else is overwritten."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError("exists and is a file, not a folder", file=path, field=field, hint="choose a folder path")
    blocker = _ancestor_file(path)
    if blocker:
        raise UserError(f"cannot be created: {blocker} is a file", file=path, field=field, hint="choose a folder path")
    if marker and path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise UserError(
            f"is a folder with other contents (no {marker}); writing there would overwrite them",
            file=path,
            field=field,
            hint="choose a new or empty folder",
        )
    return path


def check_output_file(path: str | Path, field: str) -> Path:
    """A file a command writes: not a folder, and in a folder that exists."""
    path = Path(path)
    if path.is_dir():
        raise UserError("is a folder, not a file", file=path, field=field, hint="give a file name, e.g. scores.json")
    if not path.absolute().parent.is_dir():
        raise UserError(
            f"its folder {path.absolute().parent} does not exist",
            file=path,
            field=field,
            hint="create the folder first, or write elsewhere",
        )
    return path


def check_finite(value: float | None, field: str) -> float | None:
    """A number from the command line: NaN and infinity are refused (click accepts them)."""
    if value is not None and not math.isfinite(value):
        raise UserError(f"must be a finite number (got {value})", field=field)
    return value
