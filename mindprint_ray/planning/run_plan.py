"""A run plan: the validated spec resolved against the model registry, the zone plan and the hardware profile."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mindprint_ray.errors import UserError
from mindprint_ray.planning.elastic import worker_range
from mindprint_ray.planning.hardware import Profile, get_profile
from mindprint_ray.planning.registry import (
    ALIASES,
    BUILT_ON_FIRST_USE,
    MODELS,
    ModelArch,
    arch_from_hf_config,
    get_arch,
)
from mindprint_ray.planning.zones import ZonePlan, build_plan
from mindprint_ray.spec.inputs import looks_like_local_path
from mindprint_ray.spec.run_spec import RunSpec, load_spec


@dataclass(frozen=True)
class RunPlan:
    spec: RunSpec
    arch: ModelArch
    zones: ZonePlan
    profile: Profile

    @property
    def model_path(self) -> str:
        return self.spec.model.path or self.arch.hf_path

    @property
    def num_workers(self) -> int:
        """The full worker group: the count, the max of an elastic [min, max], or the profile's devices."""
        return self.worker_range[1]

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers: equal unless hardware.num_workers is an elastic [min, max]."""
        return worker_range(self.spec.hardware.num_workers, self.profile.devices)

    @property
    def deepspeed_stage(self) -> int:
        """0 (none), 2 or 3: the spec's choice, or the profile's default for `auto`."""
        choice = self.spec.hardware.deepspeed
        if choice == "auto":
            choice = self.profile.deepspeed
        return {"none": 0, "zero2": 2, "zero3": 3}[choice]

    @property
    def quant(self) -> str:
        return self.spec.quantization.mode


def resolve_arch(spec: RunSpec) -> ModelArch:
    """The registry architecture, or one read from a local folder's config.json for models outside it."""
    name = spec.model.name
    if name.lower() in MODELS or name.lower() in ALIASES:
        return get_arch(name)
    config = Path(spec.model.path or name) / "config.json"
    if config.is_file():
        return arch_from_hf_config(read_hf_config(config), name, str(config.parent))
    return get_arch(name)


def read_hf_config(path: Path) -> dict:
    """A model folder's config.json as a JSON object; anything else is a UserError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(
            f"not a readable JSON file ({type(e).__name__})",
            file=path,
            field="model.path",
            hint="the model folder is damaged; download or convert it again",
        ) from None
    if not isinstance(data, dict):
        raise UserError("must be a JSON object", file=path, field="model.path")
    return data  # raises the unknown-model error with the list of known models


def check_model_path(spec: RunSpec) -> None:
    """A `model.path` that looks local (see inputs.looks_like_local_path) must be a model folder, except for the
    registry models that `train` builds on first use; a hub id such as `Qwen/Qwen2.5-7B-Instruct` passes."""
    path = spec.model.path
    if path is None or not looks_like_local_path(path):
        return
    name = spec.model.name.lower()
    if ALIASES.get(name, name) in BUILT_ON_FIRST_USE:
        return
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(
            f"model folder '{path}' does not exist",
            field="model.path",
            hint="point model.path at a local model folder (with config.json), or at a hub id "
            "such as Qwen/Qwen2.5-7B-Instruct",
        )
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise UserError(
            f"'{path}' is not a model folder (no config.json in it)",
            field="model.path",
            hint="point model.path at the folder holding config.json and the weights",
        )


def spec_zone_plan(spec: RunSpec, arch: ModelArch) -> ZonePlan:
    """The spec's `lora` section resolved against an architecture."""
    lora = spec.lora
    zones = [z.model_dump() for z in lora.zones] if lora.zones else None
    return build_plan(arch, lora.strategy, zones, lora.rank, lora.alpha, lora.dropout, lora.use_rslora)


def build_run(spec: RunSpec, prices_path: str | None = None) -> RunPlan:
    """Resolve and cross-check a spec: zones against the architecture, lengths against its context."""
    check_model_path(spec)
    arch = resolve_arch(spec)
    zones = spec_zone_plan(spec, arch)
    profile = get_profile(spec.hardware.profile, prices_path)
    for section in ("sft", "dpo"):
        length = getattr(spec, section).max_seq_length
        if length > arch.max_position_embeddings:
            raise UserError(
                f"max_seq_length {length} is above {arch.name}'s context of {arch.max_position_embeddings} tokens",
                field=f"{section}.max_seq_length",
                hint=f"use at most {arch.max_position_embeddings} (the seed uses 4096; Qwen2.5 beyond 32K needs YaRN)",
            )
    return RunPlan(spec, arch, zones, profile)


def load_run(
    path: str | Path, overrides: list[str] | None = None, prices_path: str | None = None, name: str | None = None
) -> RunPlan:
    """The spec at `path` with its overrides (and `--name`), resolved into a run plan."""
    spec = load_spec(path, overrides, name)
    try:
        return build_run(spec, prices_path)
    except UserError as e:
        e.file = e.file or str(path)
        raise
