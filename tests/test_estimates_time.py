"""Time model, MFU resolution, calibration and costs: hand-checked numbers, no torch."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, run_cli

from mindprint_ray.planning.costs import hourly_price, time_cost
from mindprint_ray.planning.registry import get_arch
from mindprint_ray.planning.run_measures import calibrate, read_run
from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.planning.time_model import (
    matmul_params,
    resolve_mfu,
    stage_flops,
    train_flops_per_token,
)
from mindprint_ray.planning.topic_tokens import TopicTokens, count_topic_tokens

QLORA = str(ROOT / "configs" / "qwen72b-qlora-8xh100.yaml")


@pytest.fixture
def tiny_dir(request):
    """The built tiny model (models/tiny, as `make demo` writes it), else one built for the session."""
    built = ROOT / "models" / "tiny"
    if (built / "tokenizer.json").is_file():
        return built
    return request.getfixturevalue("tiny_model_dir")


@pytest.fixture(autouse=True)
def private_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDPRINT_CALIBRATION", str(tmp_path / "calibration.json"))


def test_flops_per_token_follow_4n_6n():
    arch = get_arch("qwen2.5-72b")
    n = matmul_params(arch, 0)
    assert n == arch.linear_params() + 152064 * 8192
    plain = train_flops_per_token(arch, 0, 0, checkpointing=False)
    assert plain == 4 * n and train_flops_per_token(arch, 0, 0, checkpointing=True) == 6 * n
    attn = train_flops_per_token(arch, 0, 1000, False) - plain
    assert attn == 3 * 2 * 80 * 64 * 128 * 1000


def test_dpo_counts_policy_and_reference_and_padding():
    run = load_run(QLORA, ["dpo.precompute_ref_log_probs=false"])  # the reference forward at every step
    t = TopicTokens("x", 10, 1000, 4, 800, 1000)
    tokens, flops = stage_flops(run, t, "dpo")
    seen = 100 * 1 * 2 * 8
    assert tokens == pytest.approx(seen * 200)
    per_policy = train_flops_per_token(run.arch, run.zones.trainable_params(), t.mean_dpo_length, True)
    assert flops > seen * 250 * per_policy  # padded tokens, plus the 2N reference forward
    pre = load_run(QLORA, ["dpo.precompute_ref_log_probs=true"])
    assert stage_flops(pre, t, "dpo")[1] < flops
    assert stage_flops(load_run(QLORA), t, "dpo") == stage_flops(pre, t, "dpo")  # auto: 4 pairs are revisited


def test_sft_tokens_are_epochs_times_curriculum_tokens():
    run = load_run(QLORA)
    t = TopicTokens("x", 10, 5000, 0, 0, 0)
    assert stage_flops(run, t, "sft")[0] == 3 * 5000
    capped = load_run(QLORA, ["sft.max_steps=1"])
    assert stage_flops(capped, t, "sft")[0] == pytest.approx(5000 / 1)  # 2 packed seqs fit one step of 32


def test_tokens_counted_exactly_with_a_local_tokenizer(tiny_dir):
    run = load_run(
        ROOT / "configs" / "tiny-cpu.yaml",
        [f"model.path={tiny_dir}", f"curriculum.data_dir={ROOT / 'data' / 'curriculum'}"],
    )
    rows, how = count_topic_tokens(run)
    assert how.startswith("exact") and [r.topic for r in rows] == ["cycle_basics", "accumulation", "capitulation"]
    approx, how2 = count_topic_tokens(load_run(QLORA))
    assert how2.startswith("approximate") and all(r.sft_tokens > 0 and r.dpo_pairs > 0 for r in approx)


def test_mfu_precedence_spec_then_calibration_then_profile():
    run = load_run(QLORA)
    assert resolve_mfu(run).source == "profile" and resolve_mfu(run).sft == 0.25
    cal = {"mfu": {"sft": 0.3, "dpo": 0.35}, "run": "r", "model": "m", "date": "d"}
    assert (resolve_mfu(run, cal).sft, resolve_mfu(run, cal).dpo) == (0.3, 0.35)
    spec_mfu = load_run(QLORA, ["hardware.mfu=0.5"])
    assert resolve_mfu(spec_mfu, cal).source == "spec" and resolve_mfu(spec_mfu).sft == 0.5


def test_cost_is_hours_times_price_and_overrides():
    run = load_run(QLORA)
    t = [TopicTokens("a", 10, 20000, 20, 8000, 10000)]
    out = time_cost(run, t, "test")
    assert out["cost_usd"] == pytest.approx(out["curriculum_hours"] * 55.04)
    assert out["cost_previous_list_usd"] == pytest.approx(out["curriculum_hours"] * 98.32)
    assert hourly_price(run, 12.5)["per_hour"] == 12.5
    assert hourly_price(load_run(QLORA, ["hardware.spot=true"]))["per_hour"] == 27.52
    half = time_cost(load_run(QLORA, ["hardware.mfu=0.5"]), t, "test")
    assert half["curriculum_hours"] == pytest.approx(out["curriculum_hours"] / 2)


def _fake_run(root, tiny_dir):
    """A run folder with the layout `train` writes: two timed SFT steps and one DPO step for one topic."""
    root.mkdir()
    spec = (ROOT / "configs" / "tiny-cpu.yaml").read_text().replace("path: models/tiny", f"path: {tiny_dir}")
    spec = spec.replace("data_dir: data/curriculum", f"data_dir: {ROOT / 'data' / 'curriculum'}")
    (root / "spec.yaml").write_text(spec)
    lines = [
        {"time": 100.0, "event": "stage_start", "topic": "cycle_basics", "stage": "sft", "step": 0},
        {"time": 101.0, "topic": "cycle_basics", "stage": "sft", "step": 1, "num_tokens": 900.0, "peak_memory_gb": 0.7},
        {
            "time": 104.0,
            "topic": "cycle_basics",
            "stage": "sft",
            "step": 2,
            "num_tokens": 1800.0,
            "peak_memory_gb": 0.8,
        },
        {"time": 110.0, "event": "stage_start", "topic": "cycle_basics", "stage": "dpo", "step": 0},
        {
            "time": 112.0,
            "topic": "cycle_basics",
            "stage": "dpo",
            "step": 1,
            "num_tokens": 1000.0,
            "peak_memory_gb": 0.85,
        },
    ]
    (root / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {
        "profile": "cpu-2",
        "topics": {
            "cycle_basics": {
                "status": "done",
                "wall_s": 15.0,
                "sft": {"tokens": 1800.0, "tokens_per_s": 450.0, "peak_memory_gb": 0.8},
                "dpo": {"tokens": 1000.0, "tokens_per_s": 500.0, "peak_memory_gb": 0.85},
            }
        },
    }
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def test_calibrate_stores_mfu_that_reproduces_the_measured_time(tmp_path, tiny_dir):
    folder = _fake_run(tmp_path / "run", tiny_dir)
    measures = read_run(folder)
    assert measures.stages["cycle_basics"]["sft"].seconds == 4.0
    entry = calibrate(folder)
    assert entry["profile"] == "cpu-2" and entry["quant"] == "fp32" and set(entry["mfu"]) == {"sft", "dpo"}
    assert entry["peak_memory_gb"] == {"sft": 0.8, "dpo": 0.85}
    run = load_run(folder / "spec.yaml")
    assert resolve_mfu(run).source == "calibration"
    tokens, _ = count_topic_tokens(run)
    t = time_cost(run, [x for x in tokens if x.topic == "cycle_basics"], "exact")["topics"][0]
    assert t["sft"]["hours"] * 3600 == pytest.approx(4.0) and t["dpo"]["hours"] * 3600 == pytest.approx(2.0)


def test_calibrate_command_and_bad_folder(tmp_path, tiny_dir):
    folder = _fake_run(tmp_path / "run", tiny_dir)
    env = {"MINDPRINT_CALIBRATION": str(tmp_path / "c.json")}
    r = run_cli("calibrate", str(folder), env=env)
    assert r.returncode == 0, r.stderr
    assert "cpu-2/fp32" in r.stdout and json.loads((tmp_path / "c.json").read_text())["entries"]["cpu-2/fp32"]
    bad = run_cli("calibrate", str(tmp_path), env=env)
    assert bad.returncode == 2 and "not a run folder" in bad.stderr
