"""The run spec: one YAML file per run, validated by pydantic, unknown keys rejected, seed defaults."""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mindprint_ray.errors import UserError
from mindprint_ray.evaluation.metrics import COMPONENTS, DEFAULT_WEIGHTS
from mindprint_ray.runs.storage import is_s3, local_data_dir, parse_s3
from mindprint_ray.spec.inputs import check_run_name, find_bad_string, name_problem, path_problem
from mindprint_ray.spec.yaml_lines import line_for, load_yaml_with_lines, yaml_value

SECRET_KEY = re.compile(
    r"^(?:.*[_-])?(?:secret|secret[_-]?key|secret[_-]access[_-]key|password|passwd|token|auth[_-]?token|"
    r"api[_-]?key|access[_-]key(?:[_-]id)?|private[_-]key|credentials?|session[_-]token)$",
    re.IGNORECASE,
)


COUNT_MAX = 1_000_000_000  # an upper bound for counts and sizes that keeps every estimate finite
WorkerCount = typing.Annotated[int, Field(ge=1, le=COUNT_MAX)]


class Section(BaseModel):
    """A part of the run spec: unknown keys are errors, assignments are validated, NaN and infinity refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(Section):
    """The base model to adapt: which architecture the zone plan and the estimates count, and where its weights
    are. Read by the planner, both backends (Ray: transformers; MLX: mlx-lm) and `eval`/`generate`."""

    name: str = Field(
        "tiny",
        description="a model registry name or alias (mindprint_ray/planning/registry.py, e.g. qwen2.5-7b); any "
        "other name is a Qwen2/Llama/Mistral architecture read from <path or name>/config.json",
    )
    path: str | None = Field(
        None,
        description="local folder (holding config.json) or hub id of the weights; default: the registry's hub id",
    )
    revision: str | None = Field(
        None,
        description="hub branch, tag or commit of the weights and tokenizer; default: the hub's default branch",
    )
    trust_remote_code: bool = Field(
        False,
        description="let transformers run Python code shipped with the model repository (Ray backend: train, "
        "eval, generate, export)",
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto",
        description="attention kernel of the Ray backend; auto: flash_attention_2 on CUDA when flash-attn is "
        "installed, else sdpa (SFT packing without flash-attn runs micro-batches of 1)",
    )


class ZoneSpec(Section):
    """One zone of the zone plan: a contiguous band of decoder layers with its own LoRA modules and, optionally,
    its own rank, alpha and dropout. Resolved against the architecture by the planner, read by both backends."""

    name: str = Field(description="the zone's name (zone table, adapter manifest, reports); unique in lora.zones")
    layers: tuple[int, int] | None = Field(
        None,
        description="[first, last] decoder layers, 0-based and both included; give this or fraction",
    )
    fraction: tuple[float, float] | None = Field(
        None,
        description="[start, end) of the layer stack, 0 <= start < end <= 1: layers round(start x layers) to "
        "round(end x layers) - 1; give this or layers",
    )
    modules: list[str] = Field(
        description="projections adapted in every layer of the zone, each once: q_proj, k_proj, v_proj, o_proj, "
        "gate_proj, up_proj, down_proj",
    )
    rank: int | None = Field(None, ge=1, le=1024, description="this zone's LoRA rank; default: lora.rank")
    alpha: float | None = Field(
        None,
        gt=0,
        description="this zone's LoRA alpha; default: 2 x the zone's rank when it sets one, else lora.alpha",
    )
    dropout: float | None = Field(None, ge=0, lt=1, description="this zone's LoRA dropout; default: lora.dropout")

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
    """The LoRA adapter: strategy, run-wide rank/alpha/dropout and the zones (which layers get which modules).
    The planner counts it (trainable parameters, memory); the Ray backend renders it for PEFT, MLX for mlx-lm."""

    strategy: Literal["conservative", "aggressive"] = Field(
        "conservative",
        description="conservative: rank 8, alpha 16, dropout 0.05, the seed's modules per zone; aggressive: rank "
        "16, alpha 32, dropout 0.05, all seven projections (the modules apply to the default zones)",
    )
    rank: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="LoRA rank r of every zone that sets none; default: the strategy's (8 or 16)",
    )
    alpha: float | None = Field(
        None,
        gt=0,
        description="LoRA alpha; the update is scaled by alpha / rank (alpha / sqrt(rank) with use_rslora); "
        "default: 2 * rank",
    )
    dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="dropout on the LoRA input during SFT (DPO trains without dropout, as TRL's "
        "disable_dropout); default: the strategy's 0.05",
    )
    use_rslora: bool = Field(False, description="rank-stabilised LoRA: scale by alpha / sqrt(rank), not alpha / rank")
    zones: list[ZoneSpec] | None = Field(
        None,
        description="the zones, each layer in at most one; default: the seed's lexicon/reasoning/voice zones "
        "(first 25%, middle 50%, last 25% of the layers)",
    )
    target: Literal["regex", "list"] = Field(
        "regex",
        description="how the Ray backend names PEFT's target modules: one regex of the zone plan, or the explicit "
        "list of module names (the same modules either way, checked after wrapping)",
    )


class QuantizationSection(Section):
    """How the frozen base weights are stored while the adapter trains (QLoRA or 16/32-bit). Read by the memory
    estimate and both backends (Ray: bitsandbytes; MLX: affine 4-bit, group 64). `quantization: int4` (or
    `qlora`) is shorthand for `mode: nf4`."""

    mode: Literal["nf4", "bf16", "fp32"] = Field(
        "nf4",
        description="nf4: 4-bit base weights (QLoRA; bitsandbytes NF4 on Ray, MLX 4-bit on a Mac); bf16: 16-bit; "
        "fp32: full precision (CPU)",
    )
    double_quant: bool = Field(
        True,
        description="nf4 only: quantize the NF4 scales too (bitsandbytes double quant: 0.516 instead of "
        "0.5625 bytes per weight in the estimate)",
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16",
        description="nf4 on Ray only: dtype the 4-bit weights are dequantized to for each matmul, and the dtype "
        "of the other weights",
    )
    quant_storage: Literal["bfloat16", "float16", "float32", "uint8"] = Field(
        "bfloat16",
        description="nf4 on Ray only: dtype the packed 4-bit weights are stored in (bitsandbytes quant_storage)",
    )

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
GRAD_NORM_DOC = "clip the LoRA gradients to this global L2 norm at every optimizer step"
CHECKPOINTING_DOC = (
    "recompute activations in the backward pass: far less activation memory, about a third more compute "
    "(6N instead of 4N FLOPs per token); this stage's own setting"
)


class SFTSection(Section):
    """Supervised fine-tuning, the first stage of every topic: optimizer, batch, steps and sequence settings.
    Read by the step budget and estimates, the Ray backend (TRL SFTTrainer) and MLX."""

    learning_rate: float = Field(
        2e-4, gt=0, le=1, description="SFT's peak AdamW learning rate, reached after warmup_steps (see scheduler)"
    )
    batch_size: int = Field(1, ge=1, le=COUNT_MAX, description=BATCH_DOC)
    gradient_accumulation: int = Field(4, ge=1, le=COUNT_MAX, description=ACCUMULATION_DOC)
    epochs_per_topic: float = Field(
        3,
        gt=0,
        le=COUNT_MAX,
        description="passes over a topic's SFT rows (packed sequences with packing), fractions allowed: "
        "ceil(epochs x steps per epoch) optimizer steps; ignored when max_steps is set",
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        le=COUNT_MAX,
        description="optimizer steps per topic of the whole worker group (not per device); overrides epochs_per_topic",
    )
    max_seq_length: int = Field(
        4096,
        ge=16,
        le=COUNT_MAX,
        description="tokens per SFT row (the packed length with packing); longer examples follow "
        "curriculum.overlong; at most the model's context",
    )
    warmup_steps: int = Field(50, ge=0, le=COUNT_MAX, description=WARMUP_DOC)
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of SFT (DPO uses none)")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine",
        description="SFT's learning-rate schedule after warmup (transformers' lr_scheduler_type; constant has no "
        "warmup); DPO always decays linearly",
    )
    gradient_checkpointing: bool = Field(True, description=CHECKPOINTING_DOC)
    max_grad_norm: float = Field(0.3, gt=0, description=GRAD_NORM_DOC)
    bf16: bool = Field(
        True,
        description="bf16 mixed precision for both stages, SFT and DPO (and DeepSpeed), where the worker's device "
        "computes bf16 natively: a CUDA GPU with bf16 (Ampere on), a CPU with AVX512-BF16 or AMX; elsewhere fp32 "
        "(a warning; summary.json topics[].precision records which)",
    )
    packing: bool = Field(
        True,
        description="Ray only: pack SFT examples into rows of max_seq_length by best-fit decreasing (TRL's bfd, "
        "padding-free); MLX never packs",
    )
    assistant_only_loss: bool = Field(
        True,
        description="train on the assistant turns' tokens only (system and user tokens are masked); false: on "
        "every token",
    )
    logging_steps: int = Field(
        1,
        ge=1,
        description="SFT optimizer steps between logged records (loss, grad norm,"
        " metrics.jsonl, TensorBoard; the NaN/inf guard sees the "
        "logged values); DPO logs every step",
    )


class DPOSection(Section):
    """Direct preference optimization, the second stage of each topic, on its dpo.jsonl pairs (the training
    share, see eval.heldout_pairs). Read by the step budget and estimates, the Ray backend (TRL DPOTrainer)
    and MLX."""

    enabled: bool = Field(
        True,
        description="run DPO after SFT on every topic with training pairs (each topic then needs dpo.jsonl); "
        "false: SFT only",
    )
    learning_rate: float = Field(
        1e-7,
        gt=0,
        le=1,
        description="DPO's peak learning rate, reached after warmup_steps, then decayed linearly",
    )
    batch_size: int = Field(1, ge=1, le=COUNT_MAX, description=BATCH_DOC)
    gradient_accumulation: int = Field(2, ge=1, le=COUNT_MAX, description=ACCUMULATION_DOC)
    steps_per_topic: int = Field(
        100,
        ge=1,
        le=COUNT_MAX,
        description="optimizer steps per topic of the whole worker group "
        "(not per device), each of one global batch of pairs",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="DPO's beta: how strongly the policy is held to the reference (higher: closer to it)",
    )
    max_seq_length: int = Field(
        4096,
        ge=16,
        le=COUNT_MAX,
        description="tokens of prompt + response per side of a pair; longer pairs follow curriculum.overlong; "
        "at most the model's context",
    )
    warmup_steps: int = Field(0, ge=0, le=COUNT_MAX, description=WARMUP_DOC)
    gradient_checkpointing: bool = Field(True, description=CHECKPOINTING_DOC)
    precompute_ref_log_probs: bool | Literal["auto"] = Field(
        "auto",
        description="Ray: score every training pair under the frozen reference once before the topic's DPO "
        "(one forward per pair) instead of a reference forward at every step; auto: precompute when pairs are "
        "revisited, steps_per_topic x global batch > the topic's training pairs (planning/dpo_reference.py); "
        "MLX always precomputes",
    )
    reference: Literal["sft", "base"] = Field(
        "sft", description="sft: a frozen copy of the topic's adapter as DPO starts; base: the adapter disabled"
    )
    max_grad_norm: float = Field(0.3, gt=0, description=GRAD_NORM_DOC)


class CurriculumSection(Section):
    """The training data: which topics, in which order, from which folder, and how over-long examples are
    handled. Read by `validate`, the token counts of the estimates and both backends."""

    data_dir: str = Field(
        "data/curriculum",
        description="folder with one sub-folder per topic (sft.jsonl, dpo.jsonl, eval.jsonl); local or "
        "s3://bucket/prefix (downloaded to the local cache)",
    )
    topics: list[str] = Field(
        ...,
        min_length=1,
        description="topic folders of data_dir, trained in this order, each continuing from the previous "
        "topic's adapter; each listed once",
    )
    persona: str | None = Field(
        None,
        description="the persona profile (lexicon and voice markers) the evaluation scores voice against; "
        "default: <data_dir>/persona.yaml",
    )
    system_prompt: str | None = Field(
        None,
        description="system message put first in every training and evaluation conversation that has none; "
        "default: none",
    )
    overlong: Literal["drop", "truncate", "error"] = Field(
        "drop",
        description="SFT examples and DPO pairs longer than their stage's max_seq_length: drop them (an error if "
        "every SFT example of a topic goes), truncate them to it, or stop with an error",
    )

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
    """Where the run trains and what it costs: the hardware profile (mindprint_ray/planning/catalog/hardware.yaml)
    and overrides of its workers, ZeRO stage, MFU and price. Read by the estimates, `plan`/`report`, the Ray
    backend (workers, DeepSpeed) and MLX (the profile)."""

    profile: str = Field(
        "cpu-2",
        description="a profile of catalog/hardware.yaml: its backend (ray or mlx), devices, memory and peak "
        "FLOP/s per device, CPUs per worker, DeepSpeed default and price",
    )
    deepspeed: Literal["auto", "none", "zero2", "zero3"] = Field(
        "auto",
        description="Ray's DeepSpeed ZeRO stage; zero2 shards gradients and optimizer states, zero3 the base "
        "weights too (in-loop eval is then off); auto: the profile's",
    )
    num_workers: WorkerCount | tuple[WorkerCount, WorkerCount] | None = Field(
        None,
        description="Ray Train workers, one device each: a count, or [min, max] for an elastic worker group "
        "(Ray Train V2 starts as many as the cluster holds, at least min, and resizes after a lost or added "
        "node); each stage's global batch is max x batch_size x gradient_accumulation at any count (gradient "
        "accumulation is recomputed, planning/elastic.py); default: the profile's device count",
    )
    mfu: float | None = Field(
        None,
        gt=0,
        le=1,
        description="override the profile's assumed MFU (model-FLOPs utilisation, both stages) in the time "
        "estimate of this profile; takes precedence over a calibration",
    )
    price_per_hour: float | None = Field(
        None,
        ge=0,
        description="USD per node-hour for this profile's cost estimate, over the price file and spot "
        "(--price-per-hour overrides it); default: the price file's",
    )
    spot: bool = Field(False, description="cost this profile at the price file's spot price instead of on-demand")

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, value):
        if isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError(f"[min, max] needs min <= max, got {list(value)}")
        return value


class StorageSection(Section):
    """Where runs are written (spec, metrics, summary, adapters, report, Ray checkpoints) and how many
    checkpoints are kept. Read by both backends; checkpoints are the Ray backend's."""

    path: str = Field(
        "runs",
        description="parent of the run folders (<path>/<run name>): a local folder or s3://bucket/prefix "
        "(a local mirror in the cache, synced)",
    )
    checkpoint_every_steps: int = Field(
        50,
        ge=1,
        le=COUNT_MAX,
        description="Ray: optimizer steps of a stage between checkpoints a restarted worker group resumes from "
        "(the end of SFT is always one)",
    )
    keep_checkpoints: int = Field(
        2,
        ge=1,
        le=COUNT_MAX,
        description="checkpoints Ray Train keeps in storage (num_to_keep); each local copy is deleted once uploaded",
    )


class RaySection(Section):
    """The Ray cluster the Ray backend (train, sweep) joins and its fault tolerance."""

    address: str | None = Field(None, description="default: RAY_ADDRESS, else a local cluster")
    dashboard: bool = Field(
        True,
        description="a local cluster (no address) starts Ray's dashboard on 127.0.0.1:8265; false saves its "
        "start (~4 s) and its processes' CPU. A joined cluster keeps its own",
    )
    max_failures: int = Field(
        2,
        ge=-1,
        le=COUNT_MAX,
        description="worker-group failures Ray Train recovers from by restarting it from the latest checkpoint; "
        "-1: no limit, 0: none (a node preemption is counted apart, in max_preemptions)",
    )
    max_preemptions: int = Field(
        -1,
        ge=-1,
        le=COUNT_MAX,
        description="node preemptions (a drain with reason PREEMPTION: a spot reclaim) Ray Train recovers from, "
        "counted apart from max_failures (FailureConfig.max_preemption_failures); -1: no limit",
    )
    preemption_grace_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="seconds the surviving workers may run past a preemption's deadline to finish the "
        "just-in-time checkpoint (FailureConfig.preemption_grace_s); the checkpoint is taken at the next "
        "optimizer step after the drain notice",
    )


class EvalSection(Section):
    """Evaluation of every topic (voice fidelity, accuracy, held-out preference, general-ability perplexity) and
    the gates on it. In-loop evaluation is the Ray backend's; `eval` and the report read it too."""

    enabled: bool = Field(
        True,
        description="score the base model and each topic after its stages (each topic then needs eval.jsonl, "
        "and the persona); the gates warn or stop per on_miss",
    )
    voice_fidelity_target: float = Field(
        0.85,
        ge=0,
        le=1,
        description="voice fidelity (0-1) a topic's last stage should reach; below is a miss (see on_miss)",
    )
    accuracy_target: float = Field(
        0.85,
        ge=0,
        le=1,
        description="accuracy (mean of multiple-choice accuracy and key-fact recall, 0-1) a topic's last stage "
        "should reach; below is a miss",
    )
    on_miss: Literal["warn", "stop"] = Field(
        "warn",
        description="what a missed target, a regression or the general-ability guard does after a topic: warn, "
        "or stop the run (finished adapters are kept)",
    )
    regression_margin: float = Field(
        0.05,
        ge=0,
        le=1,
        description="an earlier topic whose voice fidelity or accuracy drops by more than this (absolute) after "
        "a later topic has regressed",
    )
    max_new_tokens: int = Field(
        96,
        ge=1,
        le=COUNT_MAX,
        description="tokens generated (greedy) per answer to an open question; also `generate`'s default",
    )
    max_examples: int | None = Field(
        None,
        ge=1,
        le=COUNT_MAX,
        description="cap eval questions per topic: the first N open questions, multiple-choice items and "
        "held-out pairs each; default: all",
    )
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
        default_factory=lambda: dict(DEFAULT_WEIGHTS),
        description="weights of the voice-fidelity components (markers, lexicon, semantic, preference), >= 0, "
        "renormalised over those present; semantic 0 skips the embedding model",
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, weights: dict[str, float]) -> dict[str, float]:
        known = set(COMPONENTS)
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ValueError(f"unknown voice-fidelity component '{unknown[0]}' (use {', '.join(sorted(known))})")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        return weights


class ParamRange(Section):
    """One searched parameter: explicit `values`, or a `min`/`max` range (log-uniform when `log`)."""

    values: list[float] | None = Field(
        None, description="the values to try (grid: each; random/optuna: a choice); give this or min and max"
    )
    min: float | None = Field(
        None, description="lower end of the range (random/optuna; integer parameters draw whole numbers)"
    )
    max: float | None = Field(None, description="upper end of the range, above min (included for integers)")
    log: bool = Field(False, description="sample the range log-uniformly (needs min > 0)")

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
    """The hyperparameter sweep of `mindprint-ray sweep` (Ray Tune over Ray Train trials); `train` ignores it."""

    space: dict[str, ParamRange] = Field(
        ...,
        min_length=1,
        description="searched parameters by dotted path: lora.rank, lora.alpha, lora.dropout, sft.learning_rate, "
        "sft.epochs_per_topic, sft.warmup_steps, dpo.learning_rate, dpo.beta, dpo.steps_per_topic",
    )
    search: Literal["grid", "random", "optuna"] = Field(
        "grid",
        description="grid: every combination of the values; random: Ray Tune's sampling; optuna: Optuna's TPE "
        "(seeded with seed)",
    )
    num_samples: int = Field(1, ge=1, le=COUNT_MAX, description="grid: repeats of the grid; random/optuna: trials")
    metric: str | None = Field(None, description="default: voice_fidelity with eval on, else sft_loss")
    mode: Literal["max", "min"] | None = Field(
        None, description="maximise or minimise the metric; default: the metric's (min for losses, else max)"
    )
    scheduler: Literal["asha", "none"] = Field(
        "asha", description="asha: stop weak trials early (ASHA, reduction factor 2); none: run every trial out"
    )
    grace_period: int = Field(2, ge=1, le=COUNT_MAX, description="ASHA: reports before a trial may be stopped")
    topics: list[str] | None = Field(None, description="default: the first topic of the curriculum")
    workers_per_trial: int | None = Field(
        None, ge=1, le=COUNT_MAX, description="Ray Train workers of each trial; default: hardware.num_workers"
    )
    max_concurrent: int | None = Field(
        None,
        ge=1,
        le=COUNT_MAX,
        description="trials at once; default: as many as the cluster's GPUs (CPU profiles: CPUs) hold",
    )


class RunSpec(Section):
    """One training run: the base model, the adapter, the curriculum, both stages, hardware, storage and
    evaluation. `mindprint-ray validate`, `plan`, `train`, `sweep` and `python -m local_mlx` read it."""

    name: str | None = Field(None, description="the run folder's name; default: the spec file's name")
    seed: int = Field(
        42,
        ge=0,
        le=2**32 - 1,
        description="random seed of the trainers, MLX's data order, the bootstrap intervals and Optuna",
    )
    model: ModelSection = Field(default_factory=ModelSection, description="the base model")
    lora: LoraSection = Field(default_factory=LoraSection, description="the LoRA adapter and its zones")
    quantization: QuantizationSection = Field(
        default_factory=QuantizationSection, description="how the frozen base weights are stored"
    )
    sft: SFTSection = Field(default_factory=SFTSection, description="the SFT stage of every topic")
    dpo: DPOSection = Field(default_factory=DPOSection, description="the DPO stage of every topic")
    curriculum: CurriculumSection = Field(description="the training data: topics in order (required)")
    hardware: HardwareSection = Field(default_factory=HardwareSection, description="hardware profile and its costs")
    storage: StorageSection = Field(default_factory=StorageSection, description="where run folders are written")
    ray: RaySection = Field(default_factory=RaySection, description="the Ray cluster")
    eval: EvalSection = Field(default_factory=EvalSection, description="evaluation and its gates")
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "none"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Ray backend's experiment trackers besides metrics.jsonl (tensorboard: <run>/tensorboard); "
        "mlflow and wandb need their package; none: no tracker",
    )
    tune: TuneSection | None = Field(None, description="the sweep of `mindprint-ray sweep`; default: none")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        problem = name_problem(name) if name is not None else None
        if problem:
            raise ValueError(f"run name {problem}")
        return name

    @property
    def persona_path(self) -> Path:
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


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds, outermost first: X, X | None, list[X], dict[str, X] | None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _is_mapping(annotation: Any) -> bool:
    """dict[str, X] (or dict[str, X] | None): the next part of a field path is a key the user chose."""
    return any(typing.get_origin(a) is dict for a in (annotation, *typing.get_args(annotation)))


def _known_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """Field names at `path` inside `model`'s schema (for 'did you mean' hints); [] where it is not a model."""
    keyed = False
    for part in path:
        if isinstance(part, int) or keyed:  # a list index, or a key of a mapping (tune.space, prices)
            keyed = False
            continue
        field = model.model_fields.get(part)
        inner = _models_in(field.annotation) if field is not None else []
        if not inner:
            return []
        model, keyed = inner[0], _is_mapping(field.annotation)
    return list(model.model_fields)


SPEC_MISSING_HINT = "add it (see configs/tiny-cpu.yaml for a complete example)"
SPEC_VALUE_HINT = "fix the value; `mindprint-ray validate CFG` checks the whole spec"


# the parts of a pydantic error location that name its own validators and union members, not a field
PYDANTIC_TAG = re.compile(
    r"function-(after|before|wrap|plain)|\[key\]|constrained-\w+|\w+\[.*\]|int|float|str|bool|none"
)


def validation_error(
    err: ValidationError,
    file: str,
    lines: dict,
    model: type[BaseModel] = RunSpec,
    missing_hint: str = SPEC_MISSING_HINT,
    value_hint: str = SPEC_VALUE_HINT,
) -> UserError:
    """The first problem pydantic found in a YAML file validated with `model`, as a UserError naming the file, the
    line (`lines` from yaml_lines.load_yaml_with_lines), the dotted field and a hint. The one conversion for every
    YAML file with a pydantic model: run specs, model configs, hardware profiles and prices."""
    errors = err.errors()
    e = errors[0]
    if e["type"].endswith("_type"):  # a union's wrong-type branch: the branch that took the value says more
        e = next((x for x in errors if not x["type"].endswith("_type")), e)
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and PYDANTIC_TAG.fullmatch(p)))
    field = dotted(loc)
    line = line_for(lines, loc)
    if e["type"] == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
        return UserError(f"unknown key '{loc[-1]}'", file=file, line=line, field=field, hint=hint)
    if e["type"] == "missing":
        return UserError(f"missing field '{loc[-1]}'", file=file, line=line, field=field, hint=missing_hint)
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return UserError(f"{msg}{got_text}", file=file, line=line, field=field, hint=value_hint)


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
        raise validation_error(err, str(path), lines) from None
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
