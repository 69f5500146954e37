"""The sample models the product builds on first use (the random tiny Qwen2 fixture, SmolLM2-135M from PyPI). An edge
shared by both backends: transformers and torch are imported inside its functions."""
