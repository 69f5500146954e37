"""DPO against a frozen reference, its log-probs scored once per topic when planning/dpo_reference.py says so.

The reference is fixed for a topic's whole DPO: `sft` is TRL's frozen copy of the adapter as DPO starts (the "ref"
adapter it adds to a PEFT model), `base` is the adapter disabled (the "ref" copy deleted, so TRL disables the
adapters for its reference forward).

TRL 1.16's own `precompute_ref_log_probs=True` is not used, for three reasons read in its source
(DPOTrainer.__init__ and _precompute_ref_logps):
- it scores the pairs inside `DPOTrainer.__init__`, with the "ref" adapter it has just added, before a caller can
  delete it: `reference: base` would be precomputed against the SFT adapter;
- it hands the scores between ranks through an Arrow cache file that rank 0 writes. Our datasets live in memory
  (`Dataset.from_list`), for which `datasets` names that file at random in each process's own temporary folder,
  so no other rank can read it (and on several nodes no shared folder would exist anyway);
- it names that file by a SHA-256 of the whole model's state dict, copied to the CPU: tens of GB for a 72B base,
  on every rank, every topic.
Here every rank scores its share of the pairs with TRL's own `compute_ref_log_probs` (the same forward TRL's
per-step reference runs, through a DeepSpeed inference engine under DeepSpeed as TRL does), gathers all of them
in dataset order (`gather_for_metrics`, which drops the distributed sampler's padding), and adds them to its own
in-memory dataset as TRL's `ref_chosen_logps` / `ref_rejected_logps` columns, which TRL's collator and loss read.
"""

from __future__ import annotations

from mindprint_ray.backends.ray_torch.zero3 import gathered


def drop_reference_adapter(model) -> None:
    """TRL's DPO keeps a frozen copy of the adapter as reference ("ref"); the topic's adapter is "default" only."""
    if "ref" in getattr(model, "peft_config", {}):
        model.set_adapter("default")
        model.delete_adapter("ref")


class FrozenReference:
    """Mixin for TRL's DPOTrainer: `reference` sft or base; with `precompute`, each pair's reference log-probs are
    scored before the first step (and the "ref" adapter, no longer needed, is freed)."""

    def __init__(self, *args, reference: str = "sft", precompute: bool = False, **kwargs):
        # TRL copies the adapter into its "ref" adapter with plain tensor copies; under ZeRO-3 they read the
        # whole weights (the copy's new parameters are partitioned by this stage's engine)
        model = kwargs.get("model")
        adapter = [p for name, p in model.named_parameters() if ".default." in name] if model is not None else []
        with gathered(adapter):
            super().__init__(*args, **kwargs)
        if self.args.precompute_ref_log_probs:
            raise ValueError(
                "FrozenReference precomputes itself: build its DPOConfig with precompute_ref_log_probs off"
            )
        if reference == "base":  # without the "ref" copy, TRL scores the reference with the adapters disabled
            drop_reference_adapter(self.model)
        if precompute:
            self.train_dataset = self.with_reference_logps(self.train_dataset)
            self.precompute_ref_logps = self.args.precompute_ref_log_probs = True  # TRL's loss reads the columns
            drop_reference_adapter(self.model)

    def reference_model(self):
        """What scores the pairs: the policy model itself (the adapter context is compute_ref_log_probs'), wrapped
        once in a DeepSpeed inference engine under DeepSpeed, as TRL's own precompute does."""
        from trl.models.utils import prepare_deepspeed

        if not self.is_deepspeed_enabled:
            return self.model
        if getattr(self, "_precompute_engine", None) is None:
            self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
        return self._precompute_engine

    def with_reference_logps(self, dataset):
        """`dataset` (TRL's tokenized pairs) with the reference log-probs of every pair, on every rank."""
        import torch
        from torch.utils.data import DataLoader

        loader = DataLoader(
            dataset,
            batch_size=self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            shuffle=False,
        )
        model, chosen, rejected = self.reference_model(), [], []
        for batch in self.accelerator.prepare(loader):
            scores = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
            chosen.append(scores[0].float().cpu())
            rejected.append(scores[1].float().cpu())
        dataset = dataset.add_column("ref_chosen_logps", torch.cat(chosen).numpy())
        return dataset.add_column("ref_rejected_logps", torch.cat(rejected).numpy())
