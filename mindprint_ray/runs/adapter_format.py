"""LoRA adapters between PEFT and mlx-lm formats, on numpy only (safetensors' numpy API; no torch, no mlx).

PEFT: `base_model.model.<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r], scaling alpha/r
(alpha/sqrt(r) with rsLoRA), per-module rank/alpha through `rank_pattern`/`alpha_pattern`.
mlx-lm: `<module>.lora_a` [in, r], `<module>.lora_b` [r, out], `y = Wx + scale * (x @ lora_a) @ lora_b`,
and one `lora_parameters` (rank, scale) for the whole adapter.

Zones with different ranks or scales are written as ONE mlx-lm adapter that `mlx_lm.load` reads: every
module is zero-padded to the largest rank and its scale is folded into `lora_b` (scale_z / common scale).
Both are exact: padded rows and columns are zero, so they add nothing and stay zero under training.
The native groups (rank, alpha, scale, keys) are kept in `adapter_config.json` under `mindprint_groups`,
so the way back to PEFT restores each zone's own rank and alpha.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mindprint_ray.errors import UserError
from mindprint_ray.spec.inputs import check_output_dir

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
GROUPS_KEY = "mindprint_groups"
GROUP_FIELDS = {"rank", "alpha", "scale", "keys", "name"}


@dataclass
class Group:
    """Modules that share one native rank and scale (one zone, or several zones with equal settings)."""

    rank: int
    alpha: float
    scale: float
    keys: list[str]
    name: str = ""


@dataclass
class Adapter:
    """A LoRA adapter in MLX orientation: a[module] is [in, r], b[module] is [r, out], at native ranks."""

    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    groups: list[Group]
    dropout: float = 0.0
    use_rslora: bool = False
    base_model: str | None = None
    extra: dict = field(default_factory=dict)

    def modules(self) -> list[str]:
        return [k for g in self.groups for k in g.keys]


def peft_alpha(scale: float, rank: int, use_rslora: bool) -> float:
    """The PEFT lora_alpha that gives this scale at this rank."""
    return scale * (rank**0.5 if use_rslora else rank)


def peft_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / (rank**0.5 if use_rslora else rank)


# ---- safetensors on numpy ---------------------------------------------------------------------------


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float32 numpy arrays (bfloat16 is widened by hand)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise UserError(f"missing {path.name}", file=path, hint="point at an adapter folder")
    try:
        try:
            return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
        except TypeError:  # numpy has no bfloat16
            return _load_with_bf16(path)
    except (SafetensorError, struct.error, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"not a readable safetensors file ({e})",
            file=path,
            hint="the weights are damaged or not safetensors; export or convert the adapter again",
        ) from None


def _load_with_bf16(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    body = raw[8 + size :]
    kinds = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in kinds:
            raise UserError(f"tensor '{name}' has dtype {info['dtype']}", file=path, hint="expected float tensors")
        start, end = info["data_offsets"]
        values = np.frombuffer(body[start:end], dtype=kinds[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        out[name] = values.astype(np.float32)
    return out


def save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
        str(path),
        metadata={"format": "pt" if path.name == PEFT_WEIGHTS else "mlx"},
    )


def _read_config(folder: Path) -> dict:
    """adapter_config.json as a JSON object; missing, not UTF-8, not JSON or not an object is a UserError."""
    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"no {CONFIG} in {folder}", file=path, hint="point at an adapter folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON: {e.msg}", file=path, line=e.lineno) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"not a readable JSON file ({type(e).__name__})", file=path) from None
    if not isinstance(cfg, dict):
        raise UserError(
            f"must be a JSON object, got {type(cfg).__name__}",
            file=path,
            hint="write the adapter again (export or convert)",
        )
    return cfg


def _number(cfg: dict, key: str, path: Path, default: float | None = None, integer: bool = False) -> float:
    """A numeric config field (rank, alpha, scale, dropout): finite, not a boolean, > 0 for a rank."""
    value = default if cfg.get(key) is None else cfg[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or (integer and (value != int(value) or value < 1)):
        raise UserError(
            f"'{key}' must be a {'positive integer' if integer else 'finite number'}",
            file=path,
            field=key,
            hint="write the adapter again (export or convert)",
        )
    return int(value) if integer else float(value)


def _patterns(cfg: dict, key: str, path: Path) -> dict:
    """rank_pattern / alpha_pattern: a mapping of module regex -> number."""
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise UserError("must be an object of module pattern -> number", file=path, field=key)
    for pattern, number in value.items():
        _number({key: number}, key, path)
        try:
            re.compile(pattern)
        except re.error:
            raise UserError(f"pattern {pattern!r} is not a regular expression", file=path, field=key) from None
    return value


def check_adapter_folder(folder: Path, field: str = "--adapter") -> str:
    """An adapter folder given on the command line: a folder with a readable adapter_config.json and its weights.
    Returns 'peft' or 'mlx'; checked before any model is loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            "adapter folder not found" if not folder.exists() else "is a file, not an adapter folder",
            file=folder,
            field=field,
            hint="point at <storage>/<run>/adapters/<topic>",
        )
    _read_config(folder)
    if (folder / PEFT_WEIGHTS).is_file() or (folder / "adapter_model.bin").is_file():
        return "peft"
    if (folder / MLX_WEIGHTS).is_file():
        return "mlx"
    raise UserError(
        f"holds no {PEFT_WEIGHTS} or {MLX_WEIGHTS}",
        file=folder,
        field=field,
        hint="point at <storage>/<run>/adapters/<topic>",
    )


# ---- PEFT ---------------------------------------------------------------------------------------------


def pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern matching the end of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _check_peft_config(cfg: dict, path: Path) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"peft_type {cfg.get('peft_type')} is not LoRA", file=path, field="peft_type")
    refusals = [
        ("use_dora", cfg.get("use_dora"), "DoRA's magnitude vectors have no place in an mlx-lm LoRA adapter"),
        ("modules_to_save", cfg.get("modules_to_save"), "fully trained extra modules are not LoRA weights"),
        ("bias", cfg.get("bias", "none") != "none", "trained biases are not part of an mlx-lm LoRA adapter"),
        ("fan_in_fan_out", cfg.get("fan_in_fan_out"), "Conv1D-style (GPT-2) weights are not supported"),
    ]
    for fld, bad, why in refusals:
        if bad:
            raise UserError(
                f"cannot convert: {fld} is set ({why})",
                file=path,
                field=fld,
                hint="retrain with plain LoRA, or merge the adapter into the model instead",
            )


def read_peft(folder: Path) -> Adapter:
    """Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into MLX orientation."""
    folder = Path(folder)
    cfg = _read_config(folder)
    _check_peft_config(cfg, folder / CONFIG)
    tensors = load_tensors(folder / PEFT_WEIGHTS)
    a, b = {}, {}
    for name, value in tensors.items():
        key = name.removeprefix(PEFT_PREFIX)
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not match:
            raise UserError(
                f"tensor '{name}' is not a LoRA A/B matrix",
                file=folder / PEFT_WEIGHTS,
                hint="only LoRA on linear layers converts (no embeddings, norms or biases)",
            )
        module, which = match.groups()
        (a if which == "A" else b)[module] = value.T
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))[0]
        raise UserError(f"module '{missing}' lacks its lora_A or lora_B", file=folder / PEFT_WEIGHTS)
    use_rslora = bool(cfg.get("use_rslora"))
    alpha_patterns = _patterns(cfg, "alpha_pattern", folder / CONFIG)
    default_alpha = _number(cfg, "lora_alpha", folder / CONFIG, 8)
    groups: dict[tuple[int, float], Group] = {}
    for module in sorted(a, key=_natural):
        rank = a[module].shape[1]
        alpha = float(pattern_value(alpha_patterns, module, default_alpha))
        group = groups.setdefault((rank, alpha), Group(rank, alpha, peft_scale(alpha, rank, use_rslora), []))
        group.keys.append(module)
    return Adapter(
        a,
        b,
        list(groups.values()),
        _number(cfg, "lora_dropout", folder / CONFIG, 0.0),
        use_rslora,
        cfg.get("base_model_name_or_path"),
    )


def write_peft(adapter: Adapter, folder: Path) -> Path:
    """Write a PEFT folder: the most common group is the default r/alpha, the others go to the patterns."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    main = max(adapter.groups, key=lambda g: len(g.keys))
    rank_pattern, alpha_pattern = {}, {}
    for g in adapter.groups:
        if g is main:
            continue
        regex = "|".join(re.escape(k) for k in g.keys)
        if g.rank != main.rank:
            rank_pattern[regex] = g.rank
        if g.alpha != main.alpha:
            alpha_pattern[regex] = g.alpha
    tensors = {}
    for module in adapter.modules():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = adapter.a[module].T
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = adapter.b[module].T
    save_tensors(folder / PEFT_WEIGHTS, tensors)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model,
        "r": main.rank,
        "lora_alpha": main.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": sorted(adapter.modules(), key=_natural),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": adapter.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    return folder


# ---- MLX ------------------------------------------------------------------------------------------------


def common_layout(groups: list[Group]) -> tuple[int, float]:
    """(rank, scale) of the single mlx-lm config: the largest rank, and the scale of its first group."""
    top = max(g.rank for g in groups)
    return top, next(g.scale for g in groups if g.rank == top)


def mlx_config(adapter: Adapter) -> dict:
    rank, scale = common_layout(adapter.groups)
    return {
        "fine_tune_type": "lora",
        "num_layers": -1,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": adapter.dropout, "keys": adapter.modules()},
        GROUPS_KEY: [asdict(g) for g in adapter.groups],
        "use_rslora": adapter.use_rslora,
        "base_model": adapter.base_model,
        **adapter.extra,
    }


def mlx_tensors(adapter: Adapter) -> dict[str, np.ndarray]:
    """Every module padded to the common rank, its scale folded into lora_b."""
    rank, scale = common_layout(adapter.groups)
    out = {}
    for g in adapter.groups:
        for module in g.keys:
            a, b = adapter.a[module], adapter.b[module]
            if a.shape[1] != g.rank or b.shape[0] != g.rank:
                raise ValueError(f"{module}: shapes {a.shape} {b.shape} do not have rank {g.rank}")
            padded_a = np.zeros((a.shape[0], rank), np.float32)
            padded_a[:, : g.rank] = a
            padded_b = np.zeros((rank, b.shape[1]), np.float32)
            padded_b[: g.rank] = b * (g.scale / scale)
            out[f"{module}.lora_a"], out[f"{module}.lora_b"] = padded_a, padded_b
    return out


def write_mlx(adapter: Adapter, folder: Path) -> Path:
    """Write adapters.safetensors + adapter_config.json, loadable by `mlx_lm.load(path, adapter_path=...)`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / MLX_WEIGHTS, mlx_tensors(adapter))
    (folder / CONFIG).write_text(json.dumps(mlx_config(adapter), indent=2))
    return folder


def read_mlx(folder: Path) -> Adapter:
    """Read an mlx-lm LoRA folder back to native per-group ranks (or one group for plain mlx-lm adapters)."""
    folder = Path(folder)
    cfg = _read_config(folder)
    if cfg.get("fine_tune_type", "lora") != "lora":
        raise UserError(
            f"fine_tune_type '{cfg.get('fine_tune_type')}' is not LoRA",
            file=folder / CONFIG,
            field="fine_tune_type",
            hint="only LoRA adapters convert (not DoRA or full fine-tunes)",
        )
    params = cfg.get("lora_parameters") or {}
    if not isinstance(params, dict):
        raise UserError("must be an object (rank, scale, ...)", file=folder / CONFIG, field="lora_parameters")
    tensors = load_tensors(folder / MLX_WEIGHTS)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors}, key=_natural)
    for k in tensors:
        if not k.endswith((".lora_a", ".lora_b")):
            raise UserError(
                f"tensor '{k}' is not lora_a/lora_b",
                file=folder / MLX_WEIGHTS,
                hint="only LoRA on linear layers converts",
            )
    if params.get("rank") is None or params.get("scale") is None:
        raise UserError("lora_parameters needs rank and scale", file=folder / CONFIG, field="lora_parameters")
    rank = _number(params, "rank", folder / CONFIG, integer=True)
    scale = _number(params, "scale", folder / CONFIG)
    use_rslora = bool(cfg.get("use_rslora"))
    if cfg.get(GROUPS_KEY):
        groups = _groups(cfg[GROUPS_KEY], folder / CONFIG)
    else:
        groups = [Group(rank, peft_alpha(scale, rank, use_rslora), scale, modules)]
    known = {k for g in groups for k in g.keys}
    if set(modules) != known:
        odd = sorted(set(modules) ^ known, key=_natural)[0]
        raise UserError(f"module '{odd}' is in the weights or the config but not both", file=folder / CONFIG)
    a, b = {}, {}
    for g in groups:
        for module in g.keys:
            a[module], b[module] = _unpad(folder, module, tensors, g, float(scale))
    extra = {k: v for k, v in cfg.items() if k.startswith("mindprint_") and k != GROUPS_KEY}
    return Adapter(
        a, b, groups, _number(params, "dropout", folder / CONFIG, 0.0), use_rslora, cfg.get("base_model"), extra
    )


def _groups(entries, path: Path) -> list[Group]:
    """The native zone groups kept under mindprint_groups: rank, alpha, scale and the module keys of each."""
    if not isinstance(entries, list):
        raise UserError("must be a list of groups", file=path, field=GROUPS_KEY)
    groups = []
    for i, g in enumerate(entries):
        keys = g.get("keys") if isinstance(g, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or set(g) - GROUP_FIELDS:
            raise UserError(
                "each group is {rank, alpha, scale, keys: [module names]}",
                file=path,
                field=f"{GROUPS_KEY}[{i}]",
                hint="the adapter was changed outside mindprint; convert again",
            )
        groups.append(
            Group(
                _number(g, "rank", path, integer=True),
                _number(g, "alpha", path),
                _number(g, "scale", path),
                keys,
                str(g.get("name", "")),
            )
        )
    return groups


def _unpad(folder: Path, module: str, tensors: dict, g: Group, scale: float) -> tuple[np.ndarray, np.ndarray]:
    a, b = tensors[f"{module}.lora_a"], tensors[f"{module}.lora_b"]
    if np.any(a[:, g.rank :]) or np.any(b[g.rank :]):
        raise UserError(
            f"{module}: the columns above its zone rank {g.rank} are not zero",
            file=folder / MLX_WEIGHTS,
            hint="the adapter was changed outside mindprint; per-zone ranks cannot be split back",
        )
    return a[:, : g.rank], b[: g.rank] * (scale / g.scale)


def detect_format(folder: Path) -> str:
    """'peft' or 'mlx', from the weight file present."""
    folder = Path(folder)
    if (folder / PEFT_WEIGHTS).is_file():
        return "peft"
    if (folder / MLX_WEIGHTS).is_file():
        return "mlx"
    raise UserError(
        f"{folder} holds no {PEFT_WEIGHTS} or {MLX_WEIGHTS}",
        file=folder,
        hint="point at a PEFT adapter folder or an mlx-lm adapter folder",
    )


def convert(src: Path, out: Path, to: str) -> Adapter:
    """Convert the adapter folder `src` to format `to` ('mlx' or 'peft') in `out`."""
    if to not in ("mlx", "peft"):
        raise UserError(f"unknown target format '{to}'", field="--to", hint="use --to mlx or --to peft")
    source = detect_format(src)
    if source == to:
        raise UserError(
            f"{src} is already in {to} format", file=src, hint=f"use --to {'peft' if to == 'mlx' else 'mlx'}"
        )
    if Path(out).resolve() == Path(src).resolve():
        raise UserError("the output folder is the source folder", field="OUT", hint="write to a new folder")
    check_output_dir(out, "OUT", CONFIG)
    other = Path(out) / (PEFT_WEIGHTS if to == "mlx" else MLX_WEIGHTS)
    if other.is_file():
        raise UserError(
            f"holds an adapter in the other format ({other.name}); converting there would mix two",
            file=out,
            field="OUT",
            hint="write to a new folder",
        )
    adapter = read_peft(src) if source == "peft" else read_mlx(src)
    (write_mlx if to == "mlx" else write_peft)(adapter, out)
    return adapter


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]
