"""The TRL/HF trainer arguments of one stage, from the spec alone: pure Python (no torch, transformers or ray).

The worker (topic_loop.Worker.stage_args) builds SFTConfig/DPOConfig from this dict, so every setting it carries
is the spec's: the stage's own section (RunSpec.stage) for the per-stage ones, storage for checkpoints.
"""

from __future__ import annotations

from mindprint_ray.spec.run_spec import RunSpec

# Non-reentrant checkpointing works with frozen base weights and LoRA (TRL switches to reentrant under ZeRO-3).
CHECKPOINTING_KWARGS = {"use_reentrant": False}


def mixed_bf16(spec: RunSpec, native_bf16: bool) -> bool:
    """bf16 mixed precision (both stages and DeepSpeed): where the spec asks for it (sft.bf16) and the worker's
    device computes bf16 natively (precision.native_bf16); else fp32."""
    return spec.sft.bf16 and native_bf16


def trainer_args(
    spec: RunSpec, stage: str, output_dir: str, gpu: bool, deepspeed: dict | None, native_bf16: bool
) -> dict:
    """Keyword arguments shared by SFTConfig and DPOConfig for `stage` ("sft" or "dpo"), on a GPU or the CPU
    (`gpu`) whose bf16 support is `native_bf16`."""
    section = spec.stage(stage)
    return dict(
        output_dir=output_dir,
        learning_rate=section.learning_rate,
        per_device_train_batch_size=section.batch_size,
        gradient_accumulation_steps=section.gradient_accumulation,
        warmup_steps=section.warmup_steps,
        max_grad_norm=section.max_grad_norm,
        logging_steps=section.logging_steps if stage == "sft" else 1,  # DPO's section has no logging_steps
        save_strategy="steps",
        save_steps=spec.storage.checkpoint_every_steps,
        # Ray Train keeps storage.keep_checkpoints (CheckpointConfig.num_to_keep) and deletes each local copy once
        # its background upload is done; HF's own rotation could delete a checkpoint still uploading
        save_total_limit=None,
        bf16=mixed_bf16(spec, native_bf16),
        use_cpu=not gpu,
        seed=spec.seed,
        report_to=[r for r in spec.report_to if r != "none"],
        disable_tqdm=True,
        gradient_checkpointing=section.gradient_checkpointing,
        gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS) if section.gradient_checkpointing else None,
        deepspeed=deepspeed,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        max_length=section.max_seq_length,
    )
