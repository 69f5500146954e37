"""Elastic worker groups in the plan: hardware.num_workers [min, max] and the batch layout that keeps each stage's
global batch at every worker count (planning/elastic.py), without Ray."""

import json

import pytest
from conftest import run_cli

from mindprint_ray.planning.elastic import batch_layout, elastic_plan, stage_layout
from mindprint_ray.planning.run_plan import load_run


@pytest.mark.parametrize(
    "target,workers,max_per_device,expected",
    [
        (8, 2, 2, (2, 2)),  # the spec's own layout at full size
        (8, 1, 2, (2, 4)),  # half the workers: twice the accumulation
        (6, 3, 2, (2, 1)),
        (6, 2, 2, (1, 3)),  # 2 x 2 does not divide 6: the micro-batch shrinks, the global batch stays
        (6, 4, 2, (2, 1)),  # no exact layout: the nearest above, 8 (the larger micro-batch of two ways)
        (7, 3, 4, (3, 1)),  # prime: 9 (3 x 3 x 1), not 12
    ],
)
def test_the_layout_keeps_the_global_batch_where_the_count_allows(target, workers, max_per_device, expected):
    layout = batch_layout(target, workers, max_per_device)
    assert (layout.per_device, layout.accumulation) == expected
    assert layout.per_device <= max_per_device
    assert layout.exact == (target % workers == 0 and layout.global_batch == target)
    assert layout.global_batch >= target


def test_every_count_of_a_range_is_planned_with_the_same_global_batch():
    run = load_run("configs/tiny-cpu.yaml", ["hardware.num_workers=[1,3]", "sft.batch_size=2", "dpo.batch_size=2"])
    assert run.worker_range == (1, 3) and run.num_workers == 3
    plan = elastic_plan(run)
    assert [c["workers"] for c in plan["counts"]] == [1, 2, 3]
    assert {c["sft"]["global_batch"] for c in plan["counts"]} == {6}
    assert [c["time_factor"] for c in plan["counts"]] == [3.0, 1.5, 1.0]
    assert stage_layout(run, "dpo", 3).accumulation == run.spec.dpo.gradient_accumulation
    assert elastic_plan(load_run("configs/tiny-cpu.yaml", ["hardware.num_workers=2"])) is None


def test_plan_shows_each_count_and_warns_where_no_exact_layout_exists():
    r = run_cli("plan", "configs/tiny-cpu.yaml", "hardware.num_workers=[2,4]", "sft.batch_size=3", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    counts = {c["workers"]: c for c in summary["elastic"]["counts"]}
    assert counts[4]["sft"] == {"batch_size": 3, "gradient_accumulation": 1, "global_batch": 12, "exact": True}
    assert counts[3]["sft"]["global_batch"] == 12 and counts[3]["sft"]["exact"]
    assert any("no exact batch layout on" in w for w in summary["warnings"])  # dpo: 4 x 2 = 8 on 3 workers
    table = run_cli("plan", "configs/tiny-cpu.yaml", "hardware.num_workers=[2,4]", "sft.batch_size=3")
    assert "elastic workers 2-4" in table.stdout and "the same global batch at any count" in table.stdout


@pytest.mark.parametrize(
    "value,needle",
    [("[3,1]", "min <= max"), ("[0,2]", "hardware.num_workers"), ("[1,2,3]", "hardware.num_workers")],
)
def test_a_bad_range_is_a_user_error_naming_the_field(value, needle):
    r = run_cli("validate", "configs/tiny-cpu.yaml", f"hardware.num_workers={value}")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_a_multinode_run_on_local_storage_is_refused_before_any_worker_starts(tmp_path, tiny_model_dir):
    r = run_cli(
        "train",
        "configs/tiny-cpu.yaml",
        "hardware.profile=cpu-2x1",
        f"storage.path={tmp_path}",
        f"model.path={tiny_model_dir}",
        "--name",
        "local",
    )
    assert r.returncode == 2 and "s3://" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "local").exists()  # refused before the run folder, the lease or Ray
