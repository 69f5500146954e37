"""Bad input to plan/report exits 2 with one message; a plan that does not fit names its remedies."""

from __future__ import annotations

import json

from conftest import run_cli

QLORA = "configs/qwen72b-qlora-8xh100.yaml"


def test_price_file_with_a_missing_field(tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text("prices:\n  aws-p5.48xlarge:\n    on_demand: 50\n    spot: 20\n    source: me\n")
    r = run_cli("report", QLORA, "--prices", str(prices), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "missing field 'date'" in r.stderr and "prices.aws-p5.48xlarge.date" in r.stderr


def test_unknown_profile_in_the_spec():
    r = run_cli("plan", QLORA, "hardware.profile=tpu-v9")
    assert r.returncode == 2 and "unknown hardware profile 'tpu-v9'" in r.stderr


def test_sequence_length_above_the_context():
    r = run_cli("report", QLORA, "sft.max_seq_length=65536", "--out", "/nonexistent")
    assert r.returncode == 2 and "above qwen2.5-72b's context of 32768" in r.stderr


def test_mac_plan_does_not_fit_and_names_remedies_with_numbers():
    r = run_cli("plan", "configs/qwen72b-mac-studio.yaml", "--json")
    assert r.returncode == 0, r.stderr
    mem = json.loads(r.stdout)["memory"]
    assert mem["fits"] is False
    names = [x["remedy"] for x in mem["remedies"]]
    assert any("max_seq_length" in n for n in names) and any("iogpu.wired_limit_mb" in n for n in names)
    assert any(x["fits"] for x in mem["remedies"])
    assert all(x["total_gb"] > 40 for x in mem["remedies"])  # the 4-bit base alone is ~41 GB


def test_plan_shows_time_and_cost(tmp_path):
    env = {"MINDPRINT_CALIBRATION": str(tmp_path / "none.json")}
    r = run_cli("plan", QLORA, env=env)
    assert r.returncode == 0, r.stderr
    assert "time and cost per topic" in r.stdout and "curriculum" in r.stdout and "$55.04/h" in r.stdout
    p = json.loads(run_cli("plan", QLORA, "--json", env=env).stdout)["time"]
    assert p["mfu"]["source"] == "profile" and p["price"]["previous_list_price"] == 98.32
    assert len(p["topics"]) == 10 and p["cost_usd"] > 0
