import pytest

from mindprint_ray.errors import UserError
from mindprint_ray.planning.registry import get_arch


@pytest.mark.parametrize(
    "name,total",
    [
        ("qwen2.5-72b", 72_706_203_648),
        ("qwen-72b", 72_706_203_648),
        ("qwen2.5-7b", 7_615_616_512),
        ("qwen-7b", 7_615_616_512),
        ("qwen2.5-0.5b", 494_032_768),
    ],
)
def test_exact_parameter_counts(name, total):
    assert get_arch(name).total_params() == total


def test_72b_architecture_fields():
    a = get_arch("qwen-72b")
    assert (
        a.hidden_size,
        a.intermediate_size,
        a.num_layers,
        a.num_heads,
        a.num_kv_heads,
        a.head_dim,
        a.vocab_size,
        a.tie_embeddings,
        a.qkv_bias,
    ) == (8192, 29568, 80, 64, 8, 128, 152064, False, True)
    assert a.hf_path == "Qwen/Qwen2.5-72B-Instruct"
    assert a.eos_token == "<|im_end|>"


def test_gemma_text_model_counts_qk_norm_and_four_norms():
    g = get_arch("gemma-3-12b")
    per_layer = g.linear_params_per_layer() + 4 * 3840 + 2 * 256
    assert g.total_params() == 48 * per_layer + 262208 * 3840 + 3840


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError) as e:
        get_arch("llama-9000")
    assert "known models" in str(e.value)
