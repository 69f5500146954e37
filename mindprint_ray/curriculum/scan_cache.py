"""The on-disk cache of data-file scans (`data_scan.FileScan`), keyed by what a scan's result depends on.

A key is the SHA-256 of: the scan format version, the file's kind (sft, dpo, eval), the SHA-256 of the file's
bytes, the token counter's fingerprint (tokenizer.json, chat template, named and special tokens) and the spec's
system prompt. Anything else a scan could depend on is not in it: a changed file, tokenizer, template or system
prompt is a new key, so a stale entry is never read. Lengths are stored uncapped, so max_seq_length and the
over-long policy apply after the cache. Entries live in `$MINDPRINT_CACHE/curriculum/` (else
~/.cache/mindprint-ray/curriculum/) as JSON, written to a temp name and renamed. Only scans that passed every
check are stored: a file with an error is scanned (and reported) again. Where the cache cannot be written, the
entries of this process are kept in memory instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from mindprint_ray.runs.storage import local_cache_root

SCAN_VERSION = 1  # raise when a scan's content or meaning changes
_IN_MEMORY: dict[str, dict] = {}  # entries this process could not write to disk


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def scan_key(kind: str, digest: str, fingerprint: str, system_prompt: str | None) -> str:
    parts = [SCAN_VERSION, kind, digest, fingerprint, system_prompt]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


def cache_dir() -> Path:
    return local_cache_root() / "curriculum"


def load(key: str) -> dict | None:
    """The entry stored under `key`, or None (missing, unreadable or not the current format)."""
    if key in _IN_MEMORY:
        return _IN_MEMORY[key]
    path = cache_dir() / f"{key}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("key") == key else None


def store(key: str, entry: dict) -> None:
    """Write the entry atomically; on a read-only or full disk keep it for this process only."""
    entry = {**entry, "key": key}
    folder = cache_dir()
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f, ensure_ascii=False, separators=(",", ":"))
        os.replace(tmp, folder / f"{key}.json")
    except OSError:
        _IN_MEMORY[key] = entry
        if tmp:
            Path(tmp).unlink(missing_ok=True)
