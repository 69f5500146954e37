"""The spec documents itself: every section and field described, `mindprint-ray schema`, and the model-config and
hardware/price YAML validated by pydantic like the spec (file, line, key and hint in every error)."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields

import pytest
from conftest import run_cli
from pydantic import BaseModel

from mindprint_ray.errors import UserError
from mindprint_ray.planning import hardware
from mindprint_ray.planning.hardware import HardwareFile, PriceFile
from mindprint_ray.planning.model_config import ArchitectureFields, ModelConfigFile, load_model_config
from mindprint_ray.planning.registry import ModelArch
from mindprint_ray.spec.run_spec import RunSpec, load_spec

QLORA = "configs/qwen72b-qlora-8xh100.yaml"


def undocumented(model: type[BaseModel]) -> list[str]:
    """Every section (model) without a docstring and every field without a description, in `model`'s schema."""
    schema = model.model_json_schema()
    sections = {model.__name__: schema, **schema.get("$defs", {})}
    missing = []
    for name, section in sections.items():
        if not section.get("description"):
            missing.append(f"{name} (docstring)")
        missing += [f"{name}.{f}" for f, prop in section.get("properties", {}).items() if not prop.get("description")]
    return missing


@pytest.mark.parametrize("model", [RunSpec, ModelConfigFile, HardwareFile, PriceFile])
def test_every_section_and_field_is_documented(model):
    assert undocumented(model) == []


def test_architecture_fields_are_the_registry_dataclass_fields():
    assert set(ArchitectureFields.model_fields) == {f.name for f in fields(ModelArch)} - {"name", "aliases"}


def test_schema_command_prints_the_run_spec_schema(tmp_path):
    r = run_cli("schema")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    assert set(RunSpec.model_fields) <= set(schema["properties"])
    for section in ("model", "lora", "quantization", "sft", "dpo", "curriculum", "hardware", "storage", "ray", "eval"):
        assert schema["properties"][section]["description"], section
    assert "per device" in schema["$defs"]["SFTSection"]["properties"]["batch_size"]["description"]
    assert schema == RunSpec.model_json_schema()
    out = tmp_path / "run-spec.schema.json"
    r = run_cli("schema", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == schema


def test_unknown_key_under_a_mapping_gets_a_did_you_mean(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        "name: s\ncurriculum: {topics: [a]}\ntune:\n  space:\n    sft.learning_rate:\n      valuse: [1e-4]\n"
    )
    with pytest.raises(UserError) as e:
        load_spec(spec)
    assert (e.value.line, e.value.field) == (6, "tune.space.sft.learning_rate.valuse")
    assert e.value.hint == "did you mean 'values'?"


# ---- model configs (configs/models/*.yaml) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,line,field,needle",
    [
        ("name: qwen-7b\nhf_path: [a, b]\n", 2, "hf_path", "valid string"),
        ("name: qwen-7b\narchitecture:\n  qkv_bias: 1\n", 3, "architecture.qkv_bias", "valid boolean"),
        ("name: qwen-7b\nlora:\n  strategy: aggressive\n  rank: 0\n", 4, "lora.rank", "greater than or equal to 1"),
        ("name: qwen-7b\narchitecture:\n  hiden_size: 8\n", 3, "architecture.hiden_size", "unknown key 'hiden_size'"),
        (
            "name: qwen-7b\nlora:\n  zones:\n    - {name: a, layers: [0, 3], modules: [q_proj], rnk: 2}\n",
            4,
            "lora.zones[0].rnk",
            "unknown key 'rnk'",
        ),
        ("name: qwen-7b\nzones: []\n", 2, "zones", "unknown key 'zones'"),
    ],
)
def test_bad_model_config_names_file_line_and_key(tmp_path, text, line, field, needle):
    f = tmp_path / "model.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=needle) as e:
        load_model_config(f)
    assert (e.value.file, e.value.line, e.value.field) == (str(f), line, field)
    assert e.value.hint


def test_shipped_model_configs_still_load():
    for name in ("qwen_7b", "qwen_72b", "gemma_3_12b"):
        assert load_model_config(f"configs/models/{name}.yaml").plan.trainable_params() > 0


# ---- hardware profiles and prices (mindprint_ray/planning/catalog/*.yaml) --------------------------------------


@pytest.mark.parametrize(
    "entry,field,needle",
    [
        ("    previous_list_note: [a, list]\n", "prices.aws-p5.48xlarge.previous_list_note", "valid string"),
        ("    on_demand_usd: 50\n", "prices.aws-p5.48xlarge.on_demand_usd", "unknown key 'on_demand_usd'"),
        ("    spto_source: estimate\n", "prices.aws-p5.48xlarge.spto_source", "did you mean 'spot_source'"),
    ],
)
def test_bad_price_file_exits_2_naming_file_line_and_key(tmp_path, entry, field, needle):
    prices = tmp_path / "prices.yaml"
    prices.write_text(
        "prices:\n  aws-p5.48xlarge:\n    on_demand: 50\n    spot: 20\n    source: me\n    date: '2026-11'\n" + entry
    )
    r = run_cli("report", QLORA, "--prices", str(prices), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{prices}:7: field '{field}'" in r.stderr and needle in r.stderr and "hint:" in r.stderr, r.stderr


@pytest.fixture
def catalog(tmp_path, monkeypatch):
    """A copy of the shipped catalog that load_profiles reads instead (caches cleared before and after)."""
    for name in ("hardware.yaml", "prices.yaml"):
        shutil.copy(hardware.DATA / name, tmp_path / name)
    monkeypatch.setattr(hardware, "DATA", tmp_path)
    hardware.load_profiles.cache_clear()
    hardware.load_prices.cache_clear()
    yield tmp_path / "hardware.yaml"
    hardware.load_profiles.cache_clear()
    hardware.load_prices.cache_clear()


@pytest.mark.parametrize(
    "old,new,field,needle",
    [
        ("    devices: 8\n", "    devices: eight\n", "profiles.8xh100-80gb.devices", "valid integer"),
        ("    use_gpu: true\n", "    use_gpu: 'yes'\n", "profiles.8xh100-80gb.use_gpu", "valid boolean"),
        ("    devices: 8\n", "    devices: 8\n    gpus: 8\n", "profiles.8xh100-80gb.gpus", "unknown key 'gpus'"),
        ("mfu: {nf4: 0.25,", "mfu: {int4: 0.25,", "profiles.8xh100-80gb.mfu.int4", "'nf4', 'bf16' or 'fp32'"),
    ],
)
def test_bad_hardware_profile_names_file_line_and_key(catalog, old, new, field, needle):
    text = catalog.read_text()
    catalog.write_text(text.replace(old, new, 1))
    line = text[: text.index(old)].count("\n") + 1 + new[: new.index(field.split(".")[-1])].count("\n")
    with pytest.raises(UserError, match=needle) as e:
        hardware.load_profiles()
    assert (e.value.file, e.value.line, e.value.field) == (str(catalog), line, field)
    assert e.value.hint


def test_shipped_catalog_loads_with_the_same_values():
    hardware.load_profiles.cache_clear()
    profile = hardware.load_profiles()["mac-studio-m2-ultra-64gb"]
    assert (profile.backend, profile.devices, profile.wired_limit_fraction) == ("mlx", 1, 0.75)
    assert profile.mfu == {"nf4": 0.20, "bf16": 0.30} and profile.capacity_gb == 48.0
    p5 = hardware.load_prices()["aws-p5.48xlarge"]
    assert (p5.on_demand, p5.previous_list_price, p5.date) == (55.04, 98.32, "2026-11")
