"""The seed model guide's figures (docs: qwen2.5-72b-model-guide.md), quoted so the report can check them."""

from __future__ import annotations

# the seed's adapter size is planning.plan_summary.SEED_ADAPTER_MB (the plan shows it too)
SEED_BASE_INT4_GB = 36  # "Base Model (INT4): 36 GB"
SEED_MAC_TOTAL_GB = 47  # "Total: 47 GB (within 48 GB limit)"
SEED_MAC_USABLE_GB = 48  # "48GB usable for VRAM"
SEED_TRAINABLE = "~41M"
SEED_8XH100_PRICE = 98  # "~$98/hour"
SEED_4XA100_PRICE = 40  # "~$40/hour"
SEED_8XH100_COST = "$2,000-$4,000"
SEED_4XA100_COST = "$1,000-$2,000"
SEED_HOURS = {  # per topic: SFT and DPO
    "8xh100-80gb": "SFT 2-3 h + DPO 3-4 h",
    "4xa100-80gb": "SFT 4-5 h + DPO 5-6 h",
    "mac-studio-m2-ultra-64gb": "SFT 6-8 h + DPO 8-10 h",
}
# The seed's model comparison table: VRAM INT4 / FP16 (GB), SFT hours per topic
SEED_MODELS = {
    "gemma-3-12b": {"params": "12B", "int4_gb": 12, "bf16_gb": 24, "sft_hours": "2-3h", "mac_int4": "yes"},
    "qwen2.5-7b": {"params": "7B", "int4_gb": 8, "bf16_gb": 14, "sft_hours": "1-2h", "mac_int4": "yes"},
    "qwen2.5-72b": {"params": "72.7B", "int4_gb": 36, "bf16_gb": 145, "sft_hours": "6-8h", "mac_int4": "yes"},
}
