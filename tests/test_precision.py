"""The precision rule (issue 15): bf16 mixed precision where the spec asks for it (sft.bf16) and the worker's device
computes bf16 natively, else fp32; one rule for both stages and DeepSpeed, and really what a TRL step runs. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from mindprint_ray.planning.run_plan import load_run

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"


def tiny_run(model_dir: Path, bf16: bool):
    data = ROOT / "data" / "curriculum"
    return load_run(TINY, [f"model.path={model_dir}", f"curriculum.data_dir={data}", f"sft.bf16={str(bf16).lower()}"])


@pytest.mark.parametrize("asked,native", [(True, True), (True, False), (False, True), (False, False)])
def test_bf16_only_where_asked_and_native_in_both_stages_and_deepspeed(tmp_path, asked, native):
    from mindprint_ray.backends.ray_torch.deepspeed_config import deepspeed_config
    from mindprint_ray.backends.ray_torch.precision import precision_name
    from mindprint_ray.backends.ray_torch.trainer_args import mixed_bf16, trainer_args

    spec = tiny_run(tmp_path, asked).spec
    expected = asked and native
    assert mixed_bf16(spec, native) is expected
    for stage in ("sft", "dpo"):
        assert trainer_args(spec, stage, str(tmp_path), False, None, native)["bf16"] is expected
    ds = deepspeed_config(2, bf16=mixed_bf16(spec, native))
    assert ds["bf16"]["enabled"] == ("auto" if expected else False) and ds["fp16"]["enabled"] is False
    assert precision_name(expected) == ("bf16 mixed" if expected else "fp32")


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(True, False, True), (False, True, True), (False, False, False)])
def test_a_cpu_is_native_bf16_by_its_own_cpuid_probes(monkeypatch, avx512_bf16, amx, expected):
    from mindprint_ray.backends.ray_torch.precision import native_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert native_bf16(False) is expected


def autocast_seen(model_dir: Path, tmp_path: Path, native: bool) -> set:
    """Train one real SFT step of the tiny zone model with the worker's arguments; the autocast state each forward
    of a decoder layer saw."""
    from datasets import Dataset
    from trl import SFTConfig

    from mindprint_ray.backends.ray_torch.model_loading import apply_zone_plan, load_base_model, load_tokenizer
    from mindprint_ray.backends.ray_torch.trainer_args import trainer_args
    from mindprint_ray.backends.ray_torch.trainers import sft_trainer_class

    run = tiny_run(model_dir, True)
    common = trainer_args(run.spec, "sft", str(tmp_path / f"sft-{native}"), False, None, native)
    common.update(save_strategy="no", report_to=[], max_steps=1)
    model = apply_zone_plan(load_base_model(run, "cpu")[0], run, False)
    rows = Dataset.from_list([{"input_ids": list(range(3, 40)), "assistant_masks": [0] * 5 + [1] * 32}] * 2)
    trainer = sft_trainer_class()(
        model=model,
        args=SFTConfig(**common, packing=False, assistant_only_loss=False),
        train_dataset=rows,
        processing_class=load_tokenizer(run),
    )
    seen = set()
    layer = model.get_base_model().model.layers[0]
    layer.register_forward_hook(
        lambda *_: seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    )
    trainer.train()
    assert seen, "the step never ran the decoder"
    return seen


def test_a_real_sft_step_runs_in_the_precision_the_rule_picks(tiny_model_dir, tmp_path):
    assert autocast_seen(tiny_model_dir, tmp_path, True) == {(True, torch.bfloat16)}
    assert all(not enabled for enabled, _ in autocast_seen(tiny_model_dir, tmp_path, False))
