"""The curriculum: topic folders (SFT, DPO, eval), chat-template masks, token counts and the checks run before
training. Pure: imports no torch, ray or mlx."""
