"""The tiny model is a standard HF folder that transformers and mlx-lm both load, built deterministically."""

import hashlib
from pathlib import Path

from conftest import SAMPLE_DATA

from mindprint_ray.planning.registry import get_arch


def test_loads_in_transformers_with_registry_param_count(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert sum(p.numel() for p in model.parameters()) == get_arch("tiny").total_params()
    assert (tiny_model_dir / "model.safetensors").stat().st_size < 5_000_000


def test_chat_template_round_trips_and_stops_at_im_end(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "user", "content": "What is a cycle low?"},
        {"role": "assistant", "content": "I think it is the lowest point."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|im_start|>assistant\nI think it is the lowest point.<|im_end|>\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE round-trips exactly
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") in ids
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_generation_stops_at_end_of_turn(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id

    class EndOfTurnHead(torch.nn.Module):  # a head that always prefers <|im_end|>
        def forward(self, hidden):
            logits = torch.zeros(*hidden.shape[:-1], model.config.vocab_size)
            logits[..., im_end] = 10.0
            return logits

    model.lm_head = EndOfTurnHead()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    assert new == [im_end]


def test_loads_in_mlx(tiny_model_dir):
    from mlx_lm.utils import load_model

    model, config = load_model(Path(tiny_model_dir))
    assert config["model_type"] == "qwen2" and len(model.layers) == get_arch("tiny").num_layers


def test_build_is_deterministic(tmp_path):
    from mindprint_ray.models.tiny import write_tiny_model

    # two builds of a short warm-up (the same code as the default 300 steps, a tenth of the time), byte for byte
    once, again = (write_tiny_model(tmp_path / name, SAMPLE_DATA, pretrain_steps=20) for name in ("once", "again"))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        a, b = (hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (once, again))
        assert a == b, name
