"""mindprint-ray: zone-LoRA persona fine-tuning on Ray (torch) and MLX. The core imports no torch, ray or mlx."""
from __future__ import annotations

__version__ = "0.1.0"

from .model_config import ModelConfig, get_model_config, load_model_config  # noqa: E402

__all__ = ["ModelConfig", "get_model_config", "load_model_config", "__version__"]
