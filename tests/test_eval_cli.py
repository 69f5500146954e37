"""`mindprint-ray eval` and `generate` on a PEFT adapter over the tiny model, and the MLX refusal."""

from __future__ import annotations

import json

import pytest
from conftest import make_data, make_spec

from mindprint_ray.cli.app import main


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A PEFT LoRA adapter on the tiny model with random, non-zero lora_B (so it changes the model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    out = tmp_path_factory.mktemp("adapter") / "alpha"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def spec_path(tmp_path, tiny_model_dir):
    data = make_data(tmp_path / "data", topics=("alpha",), n=2)
    return make_spec(
        tmp_path / "run.yaml",
        data,
        topics=("alpha",),
        model={"path": str(tiny_model_dir)},
        quantization={"mode": "fp32"},
        eval={"max_new_tokens": 16},
    )


def test_eval_and_generate_with_a_peft_adapter(spec_path, adapter, tmp_path, capsys):
    out = tmp_path / "scores.json"
    main(["eval", str(spec_path), "--adapter", str(adapter), "--topics", "alpha", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "alpha" in printed and "voice fidelity" in printed
    result = json.loads(out.read_text())["topics"]["alpha"]
    assert result["scores"]["n"] == 2 and len(result["answers"]) == 2
    assert all(0 <= result["scores"][k] <= 1 for k in ("voice_fidelity", "accuracy", "semantic", "preference"))
    main(["generate", str(spec_path), "--adapter", str(adapter), "What confirms a cycle low?"])
    assert capsys.readouterr().out.strip()


def test_mlx_adapter_points_to_local_mlx(spec_path, tmp_path, capsys):
    mlx = tmp_path / "mlx-adapter"
    mlx.mkdir()
    (mlx / "adapters.safetensors").write_bytes(b"")
    (mlx / "adapter_config.json").write_text('{"fine_tune_type": "lora"}')
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(spec_path), "--adapter", str(mlx), "hi"])
    assert exit_info.value.code == 2
    assert "python -m local_mlx generate" in capsys.readouterr().err
