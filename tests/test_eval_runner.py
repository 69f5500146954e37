"""The model side of evaluation on the tiny model: MC scoring, preference, generation, state restore."""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLE_DATA

from mindprint_ray.backends.ray_torch import eval_runner as r
from mindprint_ray.backends.ray_torch.eval_runner import evaluate_topics
from mindprint_ray.curriculum.topics import load_general_text, load_persona, load_topic, pair_id
from mindprint_ray.spec.run_spec import RunSpec


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, tokenizer


def manual_mean_logprob(model, tokenizer, question: str, option: str) -> float:
    """Unbatched, unpadded log-likelihood of `option` after the chat-templated question, per token."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    cont = tokenizer(option, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + cont])).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(cont)) / len(cont)


def test_chat_template_round_trips_and_ends_turns_with_im_end(tiny):
    _, tokenizer = tiny
    conv = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
    ]
    text = tokenizer.apply_chat_template(conv, tokenize=False)
    assert (
        text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"
    )
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert r.end_of_turn_ids(tokenizer)[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_mc_scoring_matches_a_manual_log_likelihood(tiny):
    model, tokenizer = tiny
    item = {
        "question": "Roughly how long does a daily cycle run from low to low?",
        "choices": ["5 to 10 trading days", "18 to 28 trading days", "20 to 26 weeks", "3.5 to 4.5 years"],
    }
    manual = [manual_mean_logprob(model, tokenizer, item["question"], c) for c in item["choices"]]
    prompt = r.prompt_ids(tokenizer, r.chat_messages(item["question"], None))
    with torch.no_grad():
        batched = r.continuation_logprobs(
            model, tokenizer, [(prompt, tokenizer(c, add_special_tokens=False)["input_ids"]) for c in item["choices"]]
        )
    assert [s / n for s, n in batched] == pytest.approx(manual, abs=1e-4)  # padding does not change scores
    with torch.no_grad():
        assert r.mc_predictions(model, tokenizer, [item], None) == [max(range(4), key=manual.__getitem__)]


def test_mc_and_preference_pick_what_the_model_says(tiny):
    model, tokenizer = tiny
    question = "What is a cycle low?"
    with r.inference_mode(model, tokenizer):
        own = r.generate_answers(model, tokenizer, [question], None, 24)[0]
        gibberish = "Sandwich purple the of quickly seven marble."
        item = {"question": question, "choices": [gibberish, own]}
        assert r.mc_predictions(model, tokenizer, [item], None) == [1]
        pair = {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": own}],
            "rejected": [{"role": "assistant", "content": gibberish}],
        }
        swapped = {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]}
        assert r.preference_wins(model, tokenizer, [pair, swapped], None) == [True, False]


def test_generation_stops_at_im_end(tiny):
    model, tokenizer = tiny
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with r.inference_mode(model, tokenizer):
        ids = r.generate_ids(model, tokenizer, [r.chat_messages("What is a cycle low?", None)], 200)[0]
        text = r.generate_answers(model, tokenizer, ["What is a cycle low?"], None, 200)[0]
    assert ids[-1] == im_end and im_end not in ids[:-1] and len(ids) < 200
    assert "<|im_end|>" not in text and text == tokenizer.decode(ids[:-1]).strip()


def test_evaluate_topics_restores_a_training_peft_model(tiny):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = tiny
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.config.use_cache = False
    spec = RunSpec.model_validate(
        {
            "curriculum": {"data_dir": str(SAMPLE_DATA), "topics": ["cycle_basics"]},
            "eval": {"max_new_tokens": 48, "max_examples": 6},
        }
    )
    topic = load_topic(SAMPLE_DATA, "cycle_basics", ["sft", "dpo", "eval"])
    try:
        out = evaluate_topics(model, tokenizer, [topic], load_persona(SAMPLE_DATA / "persona.yaml"), spec, "base")
        assert model.training and model.config.use_cache is False and tokenizer.padding_side == "right"
    finally:
        model.unload()
    scores = out["cycle_basics"]
    for key in (
        "voice_fidelity",
        "accuracy",
        "markers",
        "lexicon",
        "semantic",
        "preference",
        "mc_accuracy",
        "key_fact_recall",
    ):
        assert 0.0 <= scores[key] <= 1.0, key
    assert scores["n"] == 12 and scores["n_open"] == 6 and scores["n_mc"] == 6 and scores["n_pairs"] == 6
    assert scores["n_pairs_heldout"] == len(topic.dpo_heldout) == 7 and scores["n_pairs_train"] == 21
    held = {pair_id(r.data["prompt"]) for r in topic.dpo_heldout}
    assert set(scores["items"]["pairs"]) <= held and len(scores["items"]["open"]) == 6  # preference: held-out only
    w = spec.eval.weights
    assert scores["voice_fidelity"] == pytest.approx(sum(w[k] * scores[k] for k in w) / sum(w.values()))
    assert scores["accuracy"] == pytest.approx((scores["mc_accuracy"] + scores["key_fact_recall"]) / 2)
    for key in (
        "voice_fidelity",
        "accuracy",
        "markers",
        "lexicon",
        "semantic",
        "preference",
        "mc_accuracy",
        "key_fact_recall",
        "general_ppl",
    ):
        lo, hi = scores[f"{key}_ci"]
        assert lo <= scores[key] <= hi, key
    assert scores["general_ppl"] > 1.0 and scores["n_general"] >= 15


def test_general_text_perplexity_matches_a_manual_log_likelihood(tiny):
    from mindprint_ray.evaluation import metrics as m

    model, tokenizer = tiny
    spec = RunSpec.model_validate({"curriculum": {"data_dir": str(SAMPLE_DATA), "topics": ["cycle_basics"]}})
    items = load_general_text(spec.general_text_path)
    with r.inference_mode(model, tokenizer):
        scored = r.general_logprobs(model, tokenizer, items, None)
        whole = r.general_ability(model, tokenizer, spec)
    manual = [manual_mean_logprob(model, tokenizer, d["question"], d["answer"] + "<|im_end|>") for d in items[:3]]
    assert [s / n for s, n in scored[:3]] == pytest.approx(manual, abs=1e-4)  # answer + end-of-turn, chat prompt
    assert whole["general_ppl"] == pytest.approx(m.perplexity(scored)) and whole["n_general"] == len(items)
    assert whole["general_ppl_ci"][0] <= whole["general_ppl"] <= whole["general_ppl_ci"][1]
    off = RunSpec.model_validate(
        {"curriculum": {"topics": ["cycle_basics"]}, "eval": {"max_general_ppl_increase": None}}
    )
    assert r.general_ability(model, tokenizer, off) == {}
