"""Eval gates: targets, regressions of earlier topics, warn vs stop, and the final statement."""

from __future__ import annotations

from mindprint_ray.evaluation import check_gates, final_statement, summary_entries
from mindprint_ray.runs.run_folder import _deep_update
from mindprint_ray.spec.run_spec import RunSpec


def spec(**eval_section) -> RunSpec:
    return RunSpec.model_validate({"curriculum": {"topics": ["a", "b"]}, "eval": eval_section})


def scores(f: float, a: float) -> dict:
    return {"voice_fidelity": f, "accuracy": a}


def summary(a_after_b: dict | None = None, b: dict | None = None) -> dict:
    out = {
        "topics": {
            "a": {"eval": {"base": scores(0.1, 0.1), "after_sft": scores(0.8, 0.9), "after_dpo": scores(0.9, 0.9)}}
        }
    }
    if b is not None:
        out["topics"]["b"] = {"eval": {"after_sft": b, "after_dpo": b}}
        out["topics"]["a"]["eval"]["after_dpo@b"] = a_after_b or scores(0.9, 0.9)
    return out


def test_targets_met_gives_no_message():
    result = check_gates(summary(), spec(), "a")
    assert result.messages == [] and not result.stop


def test_miss_warns_by_default_and_stops_when_asked():
    s = summary(b=scores(0.6, 0.95))
    warn = check_gates(s, spec(), "b")
    assert len(warn.messages) == 1 and "voice fidelity 0.600" in warn.messages[0] and not warn.stop
    stop = check_gates(s, spec(on_miss="stop"), "b")
    assert stop.stop and any("stop" in msg for msg in stop.messages)


def test_custom_targets():
    assert (
        check_gates(summary(b=scores(0.6, 0.6)), spec(voice_fidelity_target=0.5, accuracy_target=0.5), "b").messages
        == []
    )


def test_regression_of_an_earlier_topic():
    dropped = summary(a_after_b=scores(0.80, 0.88), b=scores(0.9, 0.9))
    result = check_gates(dropped, spec(), "b")
    assert len(result.misses) == 1
    assert result.misses[0]["kind"] == "regression" and result.misses[0]["topic"] == "a"
    assert "0.900 -> 0.800" in result.messages[0]
    # a drop within the margin is not a regression
    assert check_gates(dropped, spec(regression_margin=0.2), "b").messages == []


def test_summary_entries_place_scores_where_gates_read_them():
    s = summary()
    s["topics"]["b"] = {}
    for t, fields in summary_entries({"b": scores(0.9, 0.9), "a": scores(0.5, 0.9)}, "b", "after_dpo").items():
        _deep_update(s["topics"][t], fields)
    assert s["topics"]["a"]["eval"]["after_dpo@b"] == scores(0.5, 0.9)
    assert s["topics"]["a"]["eval"]["after_dpo"] == scores(0.9, 0.9)
    assert check_gates(s, spec(), "b").misses[0]["kind"] == "regression"


def test_final_statement():
    good = final_statement(summary(b=scores(0.92, 0.9)), spec(), records=[{"loss": 1.0, "grad_norm": 0.2}])
    assert not good["met"] and good["checks"]["dpo_gain"] is False  # b did not improve across DPO
    s = summary(b=scores(0.92, 0.9))
    s["topics"]["b"]["eval"]["after_sft"] = scores(0.85, 0.9)
    ok = final_statement(s, spec(), records=[{"loss": 1.0, "grad_norm": 0.2}])
    assert ok["met"] and ok["statement"].endswith("all targets met")
    assert "2 excellent" in ok["lines"][0]
    bad = final_statement(summary(b=scores(0.5, 0.9)), spec(), records=[{"loss": float("nan")}])
    assert not bad["met"] and "missed: b 0.500" in bad["lines"][0]
    assert bad["checks"]["stability"] is False
