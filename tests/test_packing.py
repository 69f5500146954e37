"""Packed sequences must not see each other: padding-free packing with position_ids, SDPA, no cache."""

import pytest


def segment_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequences_do_not_see_each_other(tiny_model_dir, attn):
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    model.config.use_cache = False
    a, b = list(range(5, 30)), list(range(40, 52))
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": a + b, "seq_lengths": [len(a), len(b)]}])
    assert batch["position_ids"][0].tolist() == list(range(len(a))) + list(range(len(b)))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    alone_b = segment_logits(model, b)
    assert torch.allclose(packed[: len(a)], segment_logits(model, a), atol=1e-5)
    assert torch.allclose(packed[len(a) :], alone_b, atol=1e-5)
    # the same tokens without position_ids attend across the boundary: the check above can fail
    with torch.no_grad():
        naive = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(naive[len(a) :], alone_b, atol=1e-3)


def test_worker_loads_models_with_cache_off(tiny_model_dir):
    from mindprint_ray.backends.ray_torch.model_loading import load_base_model
    from mindprint_ray.planning.run_plan import load_run

    run = load_run("configs/tiny-cpu.yaml", [f"model.path={tiny_model_dir}"])
    model, attn = load_base_model(run, "cpu")
    assert model.config.use_cache is False and attn == "sdpa"
