"""The seed's model-config API: `get_model_config("qwen-72b")`, `load_model_config(path)`, zones per layer."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from pydantic import ValidationError

from mindprint_ray.errors import UserError
from mindprint_ray.planning.registry import ALIASES, MODELS, ModelArch, get_arch
from mindprint_ray.planning.zones import ZonePlan, build_plan
from mindprint_ray.spec.run_spec import LoraSection, _validation_error
from mindprint_ray.spec.yaml_lines import line_for, load_yaml_with_lines

ARCH_FIELDS = [f.name for f in fields(ModelArch) if f.name not in ("name", "aliases")]
ARCH_TYPES = {f.name: str(f.type) for f in fields(ModelArch) if f.name in ARCH_FIELDS}  # "int", "bool" or "str"


@dataclass(frozen=True)
class ModelConfig:
    """A model's architecture together with its zone plan."""

    arch: ModelArch
    plan: ZonePlan

    @property
    def name(self) -> str:
        return self.arch.name

    @property
    def hf_path(self) -> str:
        return self.arch.hf_path

    @property
    def layers(self) -> int:
        return self.arch.num_layers

    @property
    def total_params(self) -> int:
        return self.arch.total_params()

    @property
    def zones(self) -> list[str]:
        return [z.name for z in self.plan.zones]

    def get_layers_for_zone(self, zone: str) -> list[int]:
        return self.plan.layers_for_zone(zone)

    def get_modules_for_zone(self, zone: str) -> list[str]:
        return list(self.plan.zone(zone).modules)


def get_model_config(name: str, strategy: str = "conservative") -> ModelConfig:
    arch = get_arch(name)
    return ModelConfig(arch, build_plan(arch, strategy))


def _check_arch_types(arch_fields: dict, path: str | Path, lines: dict) -> None:
    """Each architecture field of the type ModelArch declares: counts positive integers, flags booleans, text."""
    for key, value in arch_fields.items():
        kind = ARCH_TYPES[key]
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or key == "norms_per_layer")
        else:
            ok = isinstance(value, {"bool": bool, "str": str}[kind])
        if not ok:
            want = {"int": "a positive integer", "bool": "true or false", "str": "a string"}[kind]
            raise UserError(
                f"must be {want} (got {value!r})",
                file=path,
                line=line_for(lines, ("architecture", key)),
                field=f"architecture.{key}",
            )


def load_model_config(path: str | Path) -> ModelConfig:
    """Read a model YAML: a registry `name` (architecture fields may override) or a full `architecture`."""
    data, lines = load_yaml_with_lines(path)
    if not isinstance(data, dict) or "name" not in data:
        raise UserError("a model config needs at least `name:`", file=path, line=1, field="name")
    unknown = set(data) - {"name", "hf_path", "architecture", "lora"}
    if unknown:
        raise UserError(
            f"unknown key '{sorted(unknown)[0]}'",
            file=path,
            field=sorted(unknown)[0],
            hint="keys are: name, hf_path, architecture, lora",
        )
    arch_fields = data.get("architecture") or {}
    if not isinstance(arch_fields, dict):
        raise UserError(
            "must be a mapping of architecture fields",
            file=path,
            line=line_for(lines, ("architecture",)),
            field="architecture",
            hint=f"fields are: {', '.join(ARCH_FIELDS)}",
        )
    bad = set(arch_fields) - set(ARCH_FIELDS)
    if bad:
        raise UserError(
            f"unknown architecture field '{sorted(bad)[0]}'",
            file=path,
            field=f"architecture.{sorted(bad)[0]}",
            hint=f"fields are: {', '.join(ARCH_FIELDS)}",
        )
    _check_arch_types(arch_fields, path, lines)
    name = str(data["name"])
    if name.lower() in MODELS or name.lower() in ALIASES:
        arch = replace(get_arch(name), **arch_fields)
    else:
        missing = [
            f for f in ARCH_FIELDS if f not in arch_fields and f not in ("layer_prefix", "norms_per_layer", "qk_norm")
        ]
        if missing:
            raise UserError(
                f"'{name}' is not in the registry, so `architecture` needs '{missing[0]}'",
                file=path,
                field=f"architecture.{missing[0]}",
            )
        arch = ModelArch(name=name, **arch_fields)
    if data.get("hf_path"):
        arch = replace(arch, hf_path=data["hf_path"])
    try:
        lora = LoraSection.model_validate(data.get("lora") or {})
    except ValidationError as err:
        e = _validation_error(err, str(path), {("lora",) + k: v for k, v in lines.items()})
        raise e from None
    zones = [z.model_dump() for z in lora.zones] if lora.zones else None
    try:
        plan = build_plan(arch, lora.strategy, zones, lora.rank, lora.alpha, lora.dropout, lora.use_rslora)
    except UserError as e:
        e.file = str(path)
        raise
    return ModelConfig(arch, plan)
