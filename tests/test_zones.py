import re

import pytest

from mindprint_ray.errors import UserError
from mindprint_ray.planning.model_config import get_model_config, load_model_config
from mindprint_ray.planning.registry import get_arch
from mindprint_ray.planning.zones import build_plan


def spans(plan):
    return [(z.name, z.first, z.last, z.modules) for z in plan.zones]


def test_seed_zones_on_72b():
    plan = build_plan(get_arch("qwen-72b"))
    assert spans(plan) == [
        ("lexicon", 0, 19, ("q_proj",)),
        ("reasoning", 20, 59, ("v_proj", "up_proj", "down_proj")),
        ("voice", 60, 79, ("o_proj", "up_proj", "down_proj")),
    ]
    assert [z.params(plan.arch) for z in plan.zones] == [2_621_440, 27_115_520, 14_704_640]
    assert plan.trainable_params() == 44_441_600
    assert (plan.rank, plan.alpha, plan.dropout) == (8, 16, 0.05)


def test_aggressive_strategy_and_7b():
    assert build_plan(get_arch("qwen-72b"), "aggressive").trainable_params() == 210_534_400
    assert build_plan(get_arch("qwen-7b")).trainable_params() == 8_830_976
    agg = build_plan(get_arch("qwen-72b"), "aggressive")
    assert (agg.rank, agg.alpha) == (16, 32) and all(len(z.modules) == 7 for z in agg.zones)


def test_regex_matches_exactly_the_zone_modules():
    plan = build_plan(get_arch("qwen-72b"))
    regex = re.compile(plan.target_regex())
    names = [
        get_arch("qwen-72b").module_path(layer, m)
        for layer in range(80)
        for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ]
    matched = {n for n in names if regex.fullmatch(n)}
    assert matched == set(plan.module_paths())
    assert len(matched) == 20 * 1 + 40 * 3 + 20 * 3


def test_seed_api():
    cfg = get_model_config("qwen-72b")
    assert cfg.layers == 80
    assert len(cfg.get_layers_for_zone("lexicon")) == 20
    assert cfg.get_layers_for_zone("reasoning") == list(range(20, 60))
    cfg2 = load_model_config("configs/models/qwen_72b.yaml")
    assert cfg2.arch == cfg.arch and cfg2.plan.trainable_params() == 44_441_600


def test_model_yaml_files_match_registry():
    for file, name in [("qwen_7b", "qwen2.5-7b"), ("gemma_3_12b", "gemma-3-12b")]:
        assert load_model_config(f"configs/models/{file}.yaml").arch == get_arch(name)


@pytest.mark.parametrize(
    "zones,needle",
    [
        (
            [
                {"name": "a", "layers": [0, 10], "modules": ["q_proj"]},
                {"name": "b", "layers": [10, 20], "modules": ["v_proj"]},
            ],
            "overlap",
        ),
        ([{"name": "a", "layers": [70, 80], "modules": ["q_proj"]}], "outside"),
        ([{"name": "a", "layers": [0, 3], "modules": ["qkv_proj"]}], "unknown module 'qkv_proj'"),
        ([{"name": "a", "layers": [5, 3], "modules": ["q_proj"]}], "outside"),
    ],
)
def test_bad_zones(zones, needle):
    with pytest.raises(UserError) as e:
        build_plan(get_arch("qwen-72b"), zones=zones)
    assert needle in str(e.value)


def test_per_zone_rank_renders_rank_pattern():
    zones = [
        {"name": "lexicon", "layers": [0, 19], "modules": ["q_proj"]},
        {"name": "voice", "layers": [60, 79], "modules": ["o_proj"], "rank": 16},
    ]
    plan = build_plan(get_arch("qwen-72b"), zones=zones)
    kw = plan.peft_kwargs()
    assert list(kw["rank_pattern"].values()) == [16] and list(kw["alpha_pattern"].values()) == [32]
    assert plan.zones[1].params(plan.arch) == 20 * 16 * (8192 + 8192)


def _peft_trainable(arch_name: str, plan, explicit: bool = False) -> int:
    """Count trainable params with PEFT itself on a meta-device model (no memory)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    a = get_arch(arch_name)
    cfg = Qwen2Config(
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads,
        tie_word_embeddings=a.tie_embeddings,
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == a.total_params()
    peft_model = get_peft_model(model, LoraConfig(**plan.peft_kwargs(explicit_list=explicit)))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_plan_count_matches_peft_on_meta_72b():
    plan = build_plan(get_arch("qwen-72b"))
    assert _peft_trainable("qwen-72b", plan) == 44_441_600
    assert _peft_trainable("qwen-72b", plan, explicit=True) == 44_441_600


def test_per_zone_rank_count_matches_peft():
    zones = [
        {"name": "lexicon", "fraction": [0, 0.25], "modules": ["q_proj"], "rank": 4},
        {"name": "voice", "fraction": [0.75, 1.0], "modules": ["o_proj", "down_proj"], "rank": 16},
    ]
    plan = build_plan(get_arch("qwen-7b"), zones=zones)
    assert _peft_trainable("qwen-7b", plan) == plan.trainable_params()
