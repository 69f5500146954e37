"""Ray Tune sweeps: bad search spaces exit 2 before any trial; a real 2x2 tiny sweep writes its outputs."""

import csv
import json

import pytest
import yaml
from conftest import ROOT, run_cli


@pytest.mark.parametrize(
    "override,needle",
    [
        ("tune.space.lora.rank={values: []}", "`values` is empty"),
        ("tune.space.sft.learning_rate={min: 0.01, max: 0.001}", "inverted range"),
        ("tune.space.sft.momentum={values: [0.9]}", "unknown or unsweepable parameter path 'sft.momentum'"),
        ("tune.metric=bleu", "metric 'bleu' is not reported"),
        ("tune.topics=[nope]", "not in curriculum.topics"),
        ("tune.space.sft.learning_rate={min: 0.001, max: 0.01}", "grid search needs `values"),
    ],
)
def test_bad_sweeps_exit_2_before_any_trial(override, needle):
    r = run_cli("sweep", "configs/tiny-sweep.yaml", override, "storage.path=/nonexistent/never-written")
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_metric_needing_eval_is_refused_when_eval_is_off():
    r = run_cli("sweep", "configs/tiny-sweep.yaml", "eval.enabled=false")
    assert r.returncode == 2 and "needs the in-loop evaluation" in r.stderr


def test_rank_out_of_range_in_the_space_is_refused():
    r = run_cli("sweep", "configs/tiny-sweep.yaml", "tune.space.lora.rank={values: [0, 8]}")
    assert r.returncode == 2 and "lora.rank" in r.stderr


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_tiny_sweep_two_ranks_by_two_learning_rates(tmp_path, tiny_model_dir):
    r = run_cli(
        "sweep",
        "configs/tiny-sweep.yaml",
        f"storage.path={tmp_path}",
        f"model.path={tiny_model_dir}",
        # a trial's cost is mostly starting its worker: fewer steps and shorter answers than the shipped sweep
        "sft.max_steps=6",
        "dpo.steps_per_topic=2",
        "eval.max_examples=3",
        "eval.max_new_tokens=16",
        "ray.dashboard=false",
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    root = tmp_path / "tiny-sweep"
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert len(rows) == 4
    assert {(int(float(r["lora.rank"])), float(r["sft.learning_rate"])) for r in rows} == {
        (4, 0.003),
        (4, 0.01),
        (16, 0.003),
        (16, 0.01),
    }
    assert all(r["status"] == "finished" and 0 <= float(r["voice_fidelity"]) <= 1 for r in rows)
    assert all(float(r["wall_s"]) > 0 and int(r["steps"]) > 0 for r in rows)
    assert "| trial |" in (root / "results.md").read_text()
    assert (root / "heatmap.png").stat().st_size > 5_000
    best = yaml.safe_load((root / "best.yaml").read_text())
    winner = max(rows, key=lambda r: float(r["voice_fidelity"]))
    assert best["lora"]["rank"] == int(float(winner["lora.rank"])) and best["lora"]["alpha"] == 2 * best["lora"]["rank"]
    assert (
        best["curriculum"]["topics"]
        == yaml.safe_load((ROOT / "configs/tiny-sweep.yaml").read_text())["curriculum"]["topics"]
        and best["tune"] is None
    )
    assert (root / "best_adapter" / "adapter_model.safetensors").is_file()
    check = run_cli("plan", str(root / "best.yaml"), "--json")  # `train` accepts the best config
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["lora"]["rank"] == best["lora"]["rank"]


def test_ranges_sample_each_parameter_with_its_declared_type():
    """Tune's distributions follow the search space's declared types (SWEEPABLE), not the parameter's name."""
    from ray.tune.search.sample import Float, Integer

    from mindprint_ray.backends.ray_torch.sweep import distributions
    from mindprint_ray.spec.run_spec import ParamRange
    from mindprint_ray.spec.sweep_space import SWEEPABLE, SearchSpace

    space = SearchSpace({p: ParamRange(min=1, max=4) for p in SWEEPABLE}, "sft_loss", "min", ["t"])
    kinds = {p: type(d) for p, d in distributions(space, "random").items()}
    assert kinds == {p: Integer if t is int else Float for p, t in SWEEPABLE.items()}
    assert {p for p, t in SWEEPABLE.items() if t is int} == {"lora.rank", "sft.warmup_steps", "dpo.steps_per_topic"}


def test_a_swept_rank_sets_the_default_alpha():
    from mindprint_ray.planning.run_plan import load_run
    from mindprint_ray.planning.zones import default_alpha
    from mindprint_ray.spec.sweep_space import apply_params

    spec = load_run(ROOT / "configs" / "tiny-sweep.yaml").spec
    trial = apply_params(spec, {"lora.rank": 4.0}, "trial", ["capitulation"])
    assert (trial.lora.rank, trial.lora.alpha) == (4, default_alpha(4)) == (4, 8)
