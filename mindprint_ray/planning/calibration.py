"""The calibration store: measured MFU per (hardware profile, quantization), read by the time model.

`mindprint-ray calibrate RUN_DIR` (planning/run_measures.py) writes one entry per profile and quantization:
$MINDPRINT_CALIBRATION if set, else $XDG_CACHE_HOME/mindprint-ray/calibration.json (~/.cache/... by default).
Later estimates for that profile and quantization use the measured MFU instead of the profile's assumption.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mindprint_ray.errors import UserError
from mindprint_ray.runs.run_folder import atomic_write

ENV = "MINDPRINT_CALIBRATION"


def calibration_path() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mindprint-ray" / "calibration.json"


def load_calibration(path: Path | None = None) -> dict:
    path = path or calibration_path()
    if not path.is_file():
        return {"entries": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, not UTF-8
        raise UserError(
            f"cannot read the calibration file: {e}", file=path, hint=f"delete it or point {ENV} elsewhere"
        ) from None
    return data if isinstance(data, dict) and isinstance(data.get("entries"), dict) else {"entries": {}}


def entry_key(profile: str, quant: str) -> str:
    return f"{profile}/{quant}"


def lookup(profile: str, quant: str) -> dict | None:
    """The stored calibration for this profile and quantization, if any."""
    return load_calibration()["entries"].get(entry_key(profile, quant))


def store(entry: dict, path: Path | None = None) -> None:
    """Add or replace the entry for its profile and quantization."""
    path = path or calibration_path()
    data = load_calibration(path)
    data["entries"][entry_key(entry["profile"], entry["quant"])] = entry
    atomic_write(path, json.dumps(data, indent=2))
