"""Evaluation metrics on hand-made cases where the right score is known."""

from __future__ import annotations

import math

import pytest

from mindprint_ray.errors import UserError
from mindprint_ray.evaluation import metrics as m

GROUPS = {"hedges": ["I think", "in my view"], "confidence": ["clearly"], "teaching": ["remember", "notice that"]}
LEXICON = ["cycle low", "half-cycle low", "daily cycle", "risk budget"]
REF = "I think the cycle low is in, early in the daily cycle. Clearly the trend held. Remember: keep a risk budget."


def test_identical_text_scores_one_on_markers():
    assert m.marker_similarity(REF, REF, GROUPS) == pytest.approx(1.0)


def test_no_markers_scores_zero():
    assert m.marker_similarity("Prices went up on Tuesday.", REF, GROUPS) == 0.0


def test_marker_profile_counts_per_group():
    profile = m.marker_profile("I think, in my view, clearly. Notice that.", GROUPS)
    words = 8
    assert profile == pytest.approx({"hedges": 200 / words, "confidence": 100 / words, "teaching": 100 / words})


def test_marker_similarity_is_a_cosine_of_group_frequencies():
    # answer: one hedge; reference: one hedge and one teaching marker -> cos = 1/sqrt(2) (same length)
    answer, reference = "I think prices rise now.", "I think prices rise. Remember."
    assert m.marker_similarity(answer, reference, GROUPS) == pytest.approx(1 / math.sqrt(2))


def test_marker_similarity_both_empty_is_one():
    assert m.marker_similarity("Prices rise.", "Prices fall.", GROUPS) == 1.0


def test_phrase_matching_is_whole_word_and_normalised():
    counts = m.phrase_counts("A half cycle low, then a cycle-low; cycle lows; cycle lowest. Half-Cycle Low.", LEXICON)
    assert counts["half-cycle low"] == 2  # hyphen, case and space variants
    assert counts["cycle low"] == 2  # the plural counts, "lowest" does not, overlaps consumed
    assert m.contains("It\u2019s a Daily\u2013cycle", "daily cycle")


def test_lexicon_usage_counts_reference_terms():
    assert m.lexicon_terms(REF, LEXICON) == {"cycle low", "daily cycle", "risk budget"}
    assert m.lexicon_usage(REF, LEXICON, REF) == 1.0
    assert m.lexicon_usage("The daily cycle matters.", LEXICON, REF) == pytest.approx(1 / 3)
    assert m.lexicon_usage("Nothing relevant.", LEXICON, REF) == 0.0


def test_lexicon_usage_without_reference_terms():
    assert m.lexicon_usage("Watch the risk budget.", LEXICON, "A plain reference.") == 1.0
    assert m.lexicon_usage("A plain answer.", LEXICON, None) == 0.0


def test_key_fact_recall():
    facts = ["18 to 28 trading days", "half-cycle low", "right-translated"]
    full = "It lasts 18 to 28 trading days, with a half cycle low, and it is right translated."
    assert m.key_fact_recall(full, facts) == 1.0
    assert m.key_fact_recall("No idea.", facts) == 0.0
    assert m.key_fact_recall("About 18 to 28 trading days.", facts) == pytest.approx(1 / 3)
    assert m.key_fact_recall("anything", []) is None


def test_voice_fidelity_weights():
    parts = {"markers": 1.0, "lexicon": 0.5, "semantic": 0.0, "preference": 1.0}
    assert m.voice_fidelity(parts) == pytest.approx(0.3 + 0.1 + 0.0 + 0.2)
    assert m.voice_fidelity(parts, {"markers": 1, "lexicon": 1}) == pytest.approx(0.75)
    # a missing component is left out and the weights renormalised over the rest
    assert m.voice_fidelity({**parts, "preference": None}) == pytest.approx((0.3 + 0.1) / 0.8)
    assert m.voice_fidelity({"markers": None}) is None


def test_bad_weights_are_rejected():
    with pytest.raises(UserError, match="unknown"):
        m.check_weights({"marker": 1.0})
    with pytest.raises(UserError, match="non-negative"):
        m.check_weights({"markers": 0.0, "lexicon": 0.0})


def test_accuracy_is_the_mean_of_what_exists():
    assert m.accuracy(1.0, 0.5) == 0.75
    assert m.accuracy(None, 0.5) == 0.5
    assert m.accuracy(None, None) is None


def test_stability_counts_nan_and_spikes():
    records = [{"event": "stage_start"}]
    records += [
        {"topic": "a", "stage": "sft", "step": i, "loss": x, "grad_norm": 1.0}
        for i, x in enumerate([2.0, 1.8, 1.7, 1.6, 5.0, 1.5, float("nan"), 1.4])
    ]
    records += [
        {"topic": "a", "stage": "dpo", "step": 1, "loss": 0.69, "grad_norm": float("inf")},
        {"topic": "a", "stage": "dpo", "step": 2, "loss": "NaN", "grad_norm": 3.0},
    ]
    s = m.stability(records)
    assert s["steps"] == 10
    assert s["nan_inf"] == 3
    assert s["loss_spikes"] == 1  # the 5.0 after ~1.7
    assert not s["stable"]
    assert s["grad_norm_p50"] == 1.0 and s["grad_norm_max"] == 3.0


def test_stability_of_a_smooth_run():
    records = [{"topic": "a", "stage": "sft", "loss": 2.0 - 0.1 * i, "grad_norm": float(i)} for i in range(11)]
    s = m.stability(records)
    assert s["stable"] and s["nan_inf"] == 0 and s["loss_spikes"] == 0
    assert s["grad_norm_p50"] == 5.0 and s["grad_norm_p90"] == pytest.approx(9.0)
    assert m.interpolated_percentile([1.0, 2.0], 50) == 1.5
    assert m.interpolated_percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5  # sorted first; between ranks 1 and 2
    assert m.interpolated_percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert m.interpolated_percentile([], 50) is None


def test_token_length_percentiles_are_the_same_interpolation_rounded_up():
    from mindprint_ray.curriculum.data_stats import length_percentile

    lengths = [10, 11, 40, 12]
    assert m.interpolated_percentile(lengths, 50) == 11.5 and length_percentile(lengths, 50) == 12
    assert m.interpolated_percentile(lengths, 95) == pytest.approx(35.8) and length_percentile(lengths, 95) == 36
    assert length_percentile([7], 95) == 7 and length_percentile([], 50) == 0
