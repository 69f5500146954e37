"""Evaluation: voice fidelity and accuracy per topic, stability, gates. See docs/evaluation.md.

Importing this package loads no torch: the runner imports it inside its functions."""
from __future__ import annotations

from .gates import GateResult, check_gates, final_statement, recheck_key, summary_entries
from .metrics import DEFAULT_WEIGHTS, stability
from .runner import TopicEval, evaluate_topics, evaluate_topics_detailed

__all__ = ["DEFAULT_WEIGHTS", "GateResult", "check_gates", "evaluate_topics", "final_statement", "recheck_key",
           "stability", "summary_entries", "TopicEval", "evaluate_topics_detailed"]

