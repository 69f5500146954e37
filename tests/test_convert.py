"""PEFT <-> MLX adapter conversion: the tiny model in torch+PEFT and in MLX gives the same logits both ways."""

import json

import numpy as np
import pytest
from conftest import run_cli

from mindprint_ray.errors import UserError
from mindprint_ray.planning.registry import get_arch
from mindprint_ray.planning.zones import build_plan
from mindprint_ray.runs.adapter_format import convert, read_mlx

TOKENS = [1, 85, 91, 303, 71, 79, 201, 1181, 428, 223, 17, 640, 52, 9, 310]
MIXED_ZONES = [  # different rank and alpha per zone, so the conversion must pad, fold and restore
    {"name": "lexicon", "layers": [0, 1], "modules": ["q_proj"], "rank": 4, "alpha": 12},
    {"name": "reasoning", "layers": [2, 5], "modules": ["v_proj", "up_proj", "down_proj"]},
    {"name": "voice", "layers": [6, 7], "modules": ["o_proj", "up_proj", "down_proj"], "rank": 16, "alpha": 8},
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir


def peft_adapter(tiny, out, zones, use_rslora):
    """A PEFT adapter from the zone plan with random (non-zero) lora_B, and the torch logits with and without it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plan = build_plan(get_arch("tiny"), "conservative", zones, 8, 16, 0.0, use_rslora)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        base = model(ids).logits[0].numpy()
    peft_model = get_peft_model(model, LoraConfig(**plan.peft_kwargs(), init_lora_weights=False))
    with torch.no_grad():
        adapted = peft_model(ids).logits[0].numpy()
    peft_model.save_pretrained(out)
    return plan, base, adapted


def mlx_logits(tiny, adapter_dir):
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(tiny)
    load_adapters(model, str(adapter_dir))  # mlx-lm's own loader: proves the folder is a valid mlx-lm adapter
    return np.array(model(mx.array([TOKENS]))[0])


def torch_logits(tiny, adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), adapter_dir)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


@pytest.mark.parametrize("zones,use_rslora", [(None, False), (MIXED_ZONES, True)], ids=["uniform", "per-zone-rslora"])
def test_round_trip_matches_logits(tiny, tmp_path, zones, use_rslora):
    plan, base, adapted = peft_adapter(tiny, tmp_path / "peft", zones, use_rslora)
    assert np.abs(adapted - base).max() > 1e-2  # the adapter really changes the model

    result = run_cli("convert", "--to", "mlx", str(tmp_path / "peft"), str(tmp_path / "mlx"))
    assert result.returncode == 0, result.stderr
    assert np.abs(mlx_logits(tiny, tmp_path / "mlx") - adapted).max() < 1e-4

    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert sorted(config["lora_parameters"]["keys"]) == sorted(plan.module_paths())
    assert config["lora_parameters"]["rank"] == max(z.rank for z in plan.zones)

    convert(tmp_path / "mlx", tmp_path / "back", "peft")
    assert np.abs(torch_logits(tiny, tmp_path / "back") - adapted).max() < 1e-4
    back = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert back["use_rslora"] is use_rslora
    from safetensors.numpy import load_file

    original = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    restored = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert original.keys() == restored.keys()  # native per-zone ranks restored, not padded
    for key, value in original.items():
        assert np.allclose(value, restored[key], atol=1e-6), key


def test_per_zone_ranks_are_padded_exactly(tiny, tmp_path):
    peft_adapter(tiny, tmp_path / "peft", MIXED_ZONES, False)
    convert(tmp_path / "peft", tmp_path / "mlx", "mlx")
    adapter = read_mlx(tmp_path / "mlx")
    assert sorted(g.rank for g in adapter.groups) == [4, 8, 16]
    lexicon = "model.layers.0.self_attn.q_proj"
    assert adapter.a[lexicon].shape == (64, 4)


def test_refuses_dora_and_same_format(tiny, tmp_path):
    peft_adapter(tiny, tmp_path / "peft", None, False)
    with pytest.raises(UserError, match="already in peft"):
        convert(tmp_path / "peft", tmp_path / "x", "peft")
    config = tmp_path / "peft" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": True}))
    result = run_cli("convert", "--to", "mlx", str(tmp_path / "peft"), str(tmp_path / "y"))
    assert result.returncode == 2 and "DoRA" in result.stderr and "Traceback" not in result.stderr


def test_missing_source_is_a_user_error(tmp_path):
    result = run_cli("convert", "--to", "mlx", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert result.returncode == 2 and "holds no" in result.stderr
