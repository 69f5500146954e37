"""Trainer callbacks: metrics to the run folder, the NaN/inf guard, and checkpoints reported to Ray."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

from transformers import TrainerCallback

from mindprint_ray.runs.run_folder import RunFolder
from mindprint_ray.runs.stage_history import StageHistory

STATE_FILE = "mindprint_state.json"
SYNCED_FILE = "mindprint_synced_checkpoint.json"  # beside Ray's checkpoints: the last one uploaded after a notice
UPLOAD_SYNC = False  # set on every rank by a preemption notice: checkpoints then upload before training resumes
GUARDED = ("loss", "grad_norm")


def peak_memory_gb() -> float:
    """Peak device memory of this process: CUDA allocator peak on a GPU, max RSS on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class MetricsCallback(TrainerCallback, StageHistory):
    """Writes every log line to metrics.jsonl (rank 0), adds tokens/s and peak memory, stops on NaN/inf."""

    def __init__(self, folder: RunFolder | None, topic: str, stage: str, latest: dict | None = None) -> None:
        StageHistory.__init__(self)
        self.folder, self.topic, self.stage = folder, topic, stage
        self.latest = latest if latest is not None else {}
        self._last = (time.time(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.time(), 0)
        if self.folder:
            self.folder.log(
                {
                    "event": "stage_start",
                    "topic": self.topic,
                    "stage": self.stage,
                    "max_steps": state.max_steps,
                    "step": state.global_step,
                }
            )

    def on_save(self, args, state, control, **kwargs):
        if self.folder:  # with each checkpoint, the metrics so far reach the remote (a new rank 0 reads them)
            self.folder.push("metrics.jsonl")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "train_runtime" in logs:  # the trainer's closing summary line
            return
        now, tokens = time.time(), logs.get("num_tokens")
        record = {"topic": self.topic, "stage": self.stage, "step": state.global_step, **logs}
        if tokens is not None:
            t0, n0 = self._last
            record["tokens_per_s"] = (tokens - n0) / max(now - t0, 1e-9)
            self._last = (now, tokens)
        record["peak_memory_gb"] = peak_memory_gb()
        self.history.append(record)
        for source, key in (
            ("loss", f"{self.stage}_loss"),
            ("rewards/accuracies", "reward_accuracy"),
            ("rewards/margins", "reward_margin"),
        ):
            if isinstance(logs.get(source), (int, float)) and math.isfinite(logs[source]):
                self.latest[key] = float(logs[source])
        for key in GUARDED:
            value = logs.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self.bad = (key, value, state.global_step)
                control.should_training_stop = True
                control.should_save = False
        if self.folder:
            self.folder.log(record)


class RayCheckpointCallback(TrainerCallback):
    """Reports each HF checkpoint to Ray Train, tagged with topic and stage, so a restart resumes there."""

    def __init__(self, topic: str, stage: str, rank: int, latest: dict | None = None) -> None:
        self.topic, self.stage, self.rank = topic, stage, rank
        self.latest = latest if latest is not None else {}

    def on_save(self, args, state, control, **kwargs):
        checkpoint_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        report_checkpoint(checkpoint_dir, self.topic, self.stage, state.global_step, self.rank, dict(self.latest))


def report_checkpoint(directory: Path | None, topic: str, stage: str, step: int, rank: int, metrics: dict) -> None:
    """All ranks call this (ray.train.report is a barrier); rank 0 uploads its folder (the whole state, also
    under ZeRO-2/3: portable_checkpoint.PortableCheckpoints gathers it there), in Ray's
    background thread (CheckpointUploadMode.ASYNC): training goes on while a checkpoint travels to S3, Ray
    commits checkpoints in report order, deletes each local copy once uploaded, and flushes every pending upload
    before the worker ends."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    checkpoint = None
    if directory is not None and rank == 0 and directory.is_dir():
        (directory / STATE_FILE).write_text(json.dumps({"topic": topic, "stage": stage, "step": step}))
        checkpoint = Checkpoint.from_directory(str(directory))
    clean = {k: v for k, v in metrics.items() if v is not None}
    ray.train.report(
        {"topic": topic, "stage": stage, "step": step, **clean},
        checkpoint=checkpoint,
        checkpoint_dir_name=f"{topic}-{stage}-{step:06d}" if checkpoint else None,
        # the same mode on every rank (all pass `directory`, only the writers a checkpoint)
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC
        if directory is not None and not UPLOAD_SYNC
        else CheckpointUploadMode.SYNC,
    )
    if checkpoint is not None and UPLOAD_SYNC:
        mark_synced({"topic": topic, "stage": stage, "step": step})


def mark_synced(state: dict) -> None:
    """After a notice, rank 0's SYNC report returns once its checkpoint is whole in storage, but Ray commits a
    checkpoint only once its controller has collected every rank's report (it polls every 2 s, one report per
    rank per poll), and the deadline may end the group before the last ones are: name the uploaded checkpoint
    beside Ray's, so that the restart resumes from it (topic_loop.restore_checkpoint) and the notice costs at
    most the step in progress."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    persisted = ray.train.get_checkpoint()  # this worker's last report, uploaded (SYNC) before report returned
    record = json.dumps({**state, "path": persisted.path}).encode()
    with storage.storage_filesystem.open_output_stream(f"{storage.experiment_fs_path}/{SYNCED_FILE}") as out:
        out.write(record)


def read_synced():
    """The checkpoint mark_synced named, as a ray.train.Checkpoint with its topic/stage/step, or None (no notice
    yet, or its folder is gone or incomplete)."""
    import pyarrow.fs
    import ray.train
    from ray.train import Checkpoint

    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    try:
        with fs.open_input_stream(f"{storage.experiment_fs_path}/{SYNCED_FILE}") as f:
            state = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    if fs.get_file_info(f"{state['path']}/{STATE_FILE}").type != pyarrow.fs.FileType.File:
        return None
    return Checkpoint(path=state["path"], filesystem=fs), state


class PreemptionCallback(TrainerCallback):
    """A spot reclaim arrives as a node drain (reason PREEMPTION): Ray Train V2 shows it to every worker through
    ray.train.get_preemption_info(). Asked at each optimizer step's end (a barrier: every rank asks equally
    often), a notice saves a checkpoint at that step and at every step after it, each uploaded before training
    goes on, so when the deadline ends the group a preempted run loses at most the step in progress. Ray
    restarts the group on the nodes that remain, from the last checkpoint, and counts
    the restart against ray.max_preemptions, not ray.max_failures."""

    def __init__(self, folder: RunFolder | None, topic: str, stage: str) -> None:
        self.folder, self.topic, self.stage = folder, topic, stage
        self.noticed = False

    def on_step_end(self, args, state, control, **kwargs):
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return
        global UPLOAD_SYNC
        UPLOAD_SYNC = True  # every rank saw the notice (a collective): each checkpoint now commits before the next
        control.should_save = True  # step, and one is taken at every step until the deadline ends the group
        if self.noticed:
            return
        self.noticed = True
        if self.folder:
            self.folder.log(
                {
                    "event": "preemption_notice",
                    "topic": self.topic,
                    "stage": self.stage,
                    "step": state.global_step,
                    "preempted_ranks": sorted(info.preempted_ranks),
                    "deadline_ms": info.deadline_ms,
                }
            )
