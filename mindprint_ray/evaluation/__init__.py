"""Evaluation, the pure part: voice-fidelity and accuracy metrics with bootstrap intervals, stability, gates, and
the general-ability text (general_qa.yaml). See docs/evaluation.md.

The model-side runner (generation, log-probs, sentence embeddings) lives with its backend:
`mindprint_ray.backends.ray_torch.eval_runner`."""

from __future__ import annotations

from mindprint_ray.evaluation.gates import GateResult, check_gates, final_statement, recheck_key, summary_entries
from mindprint_ray.evaluation.metrics import DEFAULT_WEIGHTS, stability

__all__ = [
    "DEFAULT_WEIGHTS",
    "GateResult",
    "check_gates",
    "final_statement",
    "recheck_key",
    "stability",
    "summary_entries",
]
