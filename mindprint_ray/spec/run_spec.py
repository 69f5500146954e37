"""The run spec: one YAML file per run, validated by pydantic, unknown keys rejected, seed defaults."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mindprint_ray.errors import UserError
from mindprint_ray.spec.inputs import check_run_name, find_bad_string, name_problem, path_problem
from mindprint_ray.spec.yaml_lines import line_for, load_yaml_with_lines, yaml_value

SECRET_KEY = re.compile(
    r"^(?:.*[_-])?(?:secret|secret[_-]?key|secret[_-]access[_-]key|password|passwd|token|auth[_-]?token|"
    r"api[_-]?key|access[_-]key(?:[_-]id)?|private[_-]key|credentials?|session[_-]token)$",
    re.IGNORECASE,
)


COUNT_MAX = 1_000_000_000  # an upper bound for counts and sizes that keeps every estimate finite


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(Section):
    name: str = "tiny"
    path: str | None = Field(None, description="local folder or hub id; default: the registry's hub id")
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"


class ZoneSpec(Section):
    name: str
    layers: tuple[int, int] | None = None
    fraction: tuple[float, float] | None = None
    modules: list[str]
    rank: int | None = Field(None, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0)
    dropout: float | None = Field(None, ge=0, lt=1)

    @model_validator(mode="after")
    def _one_span(self) -> ZoneSpec:
        if (self.layers is None) == (self.fraction is None):
            raise ValueError("give exactly one of `layers: [first, last]` or `fraction: [start, end]`")
        if self.fraction is not None:
            start, end = self.fraction
            if not (0 <= start < end <= 1):
                raise ValueError("fraction must satisfy 0 <= start < end <= 1")
        return self


class LoraSection(Section):
    strategy: Literal["conservative", "aggressive"] = "conservative"
    rank: int | None = Field(None, ge=1, le=1024, description="default: the strategy's (8 or 16)")
    alpha: float | None = Field(None, gt=0, description="default: 2 * rank")
    dropout: float | None = Field(None, ge=0, lt=1)
    use_rslora: bool = False
    zones: list[ZoneSpec] | None = Field(None, description="default: the seed's lexicon/reasoning/voice zones")
    target: Literal["regex", "list"] = "regex"


class QuantizationSection(Section):
    mode: Literal["nf4", "bf16", "fp32"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["bfloat16", "float16", "float32", "uint8"] = "bfloat16"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"mode": {"int4": "nf4", "qlora": "nf4"}.get(value, value)}
        return value


# What one step is (mindprint_ray/planning/step_budget.py; `plan` and `validate` show each topic's step budget)
BATCH_DOC = (
    "per device (micro-batch); one optimizer step consumes a global batch of batch_size x "
    "gradient_accumulation x workers (hardware.num_workers, default the profile's devices; 1 on MLX)"
)
ACCUMULATION_DOC = "micro-batches per optimizer step on each device; global batch = batch_size x this x workers"
WARMUP_DOC = (
    "optimizer steps of linear warmup from 0 (the first step applies 0); at or above the stage's "
    "steps the learning rate never reaches its peak"
)


class SFTSection(Section):
    learning_rate: float = Field(2e-4, gt=0, le=1)
    batch_size: int = Field(1, ge=1, le=COUNT_MAX, description=BATCH_DOC)
    gradient_accumulation: int = Field(4, ge=1, le=COUNT_MAX, description=ACCUMULATION_DOC)
    epochs_per_topic: float = Field(3, gt=0, le=COUNT_MAX)
    max_steps: int | None = Field(
        None,
        ge=1,
        le=COUNT_MAX,
        description="optimizer steps per topic of the whole worker group (not per device); overrides epochs_per_topic",
    )
    max_seq_length: int = Field(4096, ge=16, le=COUNT_MAX)
    warmup_steps: int = Field(50, ge=0, le=COUNT_MAX, description=WARMUP_DOC)
    weight_decay: float = Field(0.01, ge=0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    gradient_checkpointing: bool = True
    max_grad_norm: float = Field(0.3, gt=0)
    bf16: bool = Field(
        True,
        description="bf16 mixed precision on GPUs for both stages, SFT and DPO (and DeepSpeed); CPUs train in fp32",
    )
    packing: bool = True
    assistant_only_loss: bool = True
    logging_steps: int = Field(
        1,
        ge=1,
        description="SFT optimizer steps between logged records (loss, grad norm,"
        " metrics.jsonl, TensorBoard; the NaN/inf guard sees the "
        "logged values); DPO logs every step",
    )


class DPOSection(Section):
    enabled: bool = True
    learning_rate: float = Field(1e-7, gt=0, le=1)
    batch_size: int = Field(1, ge=1, le=COUNT_MAX, description=BATCH_DOC)
    gradient_accumulation: int = Field(2, ge=1, le=COUNT_MAX, description=ACCUMULATION_DOC)
    steps_per_topic: int = Field(
        100,
        ge=1,
        le=COUNT_MAX,
        description="optimizer steps per topic of the whole worker group "
        "(not per device), each of one global batch of pairs",
    )
    beta: float = Field(0.1, gt=0)
    max_seq_length: int = Field(4096, ge=16, le=COUNT_MAX)
    warmup_steps: int = Field(0, ge=0, le=COUNT_MAX, description=WARMUP_DOC)
    gradient_checkpointing: bool = True
    precompute_ref_log_probs: bool = False
    reference: Literal["sft", "base"] = Field(
        "sft", description="sft: a frozen copy of the topic's adapter as DPO starts; base: the adapter disabled"
    )
    max_grad_norm: float = Field(0.3, gt=0)


class CurriculumSection(Section):
    data_dir: str = "data/curriculum"
    topics: list[str] = Field(..., min_length=1)
    persona: str | None = Field(None, description="default: <data_dir>/persona.yaml")
    system_prompt: str | None = None
    overlong: Literal["drop", "truncate", "error"] = "drop"

    @field_validator("topics")
    @classmethod
    def _unique(cls, topics: list[str]) -> list[str]:
        dupes = sorted({t for t in topics if topics.count(t) > 1})
        if dupes:
            raise ValueError(f"topic listed twice: {', '.join(dupes)}")
        for t in topics:
            problem = name_problem(t)
            if problem:
                raise ValueError(f"topic {t!r} {problem} (a topic is one folder of data_dir)")
        return topics


class HardwareSection(Section):
    profile: str = "cpu-2"
    deepspeed: Literal["auto", "none", "zero2", "zero3"] = "auto"
    num_workers: int | None = Field(None, ge=1, le=COUNT_MAX, description="default: the profile's device count")
    mfu: float | None = Field(None, gt=0, le=1, description="override the profile's assumed MFU")
    price_per_hour: float | None = Field(None, ge=0)
    spot: bool = False


class StorageSection(Section):
    path: str = "runs"
    checkpoint_every_steps: int = Field(50, ge=1, le=COUNT_MAX)
    keep_checkpoints: int = Field(2, ge=1, le=COUNT_MAX)


class RaySection(Section):
    address: str | None = Field(None, description="default: RAY_ADDRESS, else a local cluster")
    max_failures: int = Field(2, ge=-1, le=COUNT_MAX)


class EvalSection(Section):
    enabled: bool = True
    voice_fidelity_target: float = Field(0.85, ge=0, le=1)
    accuracy_target: float = Field(0.85, ge=0, le=1)
    on_miss: Literal["warn", "stop"] = "warn"
    regression_margin: float = Field(0.05, ge=0, le=1)
    max_new_tokens: int = Field(96, ge=1, le=COUNT_MAX)
    max_examples: int | None = Field(None, ge=1, le=COUNT_MAX, description="cap eval questions per topic")
    after_sft: bool = Field(
        True,
        description="also score each topic between SFT and DPO (base and after DPO are "
        "always scored); false saves one evaluation per topic (in-loop "
        "evaluation is the Ray backend's)",
    )
    heldout_pairs: float = Field(
        0.25,
        ge=0,
        le=0.9,
        description="share of each topic's DPO pairs kept out of DPO training and scored for "
        "preference (chosen by a hash of the prompt; 0: none held out)",
    )
    general_text: str | None = Field(
        None,
        description="held-out neutral question/answer file (JSONL or YAML) whose perplexity guards general "
        "ability; default: the one shipped in the package (mindprint_ray/evaluation/general_qa.yaml)",
    )
    max_general_ppl_increase: float | None = Field(
        0.25,
        ge=0,
        description="a stage whose general-text perplexity exceeds base x (1 + this) is a miss "
        "(warn or stop per on_miss); null: no guard, the perplexity is not computed",
    )
    weights: dict[str, float] = Field(
        default_factory=lambda: {"markers": 0.3, "lexicon": 0.2, "semantic": 0.3, "preference": 0.2}
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, weights: dict[str, float]) -> dict[str, float]:
        known = {"markers", "lexicon", "semantic", "preference"}
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ValueError(f"unknown voice-fidelity component '{unknown[0]}' (use {', '.join(sorted(known))})")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        return weights


class ParamRange(Section):
    """One searched parameter: explicit `values`, or a `min`/`max` range (log-uniform when `log`)."""

    values: list[float] | None = None
    min: float | None = None
    max: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _shape(self) -> ParamRange:
        if self.values is not None:
            if not self.values:
                raise ValueError("`values` is empty")
            if self.min is not None or self.max is not None:
                raise ValueError("give `values` or `min`/`max`, not both")
            return self
        if self.min is None or self.max is None:
            raise ValueError("give `values: [...]` or both `min` and `max`")
        if self.min >= self.max:
            raise ValueError(f"empty or inverted range: min {self.min} >= max {self.max}")
        if self.log and self.min <= 0:
            raise ValueError("a log range needs min > 0")
        return self


class TuneSection(Section):
    space: dict[str, ParamRange] = Field(..., min_length=1)
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, le=COUNT_MAX, description="grid: repeats of the grid; random/optuna: trials")
    metric: str | None = Field(None, description="default: voice_fidelity with eval on, else sft_loss")
    mode: Literal["max", "min"] | None = None
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, ge=1, le=COUNT_MAX, description="ASHA: reports before a trial may be stopped")
    topics: list[str] | None = Field(None, description="default: the first topic of the curriculum")
    workers_per_trial: int | None = Field(None, ge=1, le=COUNT_MAX)
    max_concurrent: int | None = Field(None, ge=1, le=COUNT_MAX)


class RunSpec(Section):
    name: str | None = Field(None, description="the run folder's name; default: the spec file's name")
    seed: int = Field(42, ge=0, le=2**32 - 1)
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    sft: SFTSection = Field(default_factory=SFTSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    curriculum: CurriculumSection
    hardware: HardwareSection = Field(default_factory=HardwareSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    ray: RaySection = Field(default_factory=RaySection)
    eval: EvalSection = Field(default_factory=EvalSection)
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "none"]] = Field(default_factory=lambda: ["tensorboard"])
    tune: TuneSection | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        problem = name_problem(name) if name is not None else None
        if problem:
            raise ValueError(f"run name {problem}")
        return name

    @property
    def persona_path(self) -> Path:
        from mindprint_ray.runs.storage import local_data_dir

        if self.curriculum.persona:
            return Path(local_data_dir(self.curriculum.persona))
        return Path(local_data_dir(self.curriculum.data_dir)) / "persona.yaml"

    @property
    def general_text_path(self) -> Path:
        """The held-out neutral text of the general-ability guard: eval.general_text, else the packaged file."""
        if self.eval.general_text:
            return Path(self.eval.general_text)
        return Path(__file__).parents[1] / "evaluation" / "general_qa.yaml"

    def stage(self, name: str) -> SFTSection | DPOSection:
        """The section that configures training stage `name` ("sft" or "dpo"). The one rule for every per-stage
        setting (gradient checkpointing, lengths, batch, learning rate, ...): the estimates and both backends
        read a stage's settings from its own section, never from the other stage's."""
        if name not in ("sft", "dpo"):
            raise ValueError(f"unknown stage {name!r}")
        return self.sft if name == "sft" else self.dpo

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- loading --------------------------------------------------------------------------------------


def find_secret_keys(data: Any, path: tuple = ()) -> tuple | None:
    """The path of the first key that looks like a credential, or None."""
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and SECRET_KEY.match(key):
                return path + (key,)
            found = find_secret_keys(value, path + (key,))
            if found:
                return found
    elif isinstance(data, list):
        for i, item in enumerate(data):
            found = find_secret_keys(item, path + (i,))
            if found:
                return found
    return None


def dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in override:
        raise UserError(
            f"override '{override}' is not of the form key.path=value",
            field="override",
            hint="e.g. sft.learning_rate=1e-4",
        )
    key, _, raw = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise UserError(
            f"override key '{key.strip()}' has an empty part", field="override", hint="e.g. sft.learning_rate=1e-4"
        )
    value = yaml_value(raw, key) if raw.strip() else None
    node = data
    while len(parts) > 1:
        rest = ".".join(parts)
        if rest in node or any(isinstance(k, str) and "." in k for k in node):  # keyed by dotted paths (tune.space)
            break
        part = parts.pop(0)
        if node.get(part) is None:  # a missing or empty (`sft:`) section
            node[part] = {}
        if not isinstance(node[part], dict):
            raise UserError(
                f"override key '{key}': '{part}' is not a section",
                field=key,
                hint="set the whole value (e.g. lora.zones=[...]) or a field of a section",
            )
        node = node[part]
    node[".".join(parts)] = value


def _known_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """Field names at `path` inside the spec schema (for 'did you mean' hints)."""
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            for a in getattr(ann, "__args__", ()):
                inner += [b for b in getattr(a, "__args__", ()) if isinstance(b, type) and issubclass(b, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def _validation_error(err: ValidationError, file: str, lines: dict) -> UserError:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if p not in ("function-after", "function-before"))
    field = dotted(loc)
    line = line_for(lines, loc)
    if e["type"] == "extra_forbidden":
        known = _known_keys(RunSpec, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
        return UserError(f"unknown key '{loc[-1]}'", file=file, line=line, field=field, hint=hint)
    if e["type"] == "missing":
        return UserError(
            "required field is missing",
            file=file,
            line=line,
            field=field,
            hint="add it (see configs/tiny-cpu.yaml for a complete example)",
        )
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return UserError(
        f"{msg}{got_text}",
        file=file,
        line=line,
        field=field,
        hint="fix the value; `mindprint-ray validate CFG` checks the whole spec",
    )


def _check_strings(data: Any, path: str | Path | None, lines: dict) -> None:
    """No credentials in URLs and no NUL characters in any value (the message never quotes the value)."""
    bad = find_bad_string(data)
    if bad:
        where, problem = bad
        raise UserError(
            problem,
            file=path,
            line=line_for(lines, where),
            field=dotted(where) or None,
            hint="remove it; credentials come from the environment or an instance role "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN, ...)",
        )


LOCATIONS = (
    ("storage", "path"),
    ("curriculum", "data_dir"),
    ("curriculum", "persona"),
    ("model", "path"),
    ("eval", "general_text"),
)


def _check_locations(spec: RunSpec, path: str | Path, lines: dict) -> None:
    """Every place the spec names: an s3:// URI S3 would accept (before any network call), a local path that
    a file system can hold. (Whether a local model folder exists is checked against the registry in run.py.)"""
    from mindprint_ray.runs.storage import is_s3, parse_s3

    for loc in LOCATIONS:
        value = getattr(getattr(spec, loc[0]), loc[1])
        if value is None:
            continue
        try:
            if is_s3(value):
                if loc == ("model", "path") or loc == ("eval", "general_text"):
                    raise UserError(
                        "must be a local path or hub id, not s3://",
                        field=dotted(loc),
                        hint="download it first, or point at a local copy",
                    )
                parse_s3(value, dotted(loc))
            elif path_problem(value):
                raise UserError(f"the path {path_problem(value)}", field=dotted(loc), hint="shorten the path")
        except UserError as e:
            e.file, e.line = str(path), line_for(lines, loc)
            raise


def load_spec(path: str | Path, overrides: list[str] | None = None, name: str | None = None) -> RunSpec:
    """Read, override and validate a run spec. Every problem is a UserError naming file, line and field.

    `name` (the command line's --name) replaces the spec's name; without either, the file's stem is the name."""
    if name is not None:
        check_run_name(name, "--name")
    data, lines = load_yaml_with_lines(path)
    if data is None:
        raise UserError("the config file is empty", file=path, hint="start from configs/tiny-cpu.yaml")
    if not isinstance(data, dict):
        raise UserError(
            "the config must be a YAML mapping of sections", file=path, line=1, hint="start from configs/tiny-cpu.yaml"
        )
    secret = find_secret_keys(data)
    if secret:
        raise UserError(
            f"'{secret[-1]}' looks like a secret; secrets never go in config files",
            file=path,
            line=line_for(lines, secret),
            field=dotted(secret),
            hint="remove it and provide credentials through the environment or an instance role "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN, WANDB_API_KEY, ...)",
        )
    _check_strings(data, path, lines)
    for override in overrides or []:
        apply_override(data, override)
        secret = find_secret_keys(data)
        if secret:
            raise UserError(
                f"'{secret[-1]}' looks like a secret; pass it through the environment", field=dotted(secret)
            )
        _check_strings(data, None, {})
    if name is not None:
        data["name"] = name
    elif data.get("name") is None:
        data["name"] = _default_name(path)
    elif isinstance(data["name"], str):
        check_run_name(data["name"], "name", path, line_for(lines, ("name",)))
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err, str(path), lines) from None
    _check_locations(spec, path, lines)
    return spec


def _default_name(path: str | Path) -> str:
    """A spec without `name` is named after its file, when the file's name is a valid run name."""
    stem = Path(path).stem
    problem = name_problem(stem)
    if problem:
        raise UserError(
            f"the spec has no `name`, and its file name {problem} (so it cannot name the run)",
            file=path,
            field="name",
            hint="add `name: my-run` to the spec, or pass --name my-run",
        )
    return stem
