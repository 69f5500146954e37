"""The run folder contract (adapters, checkpoints, metrics, summary), storage (local and s3://) and the adapter file
formats. Pure: imports no torch, ray or mlx."""
