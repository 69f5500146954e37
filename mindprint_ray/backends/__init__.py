"""The backends: Ray/torch here (`ray_torch`); MLX lives in the top-level `local_mlx` package. A backend imports the
core, never another backend."""
