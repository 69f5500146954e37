"""Planning: the model registry, zone plan, hardware profiles and prices, memory/time/cost estimates, calibration and
the step budget. Pure: imports no torch, ray or mlx."""
