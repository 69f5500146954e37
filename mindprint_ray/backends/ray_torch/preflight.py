"""Preflight: what must hold before a job uses cluster resources (also run at job start)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from mindprint_ray.curriculum.validation import validate_run
from mindprint_ray.errors import UserError
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.runs.storage import check_access, is_s3, parse_s3
from mindprint_ray.spec.yaml_lines import load_yaml

MIB = 1024 * 1024
RAY_UPLOAD_LIMIT = int(os.environ.get("RAY_max_grpc_message_size", 512 * MIB))  # Ray's GCS package limit
UPLOAD_WARNING = 100 * MIB


@dataclass
class PreflightReport:
    checks: list[tuple[str, str]] = field(default_factory=list)  # (check, result)

    def ok(self, check: str, result: str) -> None:
        self.checks.append((check, result))


def check_storage(run: RunPlan) -> str:
    path = run.spec.storage.path
    if is_s3(path):
        loc = parse_s3(path)
        check_access(loc)
        return f"{loc.uri} is writable"
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".mindprint-preflight-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"storage folder is not writable: {e.strerror}",
            field="storage.path",
            hint="choose a writable folder or an s3:// path",
        ) from None
    return f"{folder.absolute()} is writable"


def runtime_env_excludes(path: Path) -> list[str]:
    """The `excludes` of a Ray runtime env file (none when the file is absent)."""
    if not path.is_file():
        return []
    data = load_yaml(path, hint="check --runtime-env") or {}
    if not isinstance(data, dict):
        raise UserError(
            "a runtime env must be a YAML mapping",
            file=path,
            field="--runtime-env",
            hint="see cluster/runtime_env.yaml",
        )
    excludes = data.get("excludes") or []
    if not isinstance(excludes, list) or not all(isinstance(e, str) and e.strip() for e in excludes):
        raise UserError(
            "must be a list of path patterns", file=path, field="excludes", hint="e.g. excludes: [runs/, models/]"
        )
    return excludes


def working_dir_files(root: Path, excludes: list[str]) -> list[Path]:
    """The files `ray job submit --working-dir` uploads: git's view (it honours .gitignore) minus excludes."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [root / f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in root.rglob("*") if p.is_file()]
    keep = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if any(rel == e.strip("/") or rel.startswith(e.strip("/") + "/") or Path(rel).match(e) for e in excludes):
            continue
        if f.is_file():
            keep.append(f)
    return keep


def check_working_dir(root: Path, runtime_env: Path) -> str:
    if not root.is_dir():
        raise UserError(
            "the working dir is not a folder",
            file=root,
            field="--working-dir",
            hint="pass the folder `ray job submit --working-dir` uploads (the repository root)",
        )
    files = working_dir_files(root, runtime_env_excludes(runtime_env))
    size = sum(f.stat().st_size for f in files)
    if size >= RAY_UPLOAD_LIMIT:
        biggest = sorted(files, key=lambda f: f.stat().st_size, reverse=True)[:3]
        raise UserError(
            f"the working dir is {size / MIB:.1f} MiB, over Ray's upload limit of {RAY_UPLOAD_LIMIT / MIB:.0f} MiB",
            file=root,
            hint="add large paths to `excludes` in cluster/runtime_env.yaml or .gitignore; largest: "
            + ", ".join(f"{f.relative_to(root)} ({f.stat().st_size / MIB:.1f} MiB)" for f in biggest),
        )
    note = " (over 100 MiB: consider excluding more)" if size > UPLOAD_WARNING else ""
    return f"{len(files)} files, {size / MIB:.2f} MiB to upload (limit {RAY_UPLOAD_LIMIT / MIB:.0f} MiB){note}"


def check_gpus(run: RunPlan) -> str:
    """GPUs the cluster (or this machine) offers against what the profile needs."""
    needed = run.num_workers if run.profile.use_gpu else 0
    if not needed:
        return "CPU profile: no GPUs needed"
    address = run.spec.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        have = int(ray.cluster_resources().get("GPU", 0))
        where = "the cluster"
    else:
        import torch

        have, where = torch.cuda.device_count(), "this machine"
    if have < needed:
        raise UserError(
            f"profile '{run.profile.name}' needs {needed} GPUs; {where} has {have}",
            field="hardware.profile",
            hint="submit to the GPU cluster (RAY_ADDRESS) or choose a profile that matches",
        )
    return f"{have} GPUs available, {needed} needed"


def preflight(
    run: RunPlan, working_dir: Path | None = None, runtime_env: Path | None = None, check_gpu: bool = True
) -> PreflightReport:
    report = PreflightReport()
    topics, rows, _ = validate_run(run)
    report.ok(
        "data",
        f"{len(topics)} topics, {sum(r.sft for r in rows)} SFT and {sum(r.dpo for r in rows)} DPO examples valid",
    )
    report.ok("storage", check_storage(run))
    if working_dir is not None:
        report.ok(
            "working dir", check_working_dir(working_dir, runtime_env or working_dir / "cluster/runtime_env.yaml")
        )
    if check_gpu:
        report.ok("gpus", check_gpus(run))
    return report
