"""The step budget: optimizer steps, warmup, peak LR and passes per topic, told by validate, plan and the report."""

from __future__ import annotations

import json
import math

import pytest
from conftest import ROOT, run_cli

from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.planning.step_budget import packed_rows, step_budget
from mindprint_ray.planning.time_model import stage_flops
from mindprint_ray.planning.topic_tokens import TopicTokens, count_topic_tokens
from mindprint_ray.spec.run_spec import DPOSection, SFTSection

QLORA = "configs/qwen72b-qlora-8xh100.yaml"
WIDE = {"COLUMNS": "220"}  # rich wraps at the terminal width; keep table cells on one line


def qlora_budget():
    run = load_run(ROOT / QLORA)
    tokens, _ = count_topic_tokens(run)
    return tokens, step_budget(run, tokens)


def test_72b_on_8xh100_trains_one_sft_step_per_epoch_inside_warmup():
    tokens, budget = qlora_budget()
    assert budget.workers == 8 and len(budget.topics) == 10
    for t, b in zip(tokens, budget.topics):
        assert 4_000 < t.sft_tokens < 2 * 4096 and b.sft.rows == 2  # ~5,000 tokens pack into 2 sequences
        assert b.sft.global_batch == 32 and b.sft.steps_per_epoch == 1 and b.sft.steps == 3
        assert b.sft.peak_fraction == pytest.approx(2 / 50)  # steps apply 0, 1/50, 2/50 of the lr
        assert b.sft.peak_lr == pytest.approx(8e-6) and b.sft.passes == 3


def test_72b_dpo_revisits_its_pairs_and_every_warning_has_numbers_and_a_fix():
    tokens, budget = qlora_budget()
    pairs = tokens[0].dpo_pairs
    per_epoch = math.ceil(math.ceil(pairs / 8) / 2)  # micro-batches per device over accumulation 2
    for b in budget.topics:
        assert b.dpo.global_batch == 16 and b.dpo.steps == 100 and b.dpo.peak_fraction == 1.0
        assert b.dpo.passes == pytest.approx(100 / per_epoch) and b.dpo.passes > 8
    found = {(w.stage, w.kind): w for w in budget.warnings}
    assert set(found) == {("sft", "warmup"), ("sft", "few_steps"), ("dpo", "revisits")}
    warmup = found["sft", "warmup"]
    assert len(warmup.topics) == 10
    assert "3 optimizer steps" in warmup.message and "sft.warmup_steps 50" in warmup.message
    assert "8e-06 (4% of 0.0002)" in warmup.message and "sft.warmup_steps <= 2" in warmup.fix
    few = found["sft", "few_steps"]
    assert "2 packed sequences against a global batch of 32 (1 x 4 x 8 device(s))" in few.message
    assert "sft.epochs_per_topic to 10" in few.fix
    revisit = found["dpo", "revisits"]
    assert f"{pairs} pairs {100 / per_epoch:.0f} times" in revisit.message
    assert "at least 200 pairs" in revisit.fix  # 100 steps x 16 / 8 passes
    if 8 * per_epoch >= 10:
        assert f"lower dpo.steps_per_topic to {8 * per_epoch}" in revisit.fix


def test_hand_made_case_exact_steps_peak_lr_and_fixes():
    run = load_run(
        ROOT / QLORA,
        [
            "hardware.num_workers=2",
            "sft.batch_size=2",
            "sft.gradient_accumulation=3",
            "sft.epochs_per_topic=2",
            "sft.warmup_steps=10",
            "sft.max_seq_length=1000",
            "dpo.batch_size=2",
            "dpo.gradient_accumulation=2",
            "dpo.steps_per_topic=12",
        ],
    )
    t = TopicTokens("x", 40, 40 * 600, 10, 0, 0, (600,) * 40)
    b = step_budget(run, [t])
    sft, dpo = b.topics[0].sft, b.topics[0].dpo
    # 40 sequences (600 + 600 > 1000); 20 micro-batches of 2 over 2 devices = 10 each; ceil(10 / 3) = 4 per epoch
    assert (sft.rows, sft.global_batch, sft.steps_per_epoch, sft.steps) == (40, 12, 4, 8)
    assert sft.peak_fraction == pytest.approx(7 / 10) and sft.peak_lr == pytest.approx(1.4e-4)
    # 10 pairs: 5 micro-batches over 2 devices = 3 each, ceil(3 / 2) = 2 steps per pass, 12 steps = 6 passes
    assert (dpo.rows, dpo.global_batch, dpo.steps_per_epoch, dpo.steps, dpo.passes) == (10, 8, 2, 12, 6)
    assert dpo.peak_fraction == 1.0
    found = {(w.stage, w.kind): w for w in b.warnings}
    assert set(found) == {("sft", "warmup"), ("sft", "few_steps")}
    assert found["sft", "warmup"].fix.startswith("set sft.warmup_steps <= 7")
    assert found["sft", "few_steps"].fix == "lower sft.gradient_accumulation to 2"  # 5 steps/epoch x 2 = 10


def test_warmup_below_steps_reaches_the_peak_and_constant_ignores_warmup():
    t = TopicTokens("x", 40, 40 * 600, 0, 0, 0, (600,) * 40)
    base = ["hardware.num_workers=1", "sft.max_seq_length=1000", "sft.gradient_accumulation=1", "dpo.enabled=false"]
    steps = step_budget(load_run(ROOT / QLORA, base + ["sft.warmup_steps=119"]), [t]).topics[0].sft
    assert steps.steps == 120 and steps.peak_fraction == 1.0  # index 119 = warmup: the full lr
    at = step_budget(load_run(ROOT / QLORA, base + ["sft.warmup_steps=120"]), [t])
    assert at.topics[0].sft.peak_fraction == pytest.approx(119 / 120) and at.warnings[0].kind == "warmup"
    flat = step_budget(load_run(ROOT / QLORA, base + ["sft.warmup_steps=500", "sft.scheduler=constant"]), [t])
    assert flat.topics[0].sft.peak_fraction == 1.0 and not flat.warnings and flat.topics[0].dpo is None


def test_packing_is_best_fit_decreasing_like_trl():
    assert packed_rows([5, 2, 3, 1], 4) == 3  # TRL's pack_dataset docstring: [[1,2,3,4],[8,9,10,11],[6,7]]
    assert packed_rows([600, 600, 600], 1000) == 3  # where ceil(1800 / 1000) = 2 would be wrong
    assert packed_rows([900, 600, 500, 400, 300, 100, 100], 1000) == 3
    assert packed_rows([700] * 1000 + [300] * 1000, 1000) == 1334  # TRL packs each batch of 1000 examples alone


def test_mlx_budget_follows_local_mlx():
    from local_mlx.stage import StageConfig, lr_at

    run = load_run(ROOT / "configs" / "tiny-mlx.yaml", ["sft.warmup_steps=30"])
    t = TopicTokens("x", 30, 30 * 100, 20, 0, 0, (100,) * 30)
    b = step_budget(run, [t])
    sft, dpo = b.topics[0].sft, b.topics[0].dpo
    assert b.workers == 1 and sft.rows == 30 and sft.steps == 23  # ceil(3 x 30 / 4), the comment in tiny-mlx.yaml
    cfg = StageConfig("x", "sft", sft.steps, 1, sft.learning_rate, 30, run.spec.sft.scheduler)
    assert sft.peak_lr == pytest.approx(max(lr_at(s, cfg) for s in range(sft.steps)))
    assert dpo.steps == 6 and dpo.passes == pytest.approx(6 * 2 / 20)
    assert {w.kind for w in b.warnings} == {"warmup", "few_steps"}


def test_tiny_cpu_config_raises_no_warning():
    run = load_run(ROOT / "configs" / "tiny-cpu.yaml")
    b = step_budget(run, count_topic_tokens(run)[0])
    assert b.warnings == [] and all(t.sft.steps >= 10 and t.dpo.passes <= 8 for t in b.topics)


def test_time_model_trains_the_budgets_passes():
    t = TopicTokens("x", 10, 5000, 0, 0, 0)
    assert stage_flops(load_run(ROOT / QLORA, ["sft.max_steps=6"]), t, "sft")[0] == 6 * 5000  # max_steps wins


def test_spec_says_what_a_batch_and_a_step_are():
    assert "per device" in SFTSection.model_fields["batch_size"].description
    assert "x workers" in DPOSection.model_fields["gradient_accumulation"].description
    for field in (SFTSection.model_fields["max_steps"], DPOSection.model_fields["steps_per_topic"]):
        assert "whole worker group" in field.description
    assert "peak" in SFTSection.model_fields["warmup_steps"].description


def test_plan_prints_the_budget_and_warnings_and_json_has_it():
    r = run_cli("plan", QLORA, env=WIDE)
    assert r.returncode == 0, r.stderr
    for needle in (
        "step budget per topic",
        "3 (1/epoch)",
        "8e-06 (4%)",
        "global batch 32",
        "fix: set sft.warmup_steps <= 2",
        "DPO revisits each topic's",
    ):
        assert needle in r.stdout, needle
    j = json.loads(run_cli("plan", QLORA, "--json").stdout)["step_budget"]
    assert j["workers"] == 8 and j["topics"][0]["sft"]["steps"] == 3
    assert {(w["stage"], w["kind"]) for w in j["warnings"]} == {
        ("sft", "warmup"),
        ("sft", "few_steps"),
        ("dpo", "revisits"),
    }


def test_validate_prints_the_budget():
    r = run_cli("validate", "configs/tiny-cpu.yaml", env=WIDE)
    assert r.returncode == 0, r.stderr
    assert "step budget per topic" in r.stdout and "step budget OK" in r.stdout
    r = run_cli("validate", QLORA, env=WIDE)
    assert r.returncode == 0, r.stderr
    assert "warning: SFT trains 3 optimizer steps" in r.stdout and "fix: raise sft.epochs_per_topic" in r.stdout


def test_report_has_the_budget_section(tmp_path):
    from mindprint_ray.report.build import write_report

    md = write_report(load_run(ROOT / QLORA), tmp_path, "8xh100-80gb")["md"].read_text()
    section = md.split("## Step budget", 1)[1].split("\n## ", 1)[0]
    assert "| cycle_basics | 2 | 3 (1/epoch) | 8e-06 (4%) | 3 |" in section
    assert section.count("- Warning: ") == 3 and "Fix: set sft.warmup_steps <= 2" in section
