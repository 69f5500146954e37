"""Model-side evaluation (torch): option log-likelihoods, greedy chat generation, per-topic scores.

`evaluate_topics` is what the training worker calls on rank 0 between stages; it leaves the model in the
mode it found it (train/eval, KV cache flag, tokenizer padding side)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mindprint_ray.backends.ray_torch.model_loading import load_base_model, load_tokenizer
from mindprint_ray.backends.ray_torch.semantic import similarities
from mindprint_ray.curriculum.chat_template import TemplateError, end_of_turn_token, hf_renderer, with_system
from mindprint_ray.curriculum.topics import load_general_text, pair_id
from mindprint_ray.errors import UserError
from mindprint_ray.evaluation import metrics as m
from mindprint_ray.report.numbers import with_interval
from mindprint_ray.runs.adapter_format import check_adapter_folder

log = logging.getLogger("mindprint_ray")
# spec.eval.max_examples caps the items of each kind per topic (configs/tiny-*.yaml set 6); unset: all items


@dataclass
class TopicEval:
    """One topic's scores plus the generated answers behind them."""

    topic: str
    scores: dict
    answers: list[dict] = field(default_factory=list)


# ---- model state ----------------------------------------------------------------------------------


def _configs(model) -> list:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [c for c in {id(x): x for x in (getattr(model, "config", None), base.config)}.values() if c is not None]


@contextlib.contextmanager
def inference_mode(model, tokenizer) -> Iterator[None]:
    """Eval mode, KV cache on, no grad, a pad token; restores train mode, cache flag and tokenizer afterwards."""
    import torch

    training, side, pad = model.training, tokenizer.padding_side, tokenizer.pad_token
    configs = _configs(model)
    caches = [getattr(c, "use_cache", None) for c in configs]
    model.eval()
    for c in configs:
        c.use_cache = True
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)
        for c, cache in zip(configs, caches):
            c.use_cache = cache
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def device_of(model):
    return next(model.parameters()).device


# ---- prompts and tokens ----------------------------------------------------------------------------


chat_messages = with_system  # user text or messages, with the system prompt first (as in training)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat template applied to `messages`, ending with the assistant header."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>, <end_of_turn>, ...),
    found by rendering one, followed by the tokenizer's EOS."""
    ids = []
    try:
        ids.append(
            tokenizer.convert_tokens_to_ids(end_of_turn_token(hf_renderer(tokenizer), tokenizer.all_special_tokens))
        )
    except (TemplateError, ValueError):
        pass  # no template, or one whose turns end without a special token: EOS alone
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer has no end-of-turn or EOS token; generation could not stop")
    return ids


# ---- log-likelihood scoring -------------------------------------------------------------------------


def continuation_logprobs(
    model, tokenizer, items: list[tuple[list[int], list[int]]], batch_size: int = 8
) -> list[tuple[float, int]]:
    """(sum of log-probs, token count) of each continuation given its prompt, right-padded batches."""
    out: list[tuple[float, int]] = []
    for start in range(0, len(items), batch_size):
        out += _score_batch(model, tokenizer, items[start : start + batch_size])
    return out


def _score_batch(model, tokenizer, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
    import torch

    width = max(len(p) + len(c) for p, c in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (p, c) in enumerate(batch):
        ids[row, : len(p) + len(c)] = torch.tensor(p + c)
        mask[row, : len(p) + len(c)] = 1
    device = device_of(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    out = []
    for row, (p, c) in enumerate(batch):
        if not c:
            out.append((0.0, 0))
            continue
        step = torch.log_softmax(logits[row, len(p) - 1 : len(p) + len(c) - 1].float(), dim=-1)
        target = torch.tensor(c, device=step.device).unsqueeze(1)
        out.append((float(step.gather(1, target).sum()), len(c)))
    return out


def mc_predictions(model, tokenizer, items: list[dict], system_prompt: str | None) -> list[int]:
    """For each multiple-choice item, the index of the option with the highest mean token log-prob."""
    pairs, owners = [], []
    for i, item in enumerate(items):
        prompt = prompt_ids(tokenizer, chat_messages(item["question"], system_prompt))
        for j, choice in enumerate(item["choices"]):
            pairs.append((prompt, tokenizer(choice, add_special_tokens=False)["input_ids"]))
            owners.append((i, j))
    best: dict[int, tuple[float, int]] = {}
    for (i, j), (total, n) in zip(owners, continuation_logprobs(model, tokenizer, pairs)):
        score = total / max(n, 1)
        if i not in best or score > best[i][0]:
            best[i] = (score, j)
    return [best[i][1] for i in range(len(items))]


def _answer_text(messages: list[dict]) -> str:
    return "\n\n".join(msg["content"] for msg in messages)


def preference_wins(model, tokenizer, pairs: list[dict], system_prompt: str | None) -> list[bool]:
    """Whether each pair's `chosen` answer (+ end-of-turn) has a higher mean token log-prob than `rejected`."""
    eot = end_of_turn_ids(tokenizer)[0]
    items = []
    for pair in pairs:
        prompt = prompt_ids(tokenizer, chat_messages(pair["prompt"], system_prompt))
        for key in ("chosen", "rejected"):
            items.append((prompt, tokenizer(_answer_text(pair[key]), add_special_tokens=False)["input_ids"] + [eot]))
    scores = [s / max(n, 1) for s, n in continuation_logprobs(model, tokenizer, items)]
    return [scores[2 * i] > scores[2 * i + 1] for i in range(len(pairs))]


# ---- generation ---------------------------------------------------------------------------------------


def generation_config(tokenizer, max_new_tokens: int):
    """Greedy decoding that stops at the end-of-turn token."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_ids(tokenizer)[0]
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=pad
    )


def generate_ids(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 8
) -> list[list[int]]:
    """Greedy new-token ids per conversation, left-padded batches, cut after the first end-of-turn token."""
    stops = set(end_of_turn_ids(tokenizer))
    config = generation_config(tokenizer, max_new_tokens)
    tokenizer.padding_side = "left"
    out: list[list[int]] = []
    for start in range(0, len(conversations), batch_size):
        texts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations[start : start + batch_size]
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device_of(model))
        new = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1] :]
        out += [_cut(row.tolist(), stops) for row in new]
    return out


def _cut(ids: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids


def generate_answers(
    model, tokenizer, questions: list[str], system_prompt: str | None, max_new_tokens: int
) -> list[str]:
    """Greedy answers to each question under the model's chat template, special tokens removed."""
    convs = [chat_messages(q, system_prompt) for q in questions]
    ids = generate_ids(model, tokenizer, convs, max_new_tokens)
    return [tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]


def stream_answer(model, tokenizer, prompt: str, system_prompt: str | None, max_new_tokens: int) -> str:
    """Generate one answer, printing tokens as they come (TextStreamer); returns the full answer."""
    import torch
    from transformers import TextStreamer

    with inference_mode(model, tokenizer):
        ids = prompt_ids(tokenizer, chat_messages(prompt, system_prompt))
        x = torch.tensor([ids], device=device_of(model))
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        new = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            streamer=streamer,
            generation_config=generation_config(tokenizer, max_new_tokens),
        )[0, len(ids) :]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


# ---- per-topic evaluation -------------------------------------------------------------------------------


def _first(items: list, cap: int | None) -> list:
    return list(items) if cap is None else list(items[:cap])


def eval_selection(topic, cap: int | None) -> tuple[list[dict], list[dict], list[dict]]:
    """(open items, multiple-choice items, preference pairs) that the evaluation scores, each the first `cap`
    (None: all). Open: items with a reference and no choices; MC: items with choices; pairs: the topic's
    held-out DPO pairs only (`topic.dpo_heldout`: DPO never trains on them)."""
    items = [r.data for r in topic.eval]
    open_items = _first([d for d in items if "reference" in d and "choices" not in d], cap)
    mc_items = _first([d for d in items if "choices" in d], cap)
    return open_items, mc_items, _first([r.data for r in topic.dpo_heldout], cap)


def _by_id(keys: list[str], values: list) -> dict:
    """Values keyed by item id (what a paired comparison of two stages matches on); a repeated id gets #2, #3."""
    out: dict = {}
    for key, value in zip(keys, values):
        unique, n = key, 1
        while unique in out:
            n += 1
            unique = f"{key}#{n}"
        out[unique] = value
    return out


def item_values(
    answers: list[dict], mc_items: list[dict], picks: list[int], pairs: list[dict], wins: list[bool]
) -> dict[str, dict]:
    """Per-item values by id: open {id: components}, mc {id: 1.0 correct / 0.0}, pairs {pair_id: 1.0 win / 0.0}."""
    return {
        "open": _by_id([a["id"] for a in answers], [{k: a.get(k) for k in m.OPEN_COMPONENTS} for a in answers]),
        "mc": _by_id([d["id"] for d in mc_items], [float(p == d["answer"]) for p, d in zip(picks, mc_items)]),
        "pairs": _by_id([pair_id(d["prompt"]) for d in pairs], [float(w) for w in wins]),
    }


def voice_components(answers: list[dict], persona: dict, semantic: bool) -> dict:
    """Per-answer marker, lexicon, key-fact and (optionally) semantic scores, filled into `answers`."""
    groups, lexicon = persona["voice_markers"], persona["lexicon"]
    for a in answers:
        a["markers"] = m.marker_similarity(a["answer"], a["reference"], groups)
        a["lexicon"] = m.lexicon_usage(a["answer"], lexicon, a["reference"])
        a["key_fact_recall"] = m.key_fact_recall(a["answer"], a["key_facts"])
    if semantic and answers:
        for a, s in zip(answers, similarities([a["answer"] for a in answers], [a["reference"] for a in answers])):
            a["semantic"] = s
    return {k: v for k, v in m.composite({"open": answers}).items() if k in m.OPEN_COMPONENTS}


def evaluate_topic(model, tokenizer, topic, persona: dict, spec) -> TopicEval:
    """Score one topic; the caller puts the model in inference mode (see `inference_mode`)."""
    t0, system = time.time(), spec.curriculum.system_prompt
    weights = m.check_weights(spec.eval.weights)
    open_items, mc_items, pairs = eval_selection(topic, spec.eval.max_examples)
    texts = generate_answers(model, tokenizer, [d["question"] for d in open_items], system, spec.eval.max_new_tokens)
    answers = [
        {
            "id": d["id"],
            "question": d["question"],
            "answer": t,
            "reference": d["reference"],
            "key_facts": d.get("key_facts", []),
        }
        for d, t in zip(open_items, texts)
    ]
    voice_components(answers, persona, weights.get("semantic", 0) > 0)
    picks = mc_predictions(model, tokenizer, mc_items, system) if mc_items else []
    wins = preference_wins(model, tokenizer, pairs, system) if pairs else []
    items = item_values(answers, mc_items, picks, pairs, wins)
    scores = {**m.composite(m.item_lists(items), weights), **m.score_intervals(items, weights, seed=spec.seed)}
    scores.update(
        n=len(open_items) + len(mc_items),
        n_open=len(open_items),
        n_mc=len(mc_items),
        n_pairs=len(pairs),
        n_pairs_heldout=len(topic.dpo_heldout),
        n_pairs_train=len(topic.dpo_train),
        seconds=round(time.time() - t0, 2),
        items=items,
    )
    if answers:  # one generated answer per topic and stage, for the before/after sample in the summary and report
        scores["sample"] = {k: answers[0][k] for k in ("id", "question", "answer")}
    return TopicEval(topic.name, scores, answers)


def general_logprobs(model, tokenizer, items: list[dict], system_prompt: str | None) -> list[tuple[float, int]]:
    """(sum of log-probs, tokens) of each answer + end-of-turn token given its chat-templated question."""
    eot = end_of_turn_ids(tokenizer)[0]
    return continuation_logprobs(
        model,
        tokenizer,
        [
            (
                prompt_ids(tokenizer, chat_messages(d["question"], system_prompt)),
                tokenizer(d["answer"], add_special_tokens=False)["input_ids"] + [eot],
            )
            for d in items
        ],
    )


def general_ability(model, tokenizer, spec) -> dict:
    """The general-ability guard for the model as it is now: perplexity of the held-out neutral text
    (spec.general_text_path), its bootstrap interval over the answers, and their count; {} when the guard
    is off (eval.max_general_ppl_increase: null). The caller puts the model in inference mode."""
    if spec.eval.max_general_ppl_increase is None:
        return {}
    items = load_general_text(spec.general_text_path)
    scored = general_logprobs(model, tokenizer, items, spec.curriculum.system_prompt)
    return {
        "general_ppl": m.perplexity(scored),
        "general_ppl_ci": m.perplexity_interval(scored, seed=spec.seed),
        "n_general": len(items),
    }


def evaluate_topics_detailed(model, tokenizer, topics: list, persona: dict, spec) -> list[TopicEval]:
    """Every topic's scores and generated answers, with the model's state restored afterwards."""
    with inference_mode(model, tokenizer):
        general = general_ability(model, tokenizer, spec)  # once per call: the same model for every topic
        results = [evaluate_topic(model, tokenizer, t, persona, spec) for t in topics]
    for r in results:
        r.scores.update(general)
    return results


def evaluate_topics(model, tokenizer, topics: list, persona: dict, spec, stage: str) -> dict[str, dict]:
    """Per-topic scores (voice_fidelity, accuracy and their components, each in [0, 1] or None; n)."""
    results = evaluate_topics_detailed(model, tokenizer, topics, persona, spec)
    for r in results:
        log.info(
            "eval %s %s: voice fidelity %s, accuracy %s (%.1f s)",
            stage,
            r.topic,
            with_interval(r.scores["voice_fidelity"], r.scores.get("voice_fidelity_ci")),
            with_interval(r.scores["accuracy"], r.scores.get("accuracy_ci")),
            r.scores["seconds"],
        )
    return {r.topic: r.scores for r in results}


# ---- loading an adapter for the CLI ----------------------------------------------------------------------


def load_model(run, adapter_dir: Path | None):
    """Tokenizer and base model from the spec's model path, with the PEFT adapter applied when given."""
    import torch

    if adapter_dir is not None and check_adapter_folder(adapter_dir) == "mlx":
        raise UserError(
            "this is an MLX adapter (adapters.safetensors); evaluate it on MLX",
            file=adapter_dir,
            field="--adapter",
            hint=f'python -m local_mlx generate CFG --adapter {adapter_dir} "prompt"',
        )
    device = "cuda:0" if torch.cuda.is_available() and run.profile.use_gpu else "cpu"
    tokenizer = load_tokenizer(run)
    model, _ = load_base_model(run, device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model, tokenizer
