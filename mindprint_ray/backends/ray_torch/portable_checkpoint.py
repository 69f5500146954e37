"""Checkpoints that any number of workers can resume: one folder, written by rank 0, whatever the world size.

A LoRA run's state is small: the adapter, the optimizer moments of its parameters, the scheduler, the RNG states
and the step (which, with the global batch kept by planning/elastic.py, is the position in the topic's data).
HF Trainer's own checkpoint is already that without DeepSpeed (DDP replicas are identical, so rank 0's
optimizer.pt is the whole state), except for the RNG: each rank writes its own file into its own local folder,
and only rank 0's folder is uploaded. Under DeepSpeed ZeRO-2/3 each rank writes its shard of the optimizer
(global_step*/), which only the same number of ranks can load.

`PortableCheckpoints`, mixed into TRL's trainers, makes both cases one format:
- every rank's RNG state is gathered into rank 0's folder (rng_state_<rank>.pth, and rng_state.pth for a
  resume on one worker);
- under DeepSpeed the full fp32 parameters and moments of every trainable parameter are gathered (DeepSpeed's
  safe_get_full_* collectives) into `portable_optimizer.pt`, by parameter name, instead of the per-rank shards;
  a resume scatters them back into whatever partitioning the new group has (safe_set_full_*).
"""

from __future__ import annotations

import os

from mindprint_ray.backends.ray_torch.zero3 import gathered

PORTABLE_OPTIMIZER = "portable_optimizer.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


def trainable(model) -> list[tuple[str, object]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def gather_rng_states(states: dict, world: int) -> list[dict]:
    """Every rank's RNG states, on every rank (a collective when distributed)."""
    import torch.distributed as dist

    if world <= 1 or not dist.is_initialized():
        return [states]
    gathered = [None] * world
    dist.all_gather_object(gathered, states)
    return gathered


def full_optimizer_state(model, optimizer) -> dict:
    """The full fp32 weights and Adam moments of each trainable parameter, by name (every rank must call this:
    each tensor is gathered from the ZeRO partitions), and the step count. `optimizer` is the DeepSpeed engine's
    ZeRO optimizer (trainer.model_wrapped.optimizer), which wraps the torch optimizer of the flat partitions."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = {}
    for name, p in trainable(model):
        entry = {"fp32": safe_get_full_fp32_param(p)}
        for key in MOMENTS:
            entry[key] = safe_get_full_optimizer_state(p, key)
        params[name] = {k: v.detach().cpu().clone() for k, v in entry.items() if v is not None}
    return {"format": 1, "step": optimizer_step(optimizer), "params": params}


def optimizer_step(optimizer) -> int:
    """Adam's step count (bias correction) from the wrapped torch optimizer's per-partition state."""
    inner = optimizer.optimizer
    for state in inner.state.values():
        if "step" in state:
            step = state["step"]
            return int(step.item() if hasattr(step, "item") else step)
    return 0


def load_full_optimizer_state(model, optimizer, saved: dict) -> None:
    """Scatter `full_optimizer_state`'s tensors into this group's partitions (every rank calls this)."""
    import torch
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    prime_adam_state(optimizer)
    named = dict(trainable(model))
    missing = sorted(set(saved["params"]) ^ set(named))
    if missing:
        raise RuntimeError(f"the checkpoint's trainable parameters differ from the model's: {missing[:5]}")
    for name, entry in saved["params"].items():
        p = named[name]
        set_model_weight(p, entry["fp32"])
        safe_set_full_fp32_param(p, entry["fp32"].to(p.device))
        for key in MOMENTS:
            if key in entry:
                safe_set_full_optimizer_state(p, entry[key].to(p.device), key)
    for state in optimizer.optimizer.state.values():
        if "step" in state:
            old = state["step"]
            state["step"] = torch.tensor(float(saved["step"])) if torch.is_tensor(old) else saved["step"]


def prime_adam_state(optimizer) -> None:
    """Torch's Adam creates its state at the first step, and DeepSpeed's ZeRO-1/2 optimizer links it to the
    parameters only then; a resume comes before any step, so make that state now (zeros, overwritten by the saved
    moments) for each flat fp32 partition: ZeRO-1/2's single_partition_of_fp32_groups, ZeRO-3's
    fp32_partitioned_groups_flat."""
    import torch

    flats = getattr(optimizer, "single_partition_of_fp32_groups", None)
    if flats is None:
        flats = optimizer.fp32_partitioned_groups_flat
    inner = optimizer.optimizer
    for flat in flats:
        state = inner.state[flat]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    if not getattr(optimizer, "_hp_optimizer_states_linked", True):
        optimizer._lazy_init_hp_params_optimizer_state()


def set_model_weight(p, value) -> None:
    """The 16-bit (or fp32) model copy of a parameter: whole on every rank under ZeRO-2, re-partitioned from
    rank 0 under ZeRO-3."""
    import torch

    with gathered([p], modifier_rank=0), torch.no_grad():
        p.data.copy_(value.to(p.device, p.dtype))


class PortableCheckpoints:
    """Mixin for HF/TRL trainers (first in the bases): checkpoints independent of the world size."""

    def _save_rng_state(self, output_dir: str) -> None:
        import torch

        super()._save_rng_state(output_dir)  # this rank's file, in this rank's folder
        world = self.args.world_size
        if world <= 1:
            return
        own = torch.load(os.path.join(output_dir, f"rng_state_{self.args.process_index}.pth"), weights_only=False)
        states = gather_rng_states(own, world)
        if self.args.process_index == 0:
            for rank, state in enumerate(states):
                torch.save(state, os.path.join(output_dir, f"rng_state_{rank}.pth"))
            torch.save(states[0], os.path.join(output_dir, "rng_state.pth"))  # a resume on one worker

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        import torch

        state = full_optimizer_state(self.model, self.model_wrapped.optimizer)  # a collective: every rank
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(state, os.path.join(output_dir, PORTABLE_OPTIMIZER))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        portable = resume_from_checkpoint is not None and os.path.isfile(
            os.path.join(resume_from_checkpoint, PORTABLE_OPTIMIZER)
        )
        if not (self.is_deepspeed_enabled and portable):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        import torch

        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        saved = torch.load(os.path.join(resume_from_checkpoint, PORTABLE_OPTIMIZER), weights_only=False)
        load_full_optimizer_state(self.model, self.model_wrapped.optimizer, saved)
        scheduler = torch.load(os.path.join(resume_from_checkpoint, "scheduler.pt"), weights_only=False)
        self.lr_scheduler.load_state_dict(scheduler)
        # a scheduler sets the optimizer's rate only when it steps: the first resumed step needs the saved one
        # (HF's own resume gets it from optimizer.pt's param groups)
        for group, lr in zip(self.model_wrapped.optimizer.param_groups, self.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        return model, train_dataloader


def portable(trainer_class: type) -> type:
    """`trainer_class` with PortableCheckpoints mixed in (e.g. portable(SFTTrainer))."""
    return type(f"Portable{trainer_class.__name__}", (PortableCheckpoints, trainer_class), {})
