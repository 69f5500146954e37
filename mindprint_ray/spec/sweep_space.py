"""The sweep's search space, checked before any trial starts, and applied to a run spec per trial.

Pure Python: the Ray Tune side (backends/ray_torch/sweep.py) turns `SearchSpace` into Tune's distributions, each
parameter's type (integer or real) read from SWEEPABLE here."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from mindprint_ray.errors import UserError
from mindprint_ray.planning.run_plan import RunPlan, build_run
from mindprint_ray.planning.zones import default_alpha
from mindprint_ray.spec.inputs import NAME_MAX
from mindprint_ray.spec.run_spec import ParamRange, RunSpec

SWEEPABLE = {
    "lora.rank": int,
    "lora.alpha": float,
    "lora.dropout": float,
    "sft.learning_rate": float,
    "sft.epochs_per_topic": float,
    "sft.warmup_steps": int,
    "dpo.learning_rate": float,
    "dpo.beta": float,
    "dpo.steps_per_topic": int,
}
# metric -> (mode, needs eval)
METRICS = {
    "voice_fidelity": ("max", True),
    "accuracy": ("max", True),
    "sft_loss": ("min", False),
    "dpo_loss": ("min", False),
    "reward_accuracy": ("max", False),
    "reward_margin": ("max", False),
}


@dataclass(frozen=True)
class SearchSpace:
    params: dict[str, ParamRange]
    metric: str
    mode: str
    topics: list[str]

    def is_integer(self, path: str) -> bool:
        """Whether the parameter takes whole numbers (its declared type in SWEEPABLE), e.g. lora.rank."""
        return SWEEPABLE[path] is int


def check_space(run: RunPlan) -> SearchSpace:
    """Every parameter path known and sweepable, every range non-empty, the metric one the trainer reports."""
    spec = run.spec
    tune = spec.tune
    if tune is None:
        raise UserError(
            "the spec has no `tune` section", field="tune", hint="add tune.space (see configs/tiny-sweep.yaml)"
        )
    for path, r in tune.space.items():
        if path not in SWEEPABLE:
            raise UserError(
                f"unknown or unsweepable parameter path '{path}'",
                field=f"tune.space.{path}",
                hint=f"sweepable: {', '.join(SWEEPABLE)}",
            )
        if tune.search == "grid" and r.values is None:
            raise UserError(
                "grid search needs `values: [...]`",
                field=f"tune.space.{path}",
                hint="list the values, or use search: random / optuna with min/max",
            )
    metric = tune.metric or ("voice_fidelity" if spec.eval.enabled else "sft_loss")
    if metric not in METRICS:
        raise UserError(
            f"metric '{metric}' is not reported by the trainer",
            field="tune.metric",
            hint=f"reported metrics: {', '.join(METRICS)}",
        )
    default_mode, needs_eval = METRICS[metric]
    if needs_eval and not spec.eval.enabled:
        raise UserError(
            f"metric '{metric}' needs the in-loop evaluation, which is off",
            field="tune.metric",
            hint="set eval.enabled: true or choose sft_loss / reward_accuracy",
        )
    if metric == "dpo_loss" or metric.startswith("reward"):
        if not spec.dpo.enabled:
            raise UserError(f"metric '{metric}' needs DPO, which is off", field="tune.metric")
    topics = tune.topics or spec.curriculum.topics[:1]
    unknown = [t for t in topics if t not in spec.curriculum.topics]
    if unknown:
        raise UserError(f"tune topic '{unknown[0]}' is not in curriculum.topics", field="tune.topics")
    if len(best_name(spec.name)) > NAME_MAX:
        raise UserError(
            f"the sweep name is too long for its best run '{best_name(spec.name)[:20]}...' "
            f"(at most {NAME_MAX - len(best_name(''))} characters)",
            field="name",
            hint="pass a shorter --name",
        )
    space = SearchSpace(dict(tune.space), metric, tune.mode or default_mode, list(topics))
    for params in corner_points(space):  # every corner of the space must make a valid run
        trial_run(run, params, "check")
    return space


def corner_points(space: SearchSpace) -> list[dict]:
    lows = {p: (r.values[0] if r.values else r.min) for p, r in space.params.items()}
    highs = {p: (r.values[-1] if r.values else r.max) for p, r in space.params.items()}
    return [lows, highs]


def apply_params(spec: RunSpec, params: dict, name: str, topics: list[str]) -> RunSpec:
    """A trial's spec: the swept values set (alpha follows the rank, zones.default_alpha, unless swept or set),
    tune removed."""
    data = copy.deepcopy(spec.model_dump(mode="json"))
    for path, value in params.items():
        section, key = path.split(".")
        data[section][key] = SWEEPABLE[path](value)
    if "lora.rank" in params and "lora.alpha" not in params and spec.lora.alpha is None:
        data["lora"]["alpha"] = default_alpha(int(params["lora.rank"]))
    data["name"], data["tune"] = name, None
    data["curriculum"]["topics"] = topics
    return RunSpec.model_validate(data)


def trial_run(run: RunPlan, params: dict, name: str, topics: list[str] | None = None) -> RunPlan:
    from pydantic import ValidationError

    try:
        spec = apply_params(run.spec, params, name, topics or run.spec.curriculum.topics)
        return build_run(spec)
    except ValidationError as err:
        e = err.errors()[0]
        path = ".".join(str(p) for p in e["loc"])
        raise UserError(
            f"{path}: {e['msg']} (with {params})",
            field=f"tune.space.{path}",
            hint="narrow the search space to valid values",
        ) from None
    except UserError as e:
        e.field = e.field or "tune.space"
        e.message = f"{e.message} (with {params})"
        raise


def best_spec(run: RunPlan, params: dict) -> RunSpec:
    """The full curriculum with the best trial's values: a ready-to-run config."""
    return apply_params(run.spec, params, best_name(run.spec.name), run.spec.curriculum.topics)


def best_name(sweep: str) -> str:
    """The run name in best.yaml: the sweep's name and `-best`."""
    return f"{sweep}-best"
