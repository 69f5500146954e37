"""The Ray Train V2 driver: validate everything, claim the run folder, build the TorchTrainer and fit."""

from __future__ import annotations

import _thread
import importlib.util
import json
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from mindprint_ray.cli.views import progress_columns
from mindprint_ray.curriculum.chat_template import check_tokenizer
from mindprint_ray.curriculum.validation import validate_run
from mindprint_ray.errors import UserError
from mindprint_ray.models.tiny import ensure_run_model
from mindprint_ray.planning.multinode import placement_strategy
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.report import write_report
from mindprint_ray.runs.lease import hold, lease_ttl_s
from mindprint_ray.runs.run_folder import RunFolder, claim_run_folder
from mindprint_ray.runs.storage import parse_s3, pyarrow_filesystem

log = logging.getLogger("mindprint_ray")
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray Train's print patch logs even prints a library captures (dill's bytecode disassembly while
    # `datasets` hashes functions): keep plain prints.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def train_log_level() -> str:
    """Ray Train's console log level: WARNING unless MINDPRINT_RAY_TRAIN_LOG_LEVEL says otherwise."""
    return os.environ.get("MINDPRINT_RAY_TRAIN_LOG_LEVEL", "WARNING").upper()


def check_trackers(report_to: list[str]) -> None:
    """MLflow and W&B are optional: say so before Ray starts rather than fail inside every worker."""
    for tracker, module in (("mlflow", "mlflow"), ("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if tracker in report_to and importlib.util.find_spec(module) is None:
            raise UserError(
                f"report_to names {tracker}, which is not installed",
                field="report_to",
                hint=f"pip install {module} (credentials from the environment, e.g. WANDB_API_KEY), "
                "or remove it from report_to",
            )


def for_workers(run: RunPlan) -> RunPlan:
    """Workers run in other folders: a copy of the run whose spec's local paths are absolute, for the spec that
    travels to them. The caller's run keeps the paths as written (they are what spec.yaml stores and compares)."""
    spec = run.spec.model_copy(deep=True)
    cur = spec.curriculum
    if "://" not in cur.data_dir:
        cur.data_dir = str(Path(cur.data_dir).absolute())
    if cur.persona and "://" not in cur.persona:
        cur.persona = str(Path(cur.persona).absolute())
    if spec.model.path and Path(spec.model.path).exists():
        spec.model.path = str(Path(spec.model.path).absolute())
    if "://" not in spec.storage.path:
        spec.storage.path = str(Path(spec.storage.path).absolute())
    if spec.eval.general_text:
        spec.eval.general_text = str(Path(spec.eval.general_text).absolute())
    return replace(run, spec=spec)


def check_run_template(run: RunPlan, topics: list) -> None:
    """The chat template as the workers will load it (transformers, local or hub): it must split every
    conversation into turns and close assistant turns with a special token, or Ray never starts."""
    from mindprint_ray.backends.ray_torch.model_loading import load_tokenizer

    check_tokenizer(load_tokenizer(run), topics, run.spec.curriculum.system_prompt, f"{run.model_path} (chat template)")


def init_ray(run: RunPlan) -> None:
    """Join the named cluster (spec, RAY_ADDRESS or a job's environment); otherwise start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = run.spec.ray.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": WORKER_ENV}  # the Train workers also get it from RunConfig.worker_runtime_env
    if address:  # a submitted job already carries its runtime env (cluster/runtime_env.yaml): keep it
        ray.init(address=address, log_to_driver=True)
    else:
        needed = run.num_workers * run.profile.cpus_per_worker  # the full group (an elastic one's max)
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, needed),
            include_dashboard=run.spec.ray.dashboard,
            dashboard_host="127.0.0.1",
            runtime_env=env,
            log_to_driver=True,
        )


def checkpoint_storage(folder: RunFolder) -> tuple[str, object | None]:
    """Where Ray Train keeps checkpoints: `<run>/checkpoints`, through pyarrow S3 for `s3://` runs."""
    if not folder.remote:
        return str(folder.root), None
    loc = parse_s3(folder.remote)
    return f"{loc.bucket}/{loc.prefix}", pyarrow_filesystem()


def build_trainer(run: RunPlan, folder: RunFolder, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mindprint_ray.backends.ray_torch.topic_loop import train_loop

    profile = run.profile
    storage_path, filesystem = checkpoint_storage(folder)
    resources = {"CPU": profile.cpus_per_worker, **({"GPU": 1} if profile.use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": run.spec.model_dump(mode="json")},
        scaling_config=ScalingConfig(
            # [min, max]: Ray Train V2's elastic group (each stage keeps its global batch: planning/elastic.py)
            num_workers=run.num_workers if run.worker_range[0] == run.worker_range[1] else run.worker_range,
            use_gpu=profile.use_gpu,
            resources_per_worker=resources,
            placement_strategy=placement_strategy(run),  # one node (NVLink) when the workers fit; see docs/cluster.md
        ),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(
                max_failures=run.spec.ray.max_failures,
                # a drain with reason PREEMPTION (a spot reclaim) restarts the group from the checkpoint taken
                # at the notice (callbacks.PreemptionCallback) without spending max_failures
                max_preemption_failures=run.spec.ray.max_preemptions,
                preemption_grace_s=run.spec.ray.preemption_grace_s,
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=run.spec.storage.keep_checkpoints),
            callbacks=callbacks,
            # every way a run starts (local cluster, RAY_ADDRESS, a submitted job) gives the workers this env;
            # a job's own runtime env (working_dir, pip) is kept: Ray merges env_vars into it
            worker_runtime_env={"env_vars": {**WORKER_ENV, "MINDPRINT_RAY_TRAIN_LOG_LEVEL": train_log_level()}},
            # Ray Train's INFO lines ("Reporting training result N: ...", one per report) stay in the Ray session
            # logs (/tmp/ray/session_latest/logs/train/), not in the terminal (the workers add topic_loop's
            # console filter for the ones LoggingConfig misses); MINDPRINT_RAY_TRAIN_LOG_LEVEL=INFO shows them
            logging_config=LoggingConfig(log_level=train_log_level()),
        ),
    )


def train(run: RunPlan, force: bool = False, progress: bool = True, force_lease: bool = False) -> RunFolder:
    """Run the whole curriculum; rerunning with the same name resumes. Returns the run folder.

    One driver at a time per run: the run folder's lease (runs/lease.py, local or s3://) is taken after every
    check and before anything is written or Ray starts; a second driver is refused (exit 2), a resubmit after a
    killed driver takes over its expired lease and resumes from the last checkpoint."""
    if run.profile.backend != "ray":
        raise UserError(
            f"hardware profile '{run.profile.name}' trains with MLX",
            field="hardware.profile",
            hint="use `python -m local_mlx train CFG` for Mac profiles",
        )
    from mindprint_ray.backends.ray_torch.preflight import check_gpus, check_storage

    check_trackers(run.spec.report_to)
    ensure_run_model(run)
    topics, _, _ = validate_run(run)  # everything is validated before Ray starts
    check_run_template(run, topics)
    check_storage(run)
    check_gpus(run)
    lease_folder = RunFolder.for_storage(run.spec.storage.path, run.spec.name)
    with hold(lease_folder, force=force_lease, ttl_s=lease_ttl_s(), on_lost=_thread.interrupt_main) as lease:
        folder = train_leased(run, topics, force, progress)
        lease.check()
    return folder


def train_leased(run: RunPlan, topics: list, force: bool, progress: bool) -> RunFolder:
    """`train` once the run's lease is held."""
    folder, resumed = claim_run_folder(run.spec, force)  # the spec as written, from any working directory
    pending = [t.name for t in topics if not folder.topic_done(t.name)]
    folder.update_summary(
        run=run.spec.name,
        model=run.model_path,
        profile=run.profile.name,
        topics_order=[t.name for t in topics],
        stopped=None,
    )
    if not pending:
        log.info("every topic of %s is done", run.spec.name)
        return folder
    folder.log({"event": "run_start", "resumed": resumed, "pending": pending, "workers": run.num_workers})
    init_ray(run)
    trainer = build_trainer(for_workers(run), folder)
    watcher = ProgressWatcher(folder, pending) if progress else None
    t0 = time.time()
    try:
        if watcher:
            watcher.start()
        trainer.fit()
    except Exception as e:  # our own errors from the workers arrive inside Ray's WorkerGroupError
        stop = worker_stop(e)
        if stop:
            raise stop from None
        raise
    finally:
        if watcher:
            watcher.stop()
    folder.pull("summary.json")  # the workers' latest (another node may have written it)
    folder.pull("metrics.jsonl")
    stopped = folder.summary().get("stopped")
    if stopped:
        folder.update_summary(status="stopped")
        raise UserError(
            f"training stopped: {stopped}",
            hint="finished topics are kept; fix the cause and rerun "
            "the same command (add --force if you change the spec)",
        )
    folder.finish_run(time.time() - t0)
    write_run_report(run, folder)
    return folder


def write_run_report(run: RunPlan, folder: RunFolder) -> None:
    """The run's report: estimates for its hardware beside what was measured, and the evaluation."""
    write_report(run, folder.report_dir, which=run.profile.name, run_dir=str(folder.root))
    folder.push("report")


def worker_stop(error: Exception) -> UserError | None:
    """The run's stop when a worker raised one of our own errors: a UserError as raised (file, field and hint
    survive pickling), or a guard's TrainingStopped / an out-of-memory stop with its remedies. Read from Ray
    Train's structured failure (WorkerGroupError.worker_failures: rank -> the worker's exception), never from
    its text. Anything else (a crash, a lost node) is Ray's to retry and gives None."""
    from mindprint_ray.backends.ray_torch.topic_loop import OutOfMemoryStop, TrainingStopped

    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        failure = failures[rank]
        if isinstance(failure, UserError):
            return failure
        if isinstance(failure, TrainingStopped | OutOfMemoryStop):
            return UserError(str(failure))
    return None


class ProgressWatcher:
    """Follows metrics.jsonl and shows a rich progress bar per stage while Ray trains."""

    def __init__(self, folder: RunFolder, topics: list[str]) -> None:
        self.folder, self.topics = folder, topics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        from rich.progress import Progress

        offset, tasks = 0, {}
        with Progress(*progress_columns(), refresh_per_second=2) as bar:
            while not self._stop.wait(0.5):
                if not self.folder.metrics_file.is_file():
                    continue
                with self.folder.metrics_file.open() as f:
                    f.seek(offset)
                    lines = f.readlines()
                    offset = f.tell()
                for line in lines:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue
                    key = (r.get("topic"), r.get("stage"))
                    if r.get("event") == "stage_start":
                        tasks[key] = bar.add_task(f"{key[0]} {key[1]}", total=r["max_steps"], info="")
                        bar.update(tasks[key], completed=r.get("step", 0))
                    elif key in tasks and "loss" in r:
                        info = f"loss {r['loss']:.3f}"
                        if "rewards/accuracies" in r:
                            info += f"  reward acc {r['rewards/accuracies']:.2f}"
                        bar.update(tasks[key], completed=r["step"], info=info)
