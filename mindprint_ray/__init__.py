"""mindprint-ray: zone-LoRA persona fine-tuning on Ray (torch) and MLX. The core imports no torch, ray or mlx."""

from __future__ import annotations

__version__ = "0.1.0"

from mindprint_ray.planning.model_config import ModelConfig, get_model_config, load_model_config  # noqa: E402

__all__ = [
    "ModelConfig",
    "get_model_config",
    "load_model_config",
    "create_backend",
    "DPOPipeline",
    "PipelineConfig",
    "__version__",
]
_FACADE = {"create_backend", "DPOPipeline", "PipelineConfig"}


def __getattr__(name: str):
    """The seed's facade, imported on first use."""
    if name in _FACADE:
        from mindprint_ray import facade

        return getattr(facade, name)
    raise AttributeError(name)
