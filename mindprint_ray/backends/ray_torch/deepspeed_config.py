"""DeepSpeed ZeRO configs generated from the run plan (a plain dict; HF Trainer fills the "auto" values)."""

from __future__ import annotations


def deepspeed_config(stage: int, bf16: bool, offload_optimizer: bool = False) -> dict | None:
    """ZeRO-2 or ZeRO-3 for LoRA. Under ZeRO-3 the 16-bit weights are gathered on save, so the saved
    adapter is complete (not the empty adapter_model.safetensors users hit with LoRA + ZeRO-3)."""
    if stage == 0:
        return None
    zero: dict = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 3:
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
            }
        )
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto" if bf16 else False},
        "fp16": {"enabled": False},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "zero_allow_untested_optimizer": True,
    }
