"""The memory model's exact terms against real storage on CPU: bitsandbytes NF4 base weights, LoRA model states."""

from __future__ import annotations

import pytest

from mindprint_ray.planning.memory import MemoryInputs, base_weight_bytes, estimate_memory
from mindprint_ray.planning.registry import arch_from_hf_config
from mindprint_ray.planning.zones import build_plan

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = dict(
    model_type="qwen2",
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=4096,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


def _storage_bytes(tensors) -> int:
    """Bytes of distinct storages (shared quantization code tables counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _quant_state_tensors(state):
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    if getattr(state, "state2", None) is not None:
        yield from _quant_state_tensors(state.state2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG)).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("qwen2-small")
    model.save_pretrained(path)
    return path


def test_nf4_base_weights_match_bitsandbytes_storage(model_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb, device_map="cpu", dtype=torch.bfloat16
    )
    params = list(model.parameters())
    states = [
        t for p in params if getattr(p, "quant_state", None) is not None for t in _quant_state_tensors(p.quant_state)
    ]
    assert states, "no NF4 weights were created"
    measured = _storage_bytes(params + states)
    estimated = base_weight_bytes(arch_from_hf_config(CONFIG, "small", str(model_dir)), "nf4")
    assert abs(estimated - measured) / measured < 0.01, (estimated, measured)


def test_lora_model_states_match_peft_and_adamw(model_dir):
    """LoRA weights, their gradients and AdamW's moments after one real step, in fp32, against the estimate."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    arch = arch_from_hf_config(CONFIG, "small", str(model_dir))
    plan = build_plan(arch, "conservative", None, 8, 16, 0.0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(**plan.peft_kwargs())
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == plan.trainable_params()
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    measured = {
        "lora_weights": _storage_bytes(trainable),
        "gradients": _storage_bytes([p.grad for p in trainable]),
        "optimizer": _storage_bytes([v for s in optimizer.state.values() for k, v in s.items() if k != "step"]),
    }
    budget = estimate_memory(arch, MemoryInputs("bf16", "ray", plan.trainable_params(), 32, 1, False, 0, 1, False))
    for term, value in measured.items():
        estimate = getattr(budget, term) * 1e9
        assert abs(estimate - value) / value < 0.01, (term, estimate, value)
