"""The seed's model-config API: `get_model_config("qwen-72b")`, `load_model_config(path)`, zones per layer.

A model YAML (configs/models/*.yaml) is validated by `ModelConfigFile`, as the run spec is by `RunSpec`."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError

from mindprint_ray.errors import UserError
from mindprint_ray.planning.registry import ALIASES, MODELS, ModelArch, get_arch
from mindprint_ray.planning.zones import ZonePlan, build_plan
from mindprint_ray.spec.run_spec import LoraSection, Section, validation_error
from mindprint_ray.spec.yaml_lines import load_yaml_with_lines

ARCH_FIELDS = [f.name for f in fields(ModelArch) if f.name not in ("name", "aliases")]
EXAMPLE = "configs/models/qwen_7b.yaml"


def _whole_number(minimum: int) -> Any:
    """An integer >= minimum that is not a boolean (YAML's `true` is no count)."""
    want = "a positive integer" if minimum >= 1 else "a non-negative integer"

    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"must be {want}")
        return value

    return Annotated[int, Field(ge=minimum), BeforeValidator(check)]


Count = _whole_number(1)
NonNegative = _whole_number(0)


class ArchitectureFields(Section):
    """The `architecture:` of a model YAML: every field of the registry's ModelArch, each optional. For a registry
    model the given fields override its architecture; any other model needs all but the last three."""

    model_config = ConfigDict(strict=True)

    hf_path: str = Field(None, description="hub id or local folder of the weights")
    family: str = Field(None, description="decoder family: qwen2, llama or gemma3")
    hidden_size: Count = Field(None, description="width of the residual stream")
    intermediate_size: Count = Field(None, description="width of the MLP (gate_proj/up_proj outputs)")
    num_layers: Count = Field(None, description="decoder layers (the zones' layer indices count these)")
    num_heads: Count = Field(None, description="attention (query) heads")
    num_kv_heads: Count = Field(None, description="key/value heads (grouped-query attention)")
    head_dim: Count = Field(None, description="width of one attention head")
    vocab_size: Count = Field(None, description="rows of the embedding and lm_head")
    tie_embeddings: bool = Field(None, description="lm_head shares the embedding's weights")
    qkv_bias: bool = Field(None, description="q_proj, k_proj and v_proj have biases")
    max_position_embeddings: Count = Field(None, description="context length; max_seq_length may not exceed it")
    chat_template: str = Field(None, description="chat format of the tokenizer: chatml or gemma")
    eos_token: str = Field(None, description="the token that ends an assistant turn")
    layer_prefix: str = Field(None, description="module path of the layer list; default: model.layers")
    norms_per_layer: NonNegative = Field(None, description="norm weights per decoder layer; default: 2")
    qk_norm: bool = Field(None, description="per-head norms on queries and keys (Gemma 3); default: false")


class ModelConfigFile(Section):
    """A model YAML: a registry `name` (architecture fields may override it) or a full `architecture`, with the
    LoRA settings and zones the planner resolves against it (the run spec's `lora` section)."""

    name: str = Field(description="a registry name or alias, or the name of a model described in full")
    hf_path: str | None = Field(None, description="hub id or local folder of the weights; default: the registry's")
    architecture: ArchitectureFields | None = Field(None, description="architecture fields; default: the registry's")
    lora: LoraSection | None = Field(None, description="the LoRA strategy, rank and zones; default: conservative")


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


def _read(path: str | Path) -> ModelConfigFile:
    """The model YAML, validated; a problem is a UserError naming the file, its line and the key."""
    data, lines = load_yaml_with_lines(path)
    if not isinstance(data, dict):
        raise UserError("a model config needs at least `name:`", file=path, line=1, field="name", hint=f"see {EXAMPLE}")
    try:
        return ModelConfigFile.model_validate(data)
    except ValidationError as err:
        raise validation_error(
            err, str(path), lines, ModelConfigFile, f"add it (see {EXAMPLE})", f"fix the value (see {EXAMPLE})"
        ) from None


def load_model_config(path: str | Path) -> ModelConfig:
    """Read a model YAML: a registry `name` (architecture fields may override) or a full `architecture`."""
    config = _read(path)
    arch_fields = config.architecture.model_dump(exclude_unset=True) if config.architecture else {}
    name = config.name
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
    if config.hf_path:
        arch = replace(arch, hf_path=config.hf_path)
    lora = config.lora or LoraSection()
    zones = [z.model_dump() for z in lora.zones] if lora.zones else None
    try:
        plan = build_plan(arch, lora.strategy, zones, lora.rank, lora.alpha, lora.dropout, lora.use_rslora)
    except UserError as e:
        e.file = str(path)
        raise
    return ModelConfig(arch, plan)
