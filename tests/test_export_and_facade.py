"""Export (adapter copy, merged BF16/FP32 model) and the seed's Python facade."""

import pytest
from conftest import run_cli

from mindprint_ray.errors import UserError
from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.runs.run_folder import RunFolder


def fake_run(tmp_path, tiny_model_dir, quant: str):
    """A run folder with one finished topic whose adapter has random non-zero lora_B."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mindprint_ray.backends.ray_torch.model_loading import load_base_model

    run = load_run("configs/tiny-cpu.yaml", [f"model.path={tiny_model_dir}", f"quantization.mode={quant}"])
    folder = RunFolder(tmp_path / "run")
    folder.claim(run.spec.dump())
    base, _ = load_base_model(run, "cpu")
    model = get_peft_model(base, LoraConfig(**run.zones.peft_kwargs()))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    staging = folder.staging_dir("accumulation")
    model.save_pretrained(staging)
    folder.publish_adapter("accumulation", staging, {"topic": "accumulation"})
    return run, folder, model


@pytest.mark.parametrize("quant", ["fp32", "nf4"])
def test_merged_logits_equal_base_plus_adapter(tmp_path, tiny_model_dir, quant):
    import torch
    from transformers import AutoModelForCausalLM

    run, folder, peft_model = fake_run(tmp_path, tiny_model_dir, quant)
    out = tmp_path / "merged"
    r = run_cli("export", str(folder.root), "--topic", "accumulation", "--merge", "--out", str(out))
    assert r.returncode == 0, r.stderr
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 120, 340, 560, 780, 2]])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits.float()
        got = merged(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits.float()
    error, effect = (got - expected).abs().max(), (expected - plain).abs().max()
    if quant == "fp32":
        assert error < 1e-4
    else:  # NF4: both sides compute in bf16 (about 3 significant digits on logits of magnitude ~4)
        assert error < 0.1
    assert error < 0.1 * effect  # the merged model is base + adapter, not the base
    assert not any("lora" in name for name, _ in merged.named_parameters())  # merged in: no LoRA layers left


def test_export_copies_the_adapter_and_rejects_unknown_topics(tmp_path, tiny_model_dir):
    _, folder, _ = fake_run(tmp_path, tiny_model_dir, "fp32")
    r = run_cli("export", str(folder.root), "--topic", "accumulation", "--out", str(tmp_path / "a"))
    assert r.returncode == 0 and (tmp_path / "a" / "adapter_model.safetensors").is_file()
    r = run_cli("export", str(folder.root), "--topic", "nope")
    assert r.returncode == 2 and "finished topics: accumulation" in r.stderr


def test_facade_backends_generate(tiny_model_dir):
    from mindprint_ray import create_backend

    for kind in ("pytorch", "mlx"):
        model = create_backend(kind, device="cpu").load_model(str(tiny_model_dir))
        text = model.generate("What is a cycle low?", max_length=12)
        assert isinstance(text, str) and text.strip()
    with pytest.raises(UserError, match="unknown backend 'tpu'"):
        create_backend("tpu")


def test_facade_pipeline_spec_uses_the_model_config_zones(tmp_path):
    from mindprint_ray import DPOPipeline, PipelineConfig, get_model_config

    pipe = DPOPipeline(get_model_config("qwen-72b"), PipelineConfig(sft_learning_rate=1e-4))
    spec = pipe.spec_dict(["a"], "data/x", str(tmp_path), "n")
    assert spec["sft"]["learning_rate"] == 1e-4 and spec["quantization"]["mode"] == "nf4"
    assert [z["layers"] for z in spec["lora"]["zones"]] == [[0, 19], [20, 59], [60, 79]]
