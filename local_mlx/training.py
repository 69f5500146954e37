"""The curriculum on MLX: per topic SFT (prompt-masked) then DPO, one mlx-lm adapter per topic, resumable by name.

Writes the same run folder as the Ray path: spec.yaml, adapters/<topic>/ (published atomically, with the
manifest), metrics.jsonl and summary.json with the same keys. A topic is done when its adapter folder is
complete; a rerun with the same name skips done topics and continues from the last done topic's adapter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice

from rich.console import Console
from rich.progress import Progress

from mindprint_ray.cli.views import progress_columns
from mindprint_ray.curriculum.topics import TopicData
from mindprint_ray.curriculum.validation import validate_run
from mindprint_ray.errors import UserError
from mindprint_ray.models.tiny import ensure_run_model
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.runs.lease import hold, lease_ttl_s
from mindprint_ray.runs.run_folder import RunFolder, adapter_manifest, claim_run_folder

from .adapters import load_adapter, save_adapter
from .data import Pair, dpo_pairs, pad, sft_sequences, shuffled_batches
from .losses import dpo_loss, sequence_logprobs, sft_loss
from .model import adapter_disabled, load_for_training
from .stage import StageConfig, StageResult, dpo_metrics, no_metrics, run_stage


@dataclass
class Trainer:
    """A loaded model with the zone plan applied, and where its metrics go."""

    run: RunPlan
    model: object
    tokenizer: object
    log: Callable[[dict], None]
    progress: object = None
    reference: str = "sft"  # DPO reference: "sft" (the model as DPO starts) or "base" (adapter disabled)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    # ---- SFT ------------------------------------------------------------------------------------
    def sft_config(self, topic: str, examples: int, max_steps: int | None = None) -> StageConfig:
        s = self.run.spec.stage("sft")
        steps = (
            max_steps
            or s.max_steps
            or math.ceil(s.epochs_per_topic * examples / (s.batch_size * s.gradient_accumulation))
        )
        return StageConfig(
            topic,
            "sft",
            max(1, steps),
            s.gradient_accumulation,
            s.learning_rate,
            s.warmup_steps,
            s.scheduler,
            s.weight_decay,
            s.max_grad_norm,
            gradient_checkpointing=s.gradient_checkpointing,
            logging_steps=s.logging_steps,
        )

    def train_sft(self, topic: TopicData, max_steps: int | None = None) -> StageResult:
        s, system = self.run.spec.sft, self.run.spec.curriculum.system_prompt
        seqs = sft_sequences(self.tokenizer, topic.sft, system, s.max_seq_length, s.assistant_only_loss)
        if not seqs:
            raise UserError(
                f"topic '{topic.name}' has no SFT example with an assistant token within max_seq_length",
                field="sft.max_seq_length",
                hint="raise sft.max_seq_length",
            )

        def batches():
            for group in shuffled_batches(seqs, s.batch_size, self.run.spec.seed):
                b = pad(group, self.pad_id)
                yield (b.tokens, b.mask), b.num_tokens

        cfg = self.sft_config(topic.name, len(seqs), max_steps)
        return run_stage(self.model, cfg, batches(), sft_loss, no_metrics, self.log, self.progress)

    # ---- DPO ------------------------------------------------------------------------------------
    def dpo_config(self, topic: str, max_steps: int | None = None) -> StageConfig:
        d = self.run.spec.stage("dpo")
        return StageConfig(
            topic,
            "dpo",
            max_steps or d.steps_per_topic,
            d.gradient_accumulation,
            d.learning_rate,
            d.warmup_steps,
            "linear",
            0.0,
            d.max_grad_norm,
            dropout=False,
            gradient_checkpointing=d.gradient_checkpointing,
        )

    def reference_logprobs(self, pairs: list[Pair]) -> None:
        """Precompute each response's summed log-prob under the reference: the model as DPO starts (after SFT,
        as TRL's frozen adapter copy on the Ray path) or, with reference="base", the adapter disabled."""
        import mlx.core as mx

        batch = max(1, self.run.spec.dpo.batch_size)
        with adapter_disabled(self.model) if self.reference == "base" else nullcontext():
            for i in range(0, len(pairs), batch):
                group = pairs[i : i + batch]
                b = pad([p.chosen for p in group] + [p.rejected for p in group], self.pad_id)
                values = sequence_logprobs(self.model, b.tokens, b.mask)
                mx.eval(values)
                for j, p in enumerate(group):
                    p.ref_chosen, p.ref_rejected = values[j].item(), values[len(group) + j].item()

    def train_dpo(self, topic: TopicData, max_steps: int | None = None) -> StageResult | None:
        import mlx.core as mx

        d, system = self.run.spec.dpo, self.run.spec.curriculum.system_prompt
        pairs = dpo_pairs(self.tokenizer, topic.dpo_train, system, d.max_seq_length)
        if not pairs:
            return None
        cfg = self.dpo_config(topic.name, max_steps)
        groups = list(
            islice(shuffled_batches(pairs, d.batch_size, self.run.spec.seed + 1), cfg.steps * cfg.accumulation)
        )
        self.model.eval()
        self.reference_logprobs(visited_once(groups))  # not the pairs this stage never reaches (steps x batch < pairs)

        def batches():
            for group in groups:
                b = pad([p.chosen for p in group] + [p.rejected for p in group], self.pad_id)
                ref = mx.array([p.ref_chosen for p in group] + [p.ref_rejected for p in group])
                yield (b.tokens, b.mask, ref), b.num_tokens

        def loss(model, tokens, mask, ref):
            return dpo_loss(model, tokens, mask, ref, d.beta)

        return run_stage(self.model, cfg, batches(), loss, dpo_metrics, self.log, self.progress)


def visited_once(groups: list[list[Pair]]) -> list[Pair]:
    """The pairs of a stage's batches, each once, in the order of their first visit."""
    seen: dict[int, Pair] = {}
    for group in groups:
        for p in group:
            seen.setdefault(id(p), p)
    return list(seen.values())


# ---- one topic, the whole run ----------------------------------------------------------------------


def finish_stage(folder: RunFolder, topic: str, stage: str, result: StageResult) -> dict:
    """Record the stage in summary.json, or stop the run when the NaN/inf guard fired."""
    if result.bad:
        raise UserError(folder.stop_stage(topic, stage, result.bad), field=f"{stage}.learning_rate")
    summary = result.summary(stage)
    folder.update_topic(topic, **{stage: summary})
    return summary


def train_topic(trainer: Trainer, folder: RunFolder, topic: TopicData) -> None:
    import mlx.core as mx

    run, t0 = trainer.run, time.time()
    folder.update_topic(topic.name, status="running", backend="mlx", device=str(mx.default_device()))
    sft = finish_stage(folder, topic.name, "sft", trainer.train_sft(topic))
    dpo = {}
    if run.spec.dpo.enabled and topic.dpo_train:
        result = trainer.train_dpo(topic)
        dpo = finish_stage(folder, topic.name, "dpo", result) if result else {}
    staging = folder.staging_dir(topic.name)
    save_adapter(trainer.model, run.zones, staging, run.model_path)
    folder.publish_adapter(topic.name, staging, adapter_manifest(run, topic.name, "mlx", quantization=run.quant))
    folder.finish_topic(topic.name, time.time() - t0, [sft, dpo])


def progress_bar(enabled: bool):
    if not enabled:
        return nullcontext(None)
    return Progress(*progress_columns(), console=Console(stderr=True))


def check_reference(reference: str) -> None:
    """The DPO reference (`--dpo-reference` or dpo.reference): sft or base."""
    if reference not in ("sft", "base"):
        raise UserError(f"unknown DPO reference '{reference}'", field="--dpo-reference", hint="use sft or base")


def train_run(
    run: RunPlan, force: bool = False, progress: bool = True, reference: str = "sft", force_lease: bool = False
) -> RunFolder:
    """Train every pending topic; rerunning with the same name resumes. Returns the run folder. One process at a
    time per run: it holds the run folder's lease (mindprint_ray/runs/lease.py) from the claim to the end."""
    check_reference(reference)  # every user error before the run folder is claimed
    ensure_run_model(run)
    topics, _, _ = validate_run(run)
    lease_folder = RunFolder.for_storage(run.spec.storage.path, run.spec.name)
    with hold(lease_folder, force=force_lease, ttl_s=lease_ttl_s()) as lease:
        folder = train_leased(run, topics, force, progress, reference)
        lease.check()
    return folder


def train_leased(run: RunPlan, topics: list, force: bool, progress: bool, reference: str) -> RunFolder:
    """`train_run` once the run's lease is held."""
    import mlx.core as mx

    folder, resumed = claim_run_folder(run.spec, force)
    pending = [t.name for t in topics if not folder.topic_done(t.name)]
    folder.update_summary(
        run=run.spec.name,
        model=run.model_path,
        profile=run.profile.name,
        backend="mlx",
        dpo_reference=reference,
        topics_order=[t.name for t in topics],
    )
    if not pending:
        return folder
    folder.log({"event": "run_start", "resumed": resumed, "pending": pending, "backend": "mlx"})
    t0 = time.time()
    mx.random.seed(run.spec.seed)
    model, tokenizer = load_for_training(run)
    with progress_bar(progress) as bar:
        trainer = Trainer(run, model, tokenizer, folder.log, bar, reference)
        previous, loaded = None, False
        for topic in topics:
            if folder.topic_done(topic.name):
                previous = topic.name
                continue
            if previous and not loaded:  # resume: continue from the last finished topic's adapter
                load_adapter(model, run.zones, folder.adapter_dir(previous))
            loaded = True
            train_topic(trainer, folder, topic)
            previous = topic.name
    folder.finish_run(time.time() - t0)
    return folder
