"""Curriculum data at scale: one streaming pass per file, its scan cached by content and invalidated by any change
of file, tokenizer, template or system prompt, errors still naming file, line and field, memory that does not
hold a topic's records, and the worker's tokenised SFT data built chunk by chunk."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
from conftest import make_data, make_spec, write_jsonl

from mindprint_ray.curriculum import data_scan, scan_cache
from mindprint_ray.curriculum.chat_template import with_system
from mindprint_ray.curriculum.tokens import TokenCounter
from mindprint_ray.curriculum.topics import eval_overlaps, load_curriculum, load_topic
from mindprint_ray.curriculum.validation import data_warnings, validate_data, validate_run
from mindprint_ray.errors import UserError
from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.planning.topic_tokens import count_topic_tokens

LONG = " ".join(["word"] * 400)  # far over a max_seq_length of 160 with any tokenizer


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MINDPRINT_CACHE", str(root))
    scan_cache._IN_MEMORY.clear()
    return root


@pytest.fixture
def scans(monkeypatch) -> list[str]:
    """The files scanned from their text (cache misses), in order."""
    seen: list[str] = []
    real = data_scan.scan_file

    def counting(path, kind, counter, system):
        seen.append(f"{path.parent.name}/{kind}")
        return real(path, kind, counter, system)

    monkeypatch.setattr(data_scan, "scan_file", counting)
    return seen


def spec_for(tmp_path: Path, data: Path, model: Path, *extra: str):
    return load_run(make_spec(tmp_path / "run.yaml", data), [f"model.path={model}", *extra])


def rows_of(run) -> list[dict]:
    rows, _ = validate_data(run)
    return [vars(r) for r in rows]


# ---- the cache -------------------------------------------------------------------------------------------------


def test_second_validation_reads_every_scan_from_the_cache(tmp_path, tiny_model_dir, scans):
    run = spec_for(tmp_path, make_data(tmp_path / "data"), tiny_model_dir)
    first = rows_of(run)
    # make_data's eval files are byte-identical in both topics: the cache is by content, so one scan serves both
    assert (tmp_path / "data" / "alpha" / "eval.jsonl").read_bytes() == (
        tmp_path / "data" / "beta" / "eval.jsonl"
    ).read_bytes()
    assert scans == ["alpha/sft", "alpha/dpo", "alpha/eval", "beta/sft", "beta/dpo"]
    scans.clear()
    assert rows_of(run) == first
    assert count_topic_tokens(run)[0] and data_warnings(run) == [] and validate_run(run)[1]
    assert scans == []  # validate, plan's token count, the warnings and the backends' validation: no rescan


def test_a_changed_file_is_scanned_again_and_counted_anew(tmp_path, tiny_model_dir, scans):
    data = make_data(tmp_path / "data")
    run = spec_for(tmp_path, data, tiny_model_dir)
    before = rows_of(run)
    sft = data / "alpha" / "sft.jsonl"
    rows = [json.loads(line) for line in sft.read_text().splitlines()]
    rows[0]["messages"][1]["content"] += " And one more sentence about the weekly cycle."
    write_jsonl(sft, rows)
    scans.clear()
    after = rows_of(run)
    assert scans == ["alpha/sft"]
    assert after[0]["sft_tokens"] > before[0]["sft_tokens"] and after[1] == before[1]


def test_a_changed_template_tokenizer_or_system_prompt_invalidates(tmp_path, tiny_model_dir, smollm2_dir, scans):
    data = make_data(tmp_path / "data", topics=("alpha",))
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    run = load_run(make_spec(tmp_path / "run.yaml", data, topics=("alpha",)), [f"model.path={model}"])
    base = rows_of(run)[0]["sft_tokens"]

    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "), encoding="utf-8")
    scans.clear()
    assert rows_of(run)[0]["sft_tokens"] > base and "alpha/sft" in scans  # a template edit

    other = load_run(
        make_spec(tmp_path / "run.yaml", data, topics=("alpha",)),
        [f"model.path={smollm2_dir}", "model.name=smollm2-135m"],
    )
    scans.clear()
    rows_of(other)
    assert "alpha/sft" in scans  # another tokenizer

    prompted = load_run(
        make_spec(tmp_path / "run.yaml", data, topics=("alpha",)),
        [f"model.path={model}", "curriculum.system_prompt=You teach market cycles in plain words."],
    )
    scans.clear()
    # the spec's system prompt replaces the template's default one (Qwen2.5's is longer): counted as trained
    assert rows_of(prompted)[0]["sft_tokens"] != rows_of(run)[0]["sft_tokens"] and "alpha/sft" in scans


def test_max_seq_length_applies_to_cached_lengths(tmp_path, tiny_model_dir, scans):
    data = make_data(tmp_path / "data", topics=("alpha",))
    long_and_short = [
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": LONG}]},
        {"messages": [{"role": "user", "content": "Short?"}, {"role": "assistant", "content": "Yes."}]},
    ]
    write_jsonl(data / "alpha" / "sft.jsonl", long_and_short)
    spec = make_spec(tmp_path / "run.yaml", data, topics=("alpha",), curriculum={"overlong": "drop"})
    wide = load_run(spec, [f"model.path={tiny_model_dir}", "sft.max_seq_length=4096", "dpo.max_seq_length=4096"])
    assert rows_of(wide)[0]["sft"] == 2
    scans.clear()
    narrow = load_run(spec, [f"model.path={tiny_model_dir}", "sft.max_seq_length=160", "dpo.max_seq_length=4096"])
    row = rows_of(narrow)[0]
    assert scans == [] and row["sft"] == 1 and row["sft_over"] == 1 and row["action"] == "dropped"
    topics, _, _ = validate_run(narrow)
    assert [r.line for r in topics[0].sft] == [2]  # the records the backends train on: the long one dropped
    (tokens,), _ = count_topic_tokens(narrow)  # the plan counts what training trains on
    assert tokens.sft_examples == 1 and tokens.dpo_pairs == len(topics[0].dpo_train)


def test_plan_counts_the_dpo_pairs_training_uses_after_a_drop(tmp_path, tiny_model_dir):
    data = make_data(tmp_path / "data", topics=("alpha",), n=9)
    dpo = data / "alpha" / "dpo.jsonl"
    pairs = [json.loads(line) for line in dpo.read_text().splitlines()]
    pairs[4]["chosen"][0]["content"] = LONG
    write_jsonl(dpo, pairs)
    spec = make_spec(tmp_path / "run.yaml", data, topics=("alpha",), curriculum={"overlong": "drop"})
    run = load_run(spec, [f"model.path={tiny_model_dir}", "dpo.max_seq_length=160", "eval.heldout_pairs=0.25"])
    (topic,), _, _ = validate_run(run)
    (tokens,), _ = count_topic_tokens(run)
    assert len(topic.dpo) == 8 and tokens.dpo_pairs == len(topic.dpo_train) == 6  # 2 of the 8 kept are held out


def test_a_file_with_an_error_is_never_cached(tmp_path, tiny_model_dir, scans):
    data = make_data(tmp_path / "data")
    dpo = data / "beta" / "dpo.jsonl"
    lines = dpo.read_text().splitlines()
    broken = json.loads(lines[2])
    broken["rejected"] = broken["chosen"]
    dpo.write_text("\n".join([*lines[:2], json.dumps(broken), *lines[3:]]) + "\n")
    run = spec_for(tmp_path, data, tiny_model_dir)
    for _ in range(2):  # the same error, with file, line and field, on the second run too
        with pytest.raises(UserError) as e:
            validate_data(run)
        assert (e.value.file, e.value.line, e.value.field) == (str(dpo), 3, "rejected")
    assert scans.count("beta/dpo") == 2


def test_a_conversation_the_template_cannot_split_names_its_line(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(  # drops earlier assistant turns' reasoning (Qwen3-style)
        "{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n' + message['content'].split('</think>')[-1] + '<|im_end|>\n' }}{% else %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    data = make_data(tmp_path / "data")
    sft = data / "alpha" / "sft.jsonl"
    rows = [json.loads(line) for line in sft.read_text().splitlines()]
    rows[1]["messages"] += [{"role": "user", "content": "And?"}, {"role": "assistant", "content": "Then."}]
    rows[1]["messages"][1]["content"] = "<think>x</think>Low."
    write_jsonl(sft, rows)
    with pytest.raises(UserError) as e:
        validate_data(spec_for(tmp_path, data, model))
    assert (e.value.file, e.value.line, e.value.field) == (str(sft), 2, "messages") and "prefix" in str(e.value)


# ---- the same answers as reading every record ------------------------------------------------------------------


def test_token_counts_equal_counting_each_record_with_its_system_prompt(tmp_path, smollm2_dir):
    data = make_data(tmp_path / "data", n=12)
    run = spec_for(
        tmp_path, data, smollm2_dir, "model.name=smollm2-135m", "curriculum.system_prompt=Answer as the teacher."
    )
    tokens, how = count_topic_tokens(run)
    counter = TokenCounter.for_model(run.model_path)
    assert how.startswith("exact")
    for t, topic in zip(tokens, load_curriculum(run.spec)):
        sft = [counter.count(with_system(r.data["messages"], "Answer as the teacher.")) for r in topic.sft]
        assert t.sft_lengths == tuple(sft) and t.sft_tokens == sum(sft)
        pairs = [
            [
                counter.count(with_system(r.data["prompt"], "Answer as the teacher.") + r.data[k])
                for k in ("chosen", "rejected")
            ]
            for r in topic.dpo_train
        ]
        assert t.dpo_pairs == len(pairs) < len(topic.dpo)  # held-out pairs are not trained
        assert t.dpo_tokens == sum(c + r for c, r in pairs) and t.dpo_padded_tokens == sum(2 * max(p) for p in pairs)


def test_overlap_warnings_equal_those_from_the_records(tmp_path, tiny_model_dir):
    data = make_data(tmp_path / "data", n=12)
    sft = data / "beta" / "sft.jsonl"  # an eval question of alpha, trained (in other case and punctuation) in beta
    rows = [json.loads(line) for line in sft.read_text().splitlines()]
    rows[3]["messages"][0]["content"] = "what CONFIRMS a cycle low"
    write_jsonl(sft, rows)
    questions = [f"Prompt {i} on alpha?" for i in range(12)]  # every DPO prompt: only the trained ones count
    evals = [json.loads(line) for line in (data / "alpha" / "eval.jsonl").read_text().splitlines()]
    evals += [{"id": f"p{i}", "question": q, "reference": "x"} for i, q in enumerate(questions)]
    write_jsonl(data / "alpha" / "eval.jsonl", evals)
    run = spec_for(tmp_path, data, tiny_model_dir)
    expected = [o.message() for o in eval_overlaps(load_curriculum(run.spec))]
    assert data_warnings(run) == expected
    assert any("beta/sft.jsonl:4" in w for w in expected)
    assert 0 < sum("DPO prompt" in w for w in expected) < 12  # held-out pairs are not trained prompts


# ---- memory ----------------------------------------------------------------------------------------------------


def test_validation_does_not_hold_the_records(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    n = 3000
    for t in ("alpha",):
        write_jsonl(
            data / t / "sft.jsonl",
            [
                {
                    "messages": [
                        {"role": "user", "content": f"Q{i} {LONG[:300]}?"},
                        {"role": "assistant", "content": LONG},
                    ]
                }
                for i in range(n)
            ],
        )
        write_jsonl(
            data / t / "dpo.jsonl", [{"prompt": f"P{i}?", "chosen": LONG, "rejected": LONG[:500]} for i in range(n)]
        )
    run = load_run(
        make_spec(tmp_path / "run.yaml", data, topics=("alpha",), eval={"enabled": False}),
        [f"model.path={tiny_model_dir}", "sft.max_seq_length=4096", "dpo.max_seq_length=4096"],
    )
    size = sum(f.stat().st_size for f in data.rglob("*.jsonl"))

    def peak(fn) -> int:
        tracemalloc.start()
        fn()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    scanned = peak(lambda: validate_data(run))
    loaded = peak(lambda: load_topic(data, "alpha", ["sft", "dpo"]))
    assert loaded > size  # holding the records costs more than the file
    assert scanned < size / 4, (scanned, size)  # the scan: a batch of records and a few integers per record


# ---- the worker's tokenised data ----------------------------------------------------------------------------


def test_sft_dataset_is_built_in_chunks_and_trains(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from mindprint_ray.backends.ray_torch import datasets as ds

    monkeypatch.setattr(ds, "CHUNK", 3)
    data = make_data(tmp_path / "data", topics=("alpha",), n=8)
    records = load_topic(data, "alpha", ["sft"]).sft
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    built = ds.sft_dataset(records, "Be brief.", tok, True)
    one_by_one = [ds.tokenize_conversation(tok, with_system(r.data["messages"], "Be brief."), True) for r in records]
    assert built.to_list() == one_by_one and len(built) == 8
    assert built.features["input_ids"].feature.dtype == "int32"
    assert built.features["assistant_masks"].feature.dtype == "int8"

    from trl import SFTConfig, SFTTrainer

    from mindprint_ray.backends.ray_torch.model_loading import apply_zone_plan, load_base_model

    run = load_run(make_spec(tmp_path / "run.yaml", data, topics=("alpha",)), [f"model.path={tiny_model_dir}"])
    base, _ = load_base_model(run, "cpu")
    model = apply_zone_plan(base, run, False)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, packing=True, max_length=128, report_to=[], use_cpu=True
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=built, processing_class=tok)
    assert trainer.train().training_loss > 0


def test_content_hash_follows_every_record(tmp_path):
    from mindprint_ray.backends.ray_torch import datasets as ds

    data = make_data(tmp_path / "data", topics=("alpha",))
    records = load_topic(data, "alpha", ["sft"]).sft
    key = ds.content_hash(records, str(tmp_path), {"max_length": 512})
    assert key == ds.content_hash(list(records), str(tmp_path), {"max_length": 512})
    assert key != ds.content_hash(records, str(tmp_path), {"max_length": 256})
    records[-1].data["messages"][-1]["content"] += "!"
    assert key != ds.content_hash(records, str(tmp_path), {"max_length": 512})


def test_the_transformers_template_check_is_remembered_until_something_changes(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from mindprint_ray.curriculum import chat_template
    from mindprint_ray.curriculum.topics import TopicData

    topics, _, _ = validate_run(spec_for(tmp_path, make_data(tmp_path / "data"), tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    eot = chat_template.check_tokenizer(tok, topics, None, "here")
    calls, real = [], chat_template.check_template
    monkeypatch.setattr(chat_template, "check_template", lambda *a: calls.append(1) or real(*a))
    assert chat_template.check_tokenizer(tok, topics, None, "here") == eot and calls == []
    chat_template.check_tokenizer(tok, topics, "Be brief.", "here")  # another system prompt
    topics[0].sft.pop()  # another set of records (the over-long policy dropped one)
    chat_template.check_tokenizer(tok, topics, None, "here")
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")  # another template
    chat_template.check_tokenizer(tok, topics, None, "here")
    assert len(calls) == 3
    by_hand = [TopicData("x", sft=topics[0].sft)]  # records that do not say which file they came from
    chat_template.check_tokenizer(tok, by_hand, None, "here")
    chat_template.check_tokenizer(tok, by_hand, None, "here")
    assert len(calls) == 5


def test_an_s3_curriculum_is_downloaded_once_per_process(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mindprint_ray.curriculum import topics

    data, calls = make_data(tmp_path / "data"), []
    monkeypatch.setattr(topics, "_DOWNLOADED", {})
    monkeypatch.setattr(topics, "materialize_data_dir", lambda uri: calls.append(uri) or str(data))
    spec = SimpleNamespace(curriculum=SimpleNamespace(data_dir="s3://bucket/data"))
    assert topics.curriculum_dir(spec) == topics.curriculum_dir(spec) == data and calls == ["s3://bucket/data"]
    local = SimpleNamespace(curriculum=SimpleNamespace(data_dir=str(data)))
    monkeypatch.setattr(topics, "materialize_data_dir", lambda uri: calls.append(uri) or uri)
    topics.curriculum_dir(local), topics.curriculum_dir(local)
    assert len(calls) == 3  # a local folder is looked at each time (nothing to download)
