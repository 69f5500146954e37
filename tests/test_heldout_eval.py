"""Held-out evaluation: the DPO pair split, eval/training overlap warnings, bootstrap intervals, the paired
difference of two stages, the general-ability guard and the sample curriculum's eval sets. Pure Python."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE_DATA, dpo_row, make_spec, run_cli, write_jsonl
from pydantic import ValidationError

from mindprint_ray.backends.ray_torch.eval_runner import eval_selection
from mindprint_ray.curriculum.topics import (
    Record,
    eval_overlaps,
    heldout_count,
    load_curriculum,
    load_general_text,
    load_topic,
    pair_id,
    split_pairs,
)
from mindprint_ray.evaluation import check_gates, final_statement
from mindprint_ray.evaluation import metrics as m
from mindprint_ray.spec.run_spec import EvalSection, RunSpec

TOPICS = sorted(p.name for p in SAMPLE_DATA.iterdir() if p.is_dir())


def records(n: int, start: int = 0) -> list[Record]:
    return [
        Record("dpo.jsonl", i + 1, {"prompt": [{"role": "user", "content": f"Question number {i}?"}]})
        for i in range(start, start + n)
    ]


def lines(rs: list[Record]) -> set[int]:
    return {r.line for r in rs}


# ---- the split ---------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_covers_every_pair():
    pairs = records(28)
    train, held = split_pairs(pairs, 0.25)
    assert split_pairs(pairs, 0.25) == (train, held)
    assert split_pairs(list(reversed(pairs)), 0.25)[1] == list(reversed(held))  # by prompt, not position
    assert not lines(train) & lines(held) and lines(train) | lines(held) == lines(pairs)
    assert len(held) == 7 and [r.line for r in train] == sorted(r.line for r in train)  # file order kept


def test_split_respects_the_fraction():
    assert [heldout_count(n, 0.25) for n in (0, 1, 2, 3, 4, 10, 20, 28, 32)] == [0, 0, 1, 1, 1, 3, 5, 7, 8]
    assert heldout_count(4, 0.05) == 1 and heldout_count(10, 0.9) == 9 and heldout_count(100, 0.0) == 0
    assert split_pairs(records(20), 0.0) == (records(20), [])
    for fraction in (0.1, 0.25, 0.5, 0.9):
        assert len(split_pairs(records(40), fraction)[1]) == heldout_count(40, fraction) == round(40 * fraction)


def test_adding_a_pair_moves_at_most_one_other_pair():
    for n in range(4, 40):
        before = lines(split_pairs(records(n), 0.25)[1])
        after = lines(split_pairs(records(n + 1), 0.25)[1]) - {n + 1}
        assert len(before - after) <= 1 and len(after - before) <= 1, n


def test_pairs_sharing_a_prompt_stay_on_one_side_and_ids_ignore_case_and_punctuation():
    pairs = records(12) + records(12)  # every prompt twice
    train, held = split_pairs(pairs, 0.25)
    assert {pair_id(r.data["prompt"]) for r in train}.isdisjoint(pair_id(r.data["prompt"]) for r in held)
    assert pair_id("What is a Cycle-Low?") == pair_id([{"role": "user", "content": "what is a cycle low"}])


def test_topic_data_takes_the_fraction_from_the_spec(tmp_path):
    spec_file = make_spec(
        tmp_path / "run.yaml", copy_curriculum(tmp_path), topics=["cycle_basics"], eval={"heldout_pairs": 0.5}
    )
    from mindprint_ray.spec.run_spec import load_spec

    topic = load_curriculum(load_spec(spec_file))[0]
    assert topic.heldout_fraction == 0.5 and len(topic.dpo_heldout) == heldout_count(len(topic.dpo), 0.5)
    assert (
        EvalSection().heldout_pairs == 0.25
        and load_topic(SAMPLE_DATA, "cycle_basics", ["dpo"]).heldout_fraction == 0.25
    )
    with pytest.raises(ValidationError, match="heldout_pairs"):
        EvalSection(heldout_pairs=0.95)


def test_evaluation_scores_only_held_out_pairs():
    topic = load_topic(SAMPLE_DATA, "cycle_basics", ["sft", "dpo", "eval"])
    open_items, mc_items, pairs = eval_selection(topic, None)
    held = [r.data for r in topic.dpo_heldout]
    assert pairs == held and len(pairs) >= 7
    assert not {pair_id(p["prompt"]) for p in pairs} & {pair_id(r.data["prompt"]) for r in topic.dpo_train}
    assert all("choices" not in d for d in open_items) and all("choices" in d for d in mc_items)
    capped = eval_selection(topic, 6)
    assert [len(x) for x in capped] == [6, 6, 6] and capped[2] == held[:6]


def test_tiny_model_warm_up_never_sees_held_out_pairs():
    from mindprint_ray.models.tiny import neutral_conversations

    seen = {c[0]["content"] for c in neutral_conversations(SAMPLE_DATA)}
    for name in TOPICS:
        topic = load_topic(SAMPLE_DATA, name, ["dpo"])
        assert not seen & {r.data["prompt"][-1]["content"] for r in topic.dpo_heldout}
        assert {r.data["prompt"][-1]["content"] for r in topic.dpo_train} <= seen


def test_time_model_counts_only_the_train_pairs():
    from mindprint_ray.planning.run_plan import load_run
    from mindprint_ray.planning.topic_tokens import count_topic_tokens

    root = Path(__file__).resolve().parents[1]
    run = load_run(
        root / "configs" / "tiny-cpu.yaml",
        [f"model.path={root / 'no-such-model'}", f"curriculum.data_dir={SAMPLE_DATA}"],
    )
    rows, _ = count_topic_tokens(run)
    for row in rows:
        assert row.dpo_pairs == len(load_topic(SAMPLE_DATA, row.topic, ["dpo"]).dpo_train)


# ---- eval questions that training sees ---------------------------------------------------------------


def copy_curriculum(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DATA, data)
    return data


def test_overlap_warning_names_both_files_and_lines(tmp_path):
    data = copy_curriculum(tmp_path)
    sft_file, eval_file = data / "accumulation" / "sft.jsonl", data / "cycle_basics" / "eval.jsonl"
    sft_prompt = json.loads(sft_file.read_text().splitlines()[2])["messages"][0]["content"]
    rows = eval_file.read_text().splitlines()
    item = json.loads(rows[4])
    item["question"] = "  " + sft_prompt.upper().rstrip("?.") + " !"  # case, spaces, punctuation differ
    rows[4] = json.dumps(item)
    eval_file.write_text("\n".join(rows) + "\n")
    topics = [load_topic(data, t, ["sft", "dpo", "eval"]) for t in ("cycle_basics", "accumulation")]
    found = eval_overlaps(topics)
    assert len(found) == 1 and found[0].kind == "SFT prompt"
    assert f"{eval_file}:5:" in found[0].message() and f"{sft_file}:3" in found[0].message()

    spec_file = make_spec(tmp_path / "run.yaml", data, topics=["cycle_basics", "accumulation"])
    r = run_cli("validate", str(spec_file))
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stdout and f"{eval_file}:5:" in r.stdout and f"{sft_file}:3" in r.stdout


def test_overlap_with_dpo_train_prompts_only(tmp_path):
    data = copy_curriculum(tmp_path)
    topic = load_topic(data, "cycle_lows", ["sft", "dpo", "eval"])
    trained, held = topic.dpo_train[0], topic.dpo_heldout[0]
    for question, want in ((trained.data["prompt"][-1]["content"], 1), (held.data["prompt"][-1]["content"], 0)):
        topic.eval[0].data["question"] = question
        found = eval_overlaps([topic])
        assert len(found) == want
        if want:
            assert found[0].kind == "DPO prompt" and found[0].other_line == trained.line


def test_sample_curriculum_eval_sets_are_held_out_and_large_enough():
    topics = [load_topic(SAMPLE_DATA, t, ["sft", "dpo", "eval"]) for t in TOPICS]
    assert [o.message() for o in eval_overlaps(topics)] == []
    for t in topics:
        open_items, mc_items, pairs = eval_selection(t, None)
        assert len(open_items) >= 24 and len(mc_items) >= 12 and len(t.dpo) >= 28 and len(pairs) >= 7, t.name
        assert len({r.data["id"] for r in t.eval}) == len(t.eval), t.name
        for d in open_items:
            assert d["key_facts"] and all(m.contains(d["reference"], f) for f in d["key_facts"]), d["id"]
        dpo_prompts = {pair_id(r.data["prompt"]) for r in t.dpo}
        assert len(dpo_prompts) == len(t.dpo), t.name


# ---- bootstrap intervals -----------------------------------------------------------------------------


def items(n_open: int, n_mc: int, n_pairs: int, shift: float = 0.0) -> dict:
    return {
        "open": {
            f"o{i}": {
                "markers": min(1.0, (i % 5) / 4 + shift),
                "lexicon": (i % 3) / 2,
                "semantic": 0.3 + (i % 4) / 10,
                "key_fact_recall": (i % 2) * 1.0,
            }
            for i in range(n_open)
        },
        "mc": {f"m{i}": float(i % 3 == 0) for i in range(n_mc)},
        "pairs": {f"p{i}": float(i % 2 == 0) for i in range(n_pairs)},
    }


def test_intervals_contain_the_point_estimate_and_are_reproducible():
    it = items(24, 12, 7)
    point, cis = m.composite(m.item_lists(it)), m.score_intervals(it, seed=3)
    for k in m.SCORES:
        lo, hi = cis[f"{k}_ci"]
        assert lo <= point[k] <= hi, k
    assert m.score_intervals(it, seed=3) == cis and m.score_intervals(it, seed=4) != cis
    assert point["voice_fidelity"] == pytest.approx(m.voice_fidelity(point)) and point["accuracy"] == pytest.approx(
        m.accuracy(point["mc_accuracy"], point["key_fact_recall"])
    )


def test_intervals_shrink_with_more_items():
    values = [float(i % 2) for i in range(12)]
    small, large = m.mean_interval(values, seed=1), m.mean_interval(values * 10, seed=1)
    assert large[1] - large[0] < (small[1] - small[0]) / 2
    wide = m.score_intervals(items(6, 6, 4))["voice_fidelity_ci"]
    narrow = m.score_intervals(items(60, 60, 40))["voice_fidelity_ci"]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_missing_kinds_give_no_interval_and_single_values_a_point():
    cis = m.score_intervals({"open": {}, "mc": {"a": 1.0}, "pairs": {}})
    assert cis["preference_ci"] is None and cis["markers_ci"] is None and cis["mc_accuracy_ci"] == [1.0, 1.0]
    assert m.mean_interval([]) is None


def test_paired_difference_and_stage_comparison():
    before, after = items(24, 12, 8), items(24, 12, 8, shift=0.25)
    d = m.paired_difference(before, after, "voice_fidelity")
    point = m.composite(m.item_lists(after))["voice_fidelity"] - m.composite(m.item_lists(before))["voice_fidelity"]
    assert d["diff"] == pytest.approx(point) and d["diff_ci"][0] <= d["diff"] <= d["diff_ci"][1]
    assert d["diff_ci"][0] > 0 and d["differs"] and d["n"] == {"open": 24, "mc": 12, "pairs": 8}
    assert not m.paired_difference(before, before, "voice_fidelity")["differs"]
    # only items both stages scored are compared
    fewer = {k: dict(list(v.items())[:5]) for k, v in after.items()}
    assert m.paired_difference(before, fewer, "accuracy")["n"] == {"open": 5, "mc": 5, "pairs": 5}
    b = {**m.composite(m.item_lists(before)), **m.score_intervals(before), "items": before}
    a = {**m.composite(m.item_lists(after)), **m.score_intervals(after), "items": after}
    c = m.compare_stages(b, a)
    assert c["above"] and c["after"] > c["before"] and c["diff"] == pytest.approx(point)
    assert c["excludes_before"] == m.excludes(a["voice_fidelity_ci"], b["voice_fidelity"])
    assert m.excludes([0.4, 0.6], 0.3) and not m.excludes([0.4, 0.6], 0.5) and not m.excludes(None, 0.5)


def test_perplexity_and_its_interval():
    scored = [(-2.0 * n, n) for n in (3, 5, 8)]  # every token has log-prob -2
    assert m.perplexity(scored) == pytest.approx(math.exp(2.0)) and m.perplexity([]) is None
    lo, hi = m.perplexity_interval(scored + [(-1.0 * 4, 4)], seed=0)
    assert math.exp(1.0) <= lo <= hi <= math.exp(2.0)


# ---- the general-ability guard -----------------------------------------------------------------------


def spec(**eval_section) -> RunSpec:
    return RunSpec.model_validate({"curriculum": {"topics": ["a", "b"]}, "eval": eval_section})


def ppl_summary(base: float, after: float) -> dict:
    def stage(ppl):
        return {"voice_fidelity": 0.9, "accuracy": 0.9, "general_ppl": ppl}

    return {"topics": {"a": {"eval": {"base": stage(base), "after_sft": stage(after), "after_dpo": stage(after)}}}}


def test_general_ppl_gate_fires_above_base_times_one_plus_the_increase():
    assert check_gates(ppl_summary(10.0, 12.4), spec(), "a").messages == []
    warn = check_gates(ppl_summary(10.0, 12.6), spec(), "a")
    assert len(warn.misses) == 1 and warn.misses[0]["kind"] == "general" and not warn.stop
    assert "perplexity 12.60" in warn.messages[0] and "12.50" in warn.messages[0]
    assert check_gates(ppl_summary(10.0, 12.6), spec(max_general_ppl_increase=0.5), "a").messages == []
    assert check_gates(ppl_summary(10.0, 99.0), spec(max_general_ppl_increase=None), "a").messages == []
    stop = check_gates(ppl_summary(10.0, 20.0), spec(on_miss="stop"), "a")
    assert stop.stop and any("stop" in msg for msg in stop.messages)


def test_final_statement_reports_general_ability_and_held_out_gain():
    ok = final_statement(ppl_summary(10.0, 11.0), spec())
    assert ok["checks"]["general_ability"] is True and any("perplexity" in line for line in ok["lines"])
    bad = final_statement(ppl_summary(10.0, 15.0), spec())
    assert bad["checks"]["general_ability"] is False and not bad["met"]
    before, after = items(24, 12, 8), items(24, 12, 8, shift=0.4)
    s = {
        "topics": {
            "a": {
                "eval": {
                    "base": {**m.composite(m.item_lists(before)), **m.score_intervals(before), "items": before},
                    "after_dpo": {**m.composite(m.item_lists(after)), **m.score_intervals(after), "items": after},
                }
            }
        }
    }
    gain = final_statement(s, spec())["heldout_gain"]["a"]
    assert gain["above"] and gain["differs"] and gain["stage"] == "after_dpo"


def test_shipped_general_text_loads_and_bad_files_name_the_problem(tmp_path):
    shipped = load_general_text(spec().general_text_path)
    assert 15 <= len(shipped) <= 30 and all(d["question"] and d["answer"] for d in shipped)
    assert not any(m.contains(d["answer"], "cycle") for d in shipped)
    jsonl = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "A."}, {"question": "Q2?"}])
    from mindprint_ray.errors import UserError

    with pytest.raises(UserError) as e:
        load_general_text(jsonl)
    assert e.value.line == 2 and "answer" in e.value.message
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"items": [{"question": "Q?", "answer": ""}]}))
    with pytest.raises(UserError, match="answer"):
        load_general_text(tmp_path / "g.yaml")
    with pytest.raises(UserError, match="not found"):
        load_general_text(tmp_path / "none.yaml")


def test_new_spec_fields_have_descriptions():
    for name in ("heldout_pairs", "general_text", "max_general_ppl_increase"):
        assert EvalSection.model_fields[name].description, name


# ---- the report ----------------------------------------------------------------------------------------


def test_report_table_shows_intervals_held_out_pairs_and_general_ppl():
    from mindprint_ray.report.evaluation import eval_table, heldout_lines
    from mindprint_ray.report.numbers import with_interval

    assert with_interval(0.54, [0.49, 0.59]) == "0.540 [0.490, 0.590]" and with_interval(None, None) == "-"
    row = {
        "topic": "a",
        "stage": "base",
        "voice_fidelity": 0.5,
        "voice_fidelity_ci": [0.4, 0.6],
        "n_pairs_heldout": 7,
        "n_pairs_train": 21,
        "general_ppl": 12.345,
        "general_ppl_ci": [11.0, 13.5],
    }
    headers, cells = eval_table([row])
    assert cells[0][headers.index("voice fidelity")] == "0.500 [0.400, 0.600]"
    assert cells[0][headers.index("pairs held out")] == "7 of 28"
    assert cells[0][headers.index("general ppl")] == "12.35 [11.00, 13.50]"
    before, after = items(24, 12, 8), items(24, 12, 8, shift=0.4)
    s = {
        "topics": {
            "a": {
                "eval": {
                    "base": {**m.composite(m.item_lists(before)), **m.score_intervals(before), "items": before},
                    "after_dpo": {**m.composite(m.item_lists(after)), **m.score_intervals(after), "items": after},
                }
            }
        }
    }
    (line,) = heldout_lines(s, spec())
    assert line.startswith("a, after dpo vs base") and "paired difference +" in line and "(differs)" in line


def test_dpo_rows_in_conftest_share_the_split_rule(tmp_path):
    rows = [dpo_row(f"Prompt {i}?") for i in range(8)]
    train, held = split_pairs(rows, 0.25, prompt=lambda r: r["prompt"])
    assert len(held) == 2 and len(train) == 6
