"""The run folder: the contract between training, eval, report and resume. Pure Python, atomic writes.

<storage>/<run name>/
  spec.yaml            the spec as written (relative paths kept: a rerun resumes from any directory)
  adapters/<topic>/    final adapter per topic (written to a temp name, then renamed)
  checkpoints/         Ray Train checkpoints (resume within a topic)
  metrics.jsonl        one line per logged step/eval
  summary.json         per topic: status, losses, DPO rewards, eval scores, tokens, wall time
  report/              report.md, report.html, *.png
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mindprint_ray.curriculum.topics import read_jsonl
from mindprint_ray.errors import UserError
from mindprint_ray.runs.storage import download_tree, is_s3, local_cache_root, parse_s3, upload_tree
from mindprint_ray.spec.inputs import check_run_name
from mindprint_ray.spec.yaml_lines import load_yaml

if TYPE_CHECKING:
    from mindprint_ray.planning.run_plan import RunPlan

ADAPTER_MANIFEST = "mindprint_manifest.json"


class RunFolder:
    """A local run folder, optionally mirrored to `s3://` (pushed after each durable write)."""

    def __init__(self, root: str | Path, remote: str | None = None) -> None:
        self.root = Path(root).absolute()
        self.remote = remote

    @classmethod
    def for_storage(cls, storage_path: str, name: str) -> RunFolder:
        """`<storage>/<name>`; for `s3://` storage, a local mirror in the cache plus the remote URI.

        The name is checked here too (`inputs.check_run_name`), so no caller can place a run outside storage."""
        check_run_name(name)
        if not is_s3(storage_path):
            return cls(Path(storage_path) / name)
        loc = parse_s3(storage_path).child(name)
        return cls(local_cache_root() / "runs" / loc.bucket / loc.prefix, remote=loc.uri)

    # ---- remote mirror ----------------------------------------------------------------------------
    def pull(self, relative: str = "") -> int:
        """Fetch the remote run folder (or one part) into the local mirror; a no-op for local storage.

        The whole folder means spec, summary, metrics and adapters -- not Ray's checkpoints."""
        if not self.remote:
            return 0
        loc = parse_s3(self.remote)
        parts = [relative] if relative else ["spec.yaml", "summary.json", "metrics.jsonl", "adapters/"]
        return sum(download_tree(loc, self.root, part) for part in parts)

    def refresh(self) -> None:
        """For each node of a worker group, which after a restart may hold none of the run: the remote's summary
        and published adapters (so every rank sees the same finished topics), and its metrics when they are
        longer than this mirror's (the node that wrote more since the last push keeps its own). A no-op for
        local storage."""
        if not self.remote:
            return
        self.pull("summary.json")
        download_tree(parse_s3(self.remote), self.root, "adapters/", skip_same_size=True)
        with tempfile.TemporaryDirectory() as tmp:
            theirs = RunFolder(tmp, self.remote)
            theirs.pull("metrics.jsonl")
            mine = self.metrics_file
            if theirs.metrics_file.is_file() and (
                not mine.is_file() or theirs.metrics_file.stat().st_size > mine.stat().st_size
            ):
                mine.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(theirs.metrics_file, mine)

    def push(self, relative: str = "") -> int:
        """Upload (verified, retried) a file or folder of the run to the remote; a no-op for local storage."""
        if not self.remote:
            return 0
        return upload_tree(self.root, parse_s3(self.remote), relative)

    def ensure_adapter(self, topic: str) -> Path:
        """The topic's adapter on local disk (fetched from the remote when another node wrote it)."""
        if not self.topic_done(topic):
            self.pull(f"adapters/{topic}")
        return self.adapter_dir(topic)

    # ---- layout --------------------------------------------------------------------------------
    @property
    def spec_file(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def adapter_dir(self, topic: str) -> Path:
        return self.adapters / topic

    # ---- spec ------------------------------------------------------------------------------------
    def claim(self, spec_yaml: str, force: bool = False) -> bool:
        """Write the resolved spec; refuse a reused name with a different spec unless forced.

        Returns True when this is a resume of an existing run."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.spec_file.is_file():
            old = load_yaml(self.spec_file)
            new = yaml.safe_load(spec_yaml)
            if old != new and not force:
                diff = sorted(_diff(old, new))
                raise UserError(
                    f"run '{self.root.name}' already exists with a different spec ({', '.join(diff[:4])}"
                    f"{' ...' if len(diff) > 4 else ''} changed)",
                    file=self.spec_file,
                    hint="pick another --name, or add --force to continue this run with the new spec",
                )
            atomic_write(self.spec_file, spec_yaml)
            self.push("spec.yaml")
            return True
        atomic_write(self.spec_file, spec_yaml)
        self.push("spec.yaml")
        return False

    # ---- adapters ----------------------------------------------------------------------------------
    def topic_done(self, topic: str) -> bool:
        """A topic is finished exactly when its adapter folder is complete (it has its manifest)."""
        return (self.adapter_dir(topic) / ADAPTER_MANIFEST).is_file()

    def staging_dir(self, topic: str) -> Path:
        self.adapters.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{topic}.", dir=self.adapters))

    def publish_adapter(self, topic: str, staging: Path, manifest: dict) -> Path:
        """Add the manifest last, then rename the staging folder into place."""
        (staging / ADAPTER_MANIFEST).write_text(json.dumps(manifest, indent=2))
        final = self.adapter_dir(topic)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        self.push(f"adapters/{topic}")
        return final

    # ---- metrics and summary -------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl, one record per line; a line that is not a JSON object is a UserError naming it."""
        if not self.metrics_file.is_file():
            return []
        if not self.metrics_file.read_bytes().strip():
            return []
        return [record for _, record in read_jsonl(self.metrics_file)]

    def summary(self) -> dict:
        """summary.json (an empty summary when the run has none yet); a malformed one is a UserError naming it."""
        if not self.summary_file.is_file():
            return {"run": self.root.name, "topics": {}}
        try:
            data = json.loads(self.summary_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise UserError(
                f"not a readable summary: {e}",
                file=self.summary_file,
                hint="the run folder was changed by hand; restore summary.json or start a new run",
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("topics", {}), dict):
            raise UserError(
                "not a run summary (a JSON object with `topics`)",
                file=self.summary_file,
                hint="pass the folder `train` wrote: <storage>/<run name>",
            )
        return data

    def update_topic(self, topic: str, **fields) -> dict:
        summary = self.summary()
        entry = summary.setdefault("topics", {}).setdefault(topic, {})
        _deep_update(entry, fields)
        atomic_write(self.summary_file, json.dumps(summary, indent=2, default=_jsonable))
        self.push("summary.json")
        return summary

    def update_summary(self, **fields) -> dict:
        summary = self.summary()
        _deep_update(summary, fields)
        atomic_write(self.summary_file, json.dumps(summary, indent=2, default=_jsonable))
        self.push("summary.json")
        return summary

    # ---- finishing (both backends) -------------------------------------------------------------------
    def stop_stage(self, topic: str, stage: str, bad: tuple[str, float, int]) -> str:
        """The NaN/inf guard stopped `stage` of `topic`: mark the topic failed, log the guard; returns the message
        the backend stops the run with (finished topics and their adapters are kept)."""
        message = stopped_message(topic, stage, bad)
        self.update_topic(topic, status="failed", error=message)
        self.log({"event": "nan_guard", "topic": topic, "stage": stage, "key": bad[0], "step": bad[2]})
        return message

    def finish_topic(self, topic: str, wall_s: float, stages: Iterable[dict]) -> None:
        """A topic's adapter is published: record it as done with the tokens its stages (summaries) trained, and
        push the metrics (and TensorBoard logs) to the remote, so `calibrate` and `report` work on a pulled run
        folder whichever backend trained it."""
        tokens = sum(s.get("tokens") or 0 for s in stages)
        self.update_topic(
            topic, status="done", wall_s=round(wall_s, 2), tokens=tokens, adapter=str(self.adapter_dir(topic))
        )
        self.log({"event": "topic_done", "topic": topic, "wall_s": wall_s})
        self.push("metrics.jsonl")
        if (self.root / "tensorboard").is_dir():
            self.push("tensorboard")

    def finish_run(self, wall_s: float) -> None:
        """Every topic is done: record the run's wall time and push the last metrics."""
        self.update_summary(status="done", wall_s=round(wall_s, 2))
        self.log({"event": "run_done", "wall_s": wall_s})
        self.push("metrics.jsonl")


def stopped_message(topic: str, stage: str, bad: tuple[str, float, int]) -> str:
    """What the NaN/inf guard says when `bad` (key, value, step) stopped a stage, with the remedies."""
    key, value, step = bad
    return (
        f"topic '{topic}': {stage} {key} became {value} at step {step}; the topic was stopped and the last good "
        f"adapter is kept. Remedies: lower {stage}.learning_rate, raise warmup, keep max_grad_norm at 0.3"
    )


def adapter_manifest(run: RunPlan, topic: str, adapter_format: str, **extra) -> dict:
    """The manifest a topic's adapter folder is published with (its presence marks the topic done)."""
    return {
        "topic": topic,
        "run": run.spec.name,
        "model": run.model_path,
        "zones": [z.name for z in run.zones.zones],
        "trainable_params": run.zones.trainable_params(),
        "format": adapter_format,
        **extra,
        "created": time.time(),
    }


def claim_run_folder(spec, force: bool = False) -> tuple[RunFolder, bool]:
    """The run folder of `spec` (a RunSpec), pulled from the remote and claimed with the spec as the user wrote it:
    relative paths stay relative in spec.yaml, so the same command from another working directory (a new Ray job's
    working_dir, another checkout) resumes instead of being refused as a different spec. Returns (folder, resumed)."""
    folder = RunFolder.for_storage(spec.storage.path, spec.name)
    folder.pull()  # resuming an s3:// run on a fresh machine
    return folder, folder.claim(spec.dump(), force)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _deep_update(target: dict, fields: dict) -> None:
    for k, v in fields.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _deep_update(target[k], v)
        else:
            target[k] = v


def _diff(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in set(old) | set(new):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
