"""Extra CLI commands, one module each. A module defines `register(app)`; `cli.py` registers them all.

Modules here must import no torch, ray or mlx at module level (import them inside the command)."""
