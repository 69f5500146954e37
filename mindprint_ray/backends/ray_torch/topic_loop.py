"""The Ray Train worker: load the model once, then for each topic SFT -> DPO -> save its adapter.

Resume: finished topics (complete adapter folders) are skipped; the current topic continues from the
latest Ray checkpoint, tagged with topic and stage (sft, sft_done, dpo).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mindprint_ray.backends.ray_torch import datasets as ds
from mindprint_ray.backends.ray_torch.callbacks import (
    STATE_FILE,
    MetricsCallback,
    PreemptionCallback,
    RayCheckpointCallback,
    read_synced,
    report_checkpoint,
)
from mindprint_ray.backends.ray_torch.deepspeed_config import deepspeed_config
from mindprint_ray.backends.ray_torch.eval_runner import evaluate_topics
from mindprint_ray.backends.ray_torch.model_loading import (
    apply_zone_plan,
    load_adapter_weights,
    load_base_model,
    load_tokenizer,
    set_checkpointing,
)
from mindprint_ray.backends.ray_torch.portable_checkpoint import portable
from mindprint_ray.backends.ray_torch.precision import native_bf16, precision_name
from mindprint_ray.backends.ray_torch.reference_logprobs import drop_reference_adapter
from mindprint_ray.backends.ray_torch.trainer_args import mixed_bf16, trainer_args
from mindprint_ray.backends.ray_torch.trainers import dpo_trainer_class, sft_trainer_class
from mindprint_ray.curriculum.topics import TopicData, load_persona
from mindprint_ray.curriculum.validation import validate_run
from mindprint_ray.errors import UserError
from mindprint_ray.evaluation import check_gates, final_statement
from mindprint_ray.evaluation.gates import summary_entries
from mindprint_ray.planning.dpo_reference import precompute_reference
from mindprint_ray.planning.elastic import stage_layout
from mindprint_ray.planning.estimates import remedies
from mindprint_ray.planning.run_plan import RunPlan, build_run
from mindprint_ray.runs.run_folder import RunFolder, adapter_manifest, stopped_message
from mindprint_ray.spec.run_spec import RunSpec

log = logging.getLogger("mindprint_ray")


class TrainingStopped(RuntimeError):
    """A NaN/inf guard or an eval gate stopped the run on every rank; finished topics are kept."""


class OutOfMemoryStop(RuntimeError):
    """CUDA out of memory, with the seed's remedies and their estimates in the message."""


@dataclass
class Restored:
    topic: str
    stage: str
    step: int
    path: Path
    source: str = "ray"  # "ray": Ray's last committed checkpoint; "notice": uploaded after a spot notice


def quiet_worker_logs() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    quiet_ray_train_console()


class RayTrainConsoleFilter(logging.Filter):
    """Drops Ray Train's own records below `level` (default WARNING, or MINDPRINT_RAY_TRAIN_LOG_LEVEL) on their
    way to the console. Ray 2.60 logs 'Reporting training result N: TrainingReport(...)' at INFO from a logger
    named by its file path (`logging.getLogger(__file__)` in ray/train/v2/_internal/execution/context.py), which
    RunConfig's LoggingConfig filter (by the name 'ray.train') misses."""

    def __init__(self, level: str) -> None:
        super().__init__()
        self.level = logging.getLevelName(level.upper())

    def filter(self, record: logging.LogRecord) -> bool:
        from_ray_train = record.name.startswith("ray.train") or f"{os.sep}ray{os.sep}train{os.sep}" in record.name
        return not from_ray_train or record.levelno >= self.level


def quiet_ray_train_console() -> None:
    """On a worker: Ray Train's INFO lines stay in Ray's session log files (logs/train/ray-train-app-worker-*.log)
    and out of the terminal. Only the stream (console) handlers of the root logger get the filter."""
    level = os.environ.get("MINDPRINT_RAY_TRAIN_LOG_LEVEL", "WARNING")
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PlainRayHandler" or type(handler) is logging.StreamHandler:
            handler.addFilter(RayTrainConsoleFilter(level))


STAGE_ORDER = ("sft", "sft_done", "dpo", "done")


def restore_checkpoint(local_root: Path, topic_order: list[str]) -> Restored | None:
    """Copy the latest checkpoint (if any) to local disk and read its topic/stage tag: Ray's last committed one,
    or the one uploaded after a spot notice that Ray had no time to commit (callbacks.mark_synced), whichever
    comes later in the curriculum."""
    import ray.train

    candidates = []
    committed = ray.train.get_checkpoint()
    if committed is not None:
        candidates.append((committed, "ray"))
    synced = read_synced()
    if synced is not None:
        candidates.append((synced[0], "notice"))
    if not candidates:
        return None
    restored = [fetch_checkpoint(c, local_root / f"restored-{source}", source) for c, source in candidates]

    def position(r: Restored) -> tuple:  # a topic no longer in the curriculum (a forced new spec) counts first
        topic = topic_order.index(r.topic) if r.topic in topic_order else -1
        return topic, STAGE_ORDER.index(r.stage), r.step

    latest = max(restored, key=position)
    for r in restored:
        if r is not latest:
            shutil.rmtree(r.path, ignore_errors=True)
    return latest


def fetch_checkpoint(checkpoint, target: Path, source: str) -> Restored:
    shutil.rmtree(target, ignore_errors=True)
    with checkpoint.as_directory() as d:
        shutil.copytree(d, target)
    state = json.loads((target / STATE_FILE).read_text())
    return Restored(state["topic"], state["stage"], state["step"], target, source)


class Worker:
    """State of one Ray Train worker across the curriculum."""

    def __init__(
        self, run: RunPlan, folder: RunFolder, rank: int, world: int, local_rank: int, local_world: int = 1
    ) -> None:
        import torch

        self.run, self.spec, self.folder = run, run.spec, folder
        self.rank, self.world, self.local_world = rank, world, local_world
        self.writer = folder if rank == 0 else None
        gpu = run.profile.use_gpu and torch.cuda.is_available()
        self.device = f"cuda:{local_rank}" if gpu else "cpu"
        self.gpu = gpu
        if not gpu:
            torch.set_num_threads(max(1, run.profile.cpus_per_worker))
        self.local = Path(tempfile.mkdtemp(prefix=f"mindprint-{run.spec.name}-r{rank}-"))
        self.native_bf16 = native_bf16(gpu)
        bf16 = mixed_bf16(self.spec, self.native_bf16)
        if self.spec.sft.bf16 and not bf16 and rank == 0:
            log.warning("sft.bf16: this %s has no native bf16; training in fp32", "GPU" if gpu else "CPU")
        self.precision = precision_name(bf16)
        self.ds_config = deepspeed_config(run.deepspeed_stage, bf16=bf16)
        self.tokenizer = load_tokenizer(run)
        base, self.attention = load_base_model(run, self.device, local_rank)
        self.model = apply_zone_plan(base, run, False)  # each stage switches its own on (stage_args)
        self._last_trainer = None
        # the latest value of every metric a sweep may optimise, sent with each report to Ray (and Tune)
        self.latest: dict[str, float] = {
            "sft_loss": float("inf"),
            "dpo_loss": float("inf"),
            "reward_accuracy": 0.0,
            "reward_margin": 0.0,
            "voice_fidelity": 0.0,
            "accuracy": 0.0,
        }
        self.persona = None
        self.eval_note = None
        if self.spec.eval.enabled:
            if run.deepspeed_stage >= 3:  # a rank-0-only forward would hang on sharded parameters
                self.eval_note = "in-loop eval is off under ZeRO-3: run `mindprint-ray eval CFG --adapter DIR`"
            else:
                self.persona = load_persona(self.spec.persona_path)

    # ---- one topic ------------------------------------------------------------------------------
    def train_topic(
        self, topic: TopicData, previous: str | None, restored: Restored | None, seen: list[TopicData] | None = None
    ) -> None:
        t0 = time.time()
        seen = seen or [topic]
        stage = restored.stage if restored else None
        if self.writer:
            self.writer.update_topic(
                topic.name, status="running", attention=self.attention, device=self.device, precision=self.precision
            )
        if stage is None and previous:
            load_adapter_weights(self.model, self.folder.ensure_adapter(previous))
        if stage == "sft_done":
            load_adapter_weights(self.model, restored.path)
        sft_metrics = {}
        if stage in (None, "sft"):
            sft, trainer = self.run_sft(topic, restored.path if stage == "sft" else None)
            sft_metrics = self.finish_stage(topic, "sft", sft, trainer)
            # earlier topics (forgetting) are scored once, at the topic's end (after DPO, or SFT without DPO)
            dpo_follows = self.spec.dpo.enabled and bool(topic.dpo)
            if self.spec.eval.after_sft or not dpo_follows:
                self.evaluate([topic] if dpo_follows else seen, topic.name, "after_sft")
        last_trainer, dpo_metrics = None, {}
        if self.spec.dpo.enabled and topic.dpo:
            dpo, last_trainer = self.run_dpo(topic, restored.path if stage == "dpo" else None)
            dpo_metrics = self.finish_stage(topic, "dpo", dpo, last_trainer, checkpoint=False)
            self.evaluate(seen, topic.name, "after_dpo")
        self.publish(topic, sft_metrics, dpo_metrics, time.time() - t0)
        self.gate(topic.name)

    def finish_stage(
        self, topic: TopicData, stage: str, metrics: MetricsCallback, trainer, checkpoint: bool = True
    ) -> dict:
        if metrics.bad:  # every rank stops; rank 0 records it
            if self.writer:
                raise TrainingStopped(self.writer.stop_stage(topic.name, stage, metrics.bad))
            raise TrainingStopped(stopped_message(topic.name, stage, metrics.bad))
        summary = metrics.summary(stage)
        if self.writer:
            self.writer.update_topic(topic.name, **{stage: summary})
        if checkpoint:  # the end of SFT is a resume point: a restart goes straight to DPO
            path = self.save_adapter(trainer, self.local / f"{topic.name}-sft-done")
            report_checkpoint(
                path,
                topic.name,
                "sft_done",
                trainer.state.global_step,
                self.rank,
                metrics=dict(self.latest),
            )
        return summary

    def publish(self, topic: TopicData, sft: dict, dpo: dict, wall_s: float) -> None:
        """Write the topic's adapter atomically (rank 0) and record it; every rank passes the barrier."""
        staging = self.folder.staging_dir(topic.name) if self.rank == 0 else self.local / "discard"
        self.save_adapter(self._last_trainer, staging)
        if self.rank == 0:
            self.folder.publish_adapter(topic.name, staging, adapter_manifest(self.run, topic.name, "peft"))
            self.folder.finish_topic(topic.name, wall_s, [sft, dpo])
        report_checkpoint(
            None,
            topic.name,
            "done",
            0,
            self.rank,
            metrics={**self.latest, "wall_s": wall_s, "topics_done": self.topics_done()},
        )

    def topics_done(self) -> int:
        return sum(self.folder.topic_done(t) for t in self.spec.curriculum.topics)

    def save_adapter(self, trainer, path: Path) -> Path:
        """trainer.save_model gathers ZeRO-3 shards (all ranks must call it) and writes on rank 0 only."""
        path.mkdir(parents=True, exist_ok=True)
        if trainer is not None:
            trainer.save_model(str(path))
        elif self.rank == 0:
            self.model.save_pretrained(str(path))
        return path

    # ---- evaluation (rank 0; the other ranks wait at the next collective) --------------------------
    def evaluate(self, topics: list[TopicData], current: str, stage: str) -> None:
        """Score `topics` (the current one and all earlier ones) and record them at eval.<stage>."""
        if self.persona is None or self.rank != 0:
            return

        with self.eval_threads():
            results = evaluate_topics(self.model, self.tokenizer, topics, self.persona, self.spec, stage)
        self.track_eval(results[current])
        for name, fields in summary_entries(results, current, stage).items():
            self.folder.update_topic(name, **fields)
        for name, scores in results.items():
            self.folder.log({"event": "eval", "topic": name, "stage": stage, "after_topic": current, **scores})

    def evaluate_base(self, topics: list[TopicData]) -> None:
        """The base model (adapter disabled) on every topic, once per run."""
        if self.persona is None or self.rank != 0:
            return
        done = self.folder.summary().get("topics", {})
        todo = [t for t in topics if "base" not in done.get(t.name, {}).get("eval", {})]
        if not todo:
            return

        with self.model.disable_adapter(), self.eval_threads():
            results = evaluate_topics(self.model, self.tokenizer, todo, self.persona, self.spec, "base")
        self.track_eval(results[todo[0].name])
        for name, scores in results.items():
            self.folder.update_topic(name, eval={"base": scores})
            self.folder.log({"event": "eval", "topic": name, "stage": "base", **scores})

    @contextlib.contextmanager
    def eval_threads(self):
        """On CPU, rank 0 evaluates while the node's other workers wait at a collective: let it use their cores."""
        import torch

        saved = torch.get_num_threads()
        if not self.gpu:
            torch.set_num_threads(
                max(saved, min(os.cpu_count() or 1, self.run.profile.cpus_per_worker * self.local_world))
            )
        try:
            yield
        finally:
            torch.set_num_threads(saved)

    def track_eval(self, scores: dict) -> None:
        for key in ("voice_fidelity", "accuracy"):
            if scores.get(key) is not None:
                self.latest[key] = float(scores[key])

    def gate(self, topic: str) -> None:
        """Targets and regressions after a topic: warn, or stop the run (its adapter is already kept)."""
        if self.persona is None:
            return

        result = check_gates(self.folder.summary(), self.spec, topic) if self.rank == 0 else None
        if self.rank == 0:
            for message in result.messages:
                log.warning(message)
                self.folder.log({"event": "gate", "topic": topic, "message": message})
            self.folder.update_topic(topic, gates=result.messages)
        stop = broadcast_from_rank0(bool(result and result.stop), self.world)
        if stop:  # every rank stops together (the decision was rank 0's)
            raise TrainingStopped(
                f"eval gate stopped the run after '{topic}'" + (": " + "; ".join(result.messages) if result else "")
            )

    # ---- trainers ---------------------------------------------------------------------------------
    def stage_args(self, stage: str, topic: str) -> dict:
        """Start `stage` of `topic`: the model's gradient checkpointing set from the stage's own section, and the
        trainer arguments (trainer_args: every value from the spec)."""
        if self.writer and "tensorboard" in self.spec.report_to:
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.folder.root / "tensorboard" / f"{topic}-{stage}")
        set_checkpointing(self.model, self.spec.stage(stage).gradient_checkpointing)
        out_dir = str(self.local / f"{topic}-{stage}")
        args = trainer_args(self.spec, stage, out_dir, self.gpu, self.ds_config, self.native_bf16)
        layout = stage_layout(self.run, stage, self.world)  # the spec's global batch on this many workers
        args.update(per_device_train_batch_size=layout.per_device, gradient_accumulation_steps=layout.accumulation)
        return args

    def run_sft(self, topic: TopicData, resume: Path | None):
        from trl import SFTConfig

        s = self.spec.sft
        settings = {
            "mask": "template-spans-1",
            "max_length": s.max_seq_length,
            "packing": s.packing,
            "assistant_only_loss": s.assistant_only_loss,
            "system": self.spec.curriculum.system_prompt,
            "overlong": self.spec.curriculum.overlong,
        }
        key = ds.content_hash(topic.sft, self.run.model_path, settings)
        cache_root = self.folder.root.parent / ".cache" / "tokenized"
        prepared = ds.cached(cache_root, key)
        args = SFTConfig(
            **self.stage_args("sft", topic.name),
            num_train_epochs=s.epochs_per_topic,
            max_steps=s.max_steps or -1,
            lr_scheduler_type=s.scheduler,
            weight_decay=s.weight_decay,
            packing=s.packing,
            # our own tokenisation carries the assistant-only mask (`assistant_masks`), for any chat template;
            # TRL's own would need `{% generation %}` markers in the template
            assistant_only_loss=False,
            dataset_kwargs={"skip_prepare_dataset": True} if prepared is not None else None,
        )
        if s.packing and self.attention != "flash_attention_2" and s.batch_size > 1:
            # padding-free packing joins the batch's rows into one sequence: without flash-attn the attention
            # is then computed over the whole (batch x length)^2 square. Same effective batch, no waste:
            args.gradient_accumulation_steps *= s.batch_size
            args.per_device_train_batch_size = 1
            log.info(
                "packing with %s: micro-batch 1 x %d accumulation steps",
                self.attention,
                args.gradient_accumulation_steps,
            )
        train_data = (
            prepared
            if prepared is not None
            else ds.sft_dataset(topic.sft, self.spec.curriculum.system_prompt, self.tokenizer, s.assistant_only_loss)
        )
        metrics = MetricsCallback(self.writer, topic.name, "sft", self.latest)
        trainer = portable(sft_trainer_class())(
            model=self.model,
            args=args,
            train_dataset=train_data,
            processing_class=self.tokenizer,
            callbacks=self.stage_callbacks(topic.name, "sft", metrics),
        )
        if prepared is None and self.rank == 0:
            ds.store(cache_root, key, trainer.train_dataset)
        self._train(trainer, resume)
        return metrics, trainer

    def run_dpo(self, topic: TopicData, resume: Path | None):
        from trl import DPOConfig

        d = self.spec.dpo
        args = DPOConfig(**self.stage_args("dpo", topic.name), max_steps=d.steps_per_topic, beta=d.beta)
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * self.world
        precompute = precompute_reference(d.precompute_ref_log_probs, len(topic.dpo_train), d.steps_per_topic, batch)
        if self.writer:
            self.writer.log(
                {"event": "dpo_reference", "topic": topic.name, "reference": d.reference, "precomputed": precompute}
            )
        metrics = MetricsCallback(self.writer, topic.name, "dpo", self.latest)
        dropout = dropout_rates(self.model)  # DPOTrainer zeroes them (disable_dropout); the next SFT needs them
        trainer = portable(dpo_trainer_class())(
            model=self.model,
            ref_model=None,
            args=args,
            processing_class=self.tokenizer,
            train_dataset=ds.dpo_dataset(topic.dpo_train, self.spec.curriculum.system_prompt),
            callbacks=self.stage_callbacks(topic.name, "dpo", metrics),
            reference=d.reference,
            precompute=precompute,
        )
        self._train(trainer, resume)
        drop_reference_adapter(self.model)
        restore_dropout(self.model, dropout)
        return metrics, trainer

    def stage_callbacks(self, topic: str, stage: str, metrics: MetricsCallback) -> list:
        """The stage's metrics, its checkpoints reported to Ray (one folder from rank 0, portable to any world
        size: portable_checkpoint.py), and the answer to a spot notice (a checkpoint at the next step)."""
        return [
            metrics,
            RayCheckpointCallback(topic, stage, self.rank, self.latest),
            PreemptionCallback(self.writer, topic, stage),
        ]

    def release_engine(self, trainer) -> None:
        """Each stage's DeepSpeed engine hooks the same LoRA parameters: remove the previous stage's hooks before
        the next trains, or every gradient is reduced twice (ZeRO-1/2), or the second reduction finds the gradient
        the first has already freed (ZeRO-3). Under ZeRO-3 the parameters stay partitioned for the next engine,
        and the last engine, which gathers the adapter at the topic's end, is freed only when the next stage trains."""
        previous = self._last_trainer
        if previous is not None and previous is not trainer and self.run.deepspeed_stage > 0:
            previous.accelerator.free_memory()

    def _train(self, trainer, resume: Path | None) -> None:
        import torch
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # metrics.jsonl and the driver's progress bar show the logs
        self.release_engine(trainer)
        self._last_trainer = trainer
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except torch.cuda.OutOfMemoryError:
            raise OutOfMemoryStop(oom_message(self.run)) from None


def dropout_rates(model) -> dict[str, float]:
    """Each dropout module's rate (LoRA dropout included), by module name."""
    import torch

    return {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}


def restore_dropout(model, rates: dict[str, float]) -> None:
    """Put back the rates `dropout_rates` recorded: TRL's DPOTrainer sets every dropout to 0 on the model it is
    given, and the same model trains the next topic's SFT, which must keep `lora.dropout`."""
    for name, m in model.named_modules():
        if name in rates:
            m.p = rates[name]


def barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(value, world: int):
    """Rank 0's value on every rank (through the worker group's torch.distributed process group)."""
    import torch.distributed as dist

    if world <= 1 or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def oom_message(run: RunPlan) -> str:
    lines = [f"CUDA out of memory on {run.profile.name}. The seed's remedies, in order, with the estimate for each:"]
    for r in remedies(run):
        lines.append(f"  - {r['remedy']}: {r['total_gb']} GB per device ({'fits' if r['fits'] else 'still too big'})")
    return "\n".join(lines)


def train_loop(config: dict) -> None:
    """Ray Train worker entry point (runs on every worker). A stop (NaN guard, eval gate) or a user error found
    here is deterministic: it ends every rank cleanly, recorded in the summary, so Ray does not retry it; the
    driver reports it and exits 2."""
    import ray.train

    quiet_worker_logs()
    ctx = ray.train.get_context()
    spec = RunSpec.model_validate(config["spec"])
    folder = RunFolder.for_storage(spec.storage.path, spec.name)
    try:
        train_curriculum(build_run(spec), folder, ctx)
    except (TrainingStopped, UserError) as stopped:
        if ctx.get_world_rank() == 0:
            folder.update_summary(stopped=str(stopped))


def record_worker_group(folder: RunFolder, world: int, restored: Restored | None) -> None:
    """Each start of the worker group (the first, and every restart after a failure, a preemption or a resize),
    in metrics.jsonl and in summary.json's `worker_groups`."""
    event = {
        "event": "worker_group_start",
        "world_size": world,
        "restored": None
        if restored is None
        else {"topic": restored.topic, "stage": restored.stage, "step": restored.step, "from": restored.source},
    }
    folder.log(event)
    groups = folder.summary().get("worker_groups", [])
    entry = {"world_size": world, "time": round(time.time(), 3), "restored": event["restored"]}
    folder.update_summary(worker_groups=[*groups, entry])


def train_curriculum(run: RunPlan, folder: RunFolder, ctx) -> None:
    """Every topic not finished yet, in order, resuming the current one from the latest checkpoint."""
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    topics, _, _ = validate_run(run)
    worker = Worker(run, folder, rank, world, local_rank, ctx.get_local_world_size())
    restored = restore_checkpoint(worker.local, [t.name for t in topics])
    if local_rank == 0:  # one process per node brings the node's mirror of an s3:// run up to date
        folder.refresh()
    barrier(world)
    if rank == 0:
        record_worker_group(folder, world, restored)
    if restored and restored.stage == "done":
        restored = None
    if worker.eval_note and rank == 0:
        folder.update_summary(eval_note=worker.eval_note)
    worker.evaluate_base(topics)
    previous = None
    for index, topic in enumerate(topics):
        if folder.topic_done(topic.name):
            previous = topic.name
            continue
        current = restored if restored and restored.topic == topic.name else None
        worker.train_topic(topic, previous, current, seen=topics[: index + 1])
        previous = topic.name
    if rank == 0 and worker.persona is not None:
        folder.update_summary(targets=final_statement(folder.summary(), run.spec, folder.read_metrics()))
    shutil.rmtree(worker.local, ignore_errors=True)
