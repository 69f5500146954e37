import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli


def plan_json(config: str, *overrides: str) -> dict:
    r = run_cli("plan", config, *overrides, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_plan_72b_qlora_8xh100_acceptance():
    p = plan_json("configs/qwen72b-qlora-8xh100.yaml")
    assert p["model"]["name"] == "qwen2.5-72b"
    assert p["model"]["total_params"] == 72_706_203_648
    assert p["model"]["layers"] == 80
    assert p["lora"]["strategy"] == "conservative"
    assert p["lora"]["trainable_params"] == 44_441_600
    zones = {z["name"]: z for z in p["lora"]["zones"]}
    assert zones["lexicon"]["layers"] == [0, 19] and zones["lexicon"]["modules"] == ["q_proj"]
    assert zones["reasoning"]["layers"] == [20, 59] and zones["voice"]["layers"] == [60, 79]
    assert sum(z["params"] for z in zones.values()) == 44_441_600
    mem = p["memory"]["per_device_gb"]
    assert abs(mem["base_weights"] - 41.2) / 41.2 < 0.01
    for key in ("lora_weights", "optimizer", "gradients", "activations", "overhead", "total"):
        assert mem[key] >= 0
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"), abs=0.01)
    assert p["memory"]["capacity_gb"] > 80 and p["memory"]["fits"] is True
    assert p["adapter"]["bf16_mb"] == 88.9 and p["adapter"]["fp32_mb"] == 177.8


def test_bf16_72b_needs_zero3_and_shards_weights():
    p = plan_json("configs/qwen72b-bf16-8xh100.yaml")
    assert p["memory"]["per_device_gb"]["base_weights"] == pytest.approx(145.41 / 8, rel=0.01)
    nozero = plan_json("configs/qwen72b-bf16-8xh100.yaml", "hardware.deepspeed=zero2")
    assert nozero["memory"]["fits"] is False
    assert any(r["fits"] for r in nozero["memory"]["remedies"])


def test_overrides_change_the_plan():
    p = plan_json("configs/qwen72b-qlora-8xh100.yaml", "lora.strategy=aggressive")
    assert p["lora"]["trainable_params"] == 210_534_400 and p["lora"]["rank"] == 16


def test_every_shipped_config_plans():
    for cfg in sorted((ROOT / "configs").glob("*.yaml")):
        r = run_cli("plan", str(cfg.relative_to(ROOT)), "--json")
        assert r.returncode == 0, (cfg, r.stderr)


def test_plan_text_output_shows_zone_table():
    r = run_cli("plan", "configs/qwen72b-mac-studio.yaml")
    assert r.returncode == 0, r.stderr
    for needle in ("lexicon", "reasoning", "voice", "44,441,600", "base_weights", "capacity"):
        assert needle in r.stdout


def test_plan_does_not_import_torch():
    code = (
        "import sys; from mindprint_ray.cli.app import main\n"
        "try:\n    main(['plan', 'configs/qwen72b-qlora-8xh100.yaml', '--json'])\n"
        "except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'ray', 'mlx', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
