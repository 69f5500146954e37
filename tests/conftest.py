"""Shared fixtures: the CLI as a real subprocess, small specs and data written to tmp folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "data" / "curriculum"


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m mindprint_ray ARGS` as a user would; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mindprint_ray", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


RAY_SNAPSHOT = "checkpoints/checkpoint_manager_snapshot.json"  # Ray Train's record of a run's committed checkpoints


def committed_checkpoints(run: Path | str, s3=None) -> str:
    """Ray Train's checkpoint manager snapshot of a run as text ("" before its first commit): `run` is a local run
    folder, or with `s3` (a boto3 client) the "bucket/prefix" of an s3:// one, where Ray writes it directly."""
    if s3 is None:
        path = Path(run) / RAY_SNAPSHOT
        return path.read_text() if path.is_file() else ""
    bucket, _, prefix = str(run).partition("/")
    try:
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{RAY_SNAPSHOT}")["Body"]
    except s3.exceptions.NoSuchKey:
        return ""
    return body.read().decode()


def sft_losses(rows: list[dict], topic: str, since: float = 0.0) -> dict[int, float]:
    """A topic's SFT loss by step from a run's metrics rows, logged at or after `since` (a time.time())."""
    return {
        r["step"]: r["loss"]
        for r in rows
        if r.get("topic") == topic and r.get("stage") == "sft" and "loss" in r and r["time"] >= since
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_row(q: str = "What is a cycle low?", a: str = "I think it is the lowest point of the cycle.") -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def dpo_row(q: str = "Where are we in the cycle?") -> dict:
    return {
        "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": "In my view we are early in the daily cycle."}],
        "rejected": [{"role": "assistant", "content": "Prices go up."}],
    }


def eval_row(i: int = 1) -> dict:
    return {
        "id": f"q{i}",
        "question": "What confirms a cycle low?",
        "reference": "A trend line break.",
        "key_facts": ["trend line break"],
    }


PERSONA = {"name": "T", "lexicon": ["cycle low"], "voice_markers": {"hedges": ["I think"], "confidence": ["clearly"]}}


def make_data(root: Path, topics=("alpha", "beta"), n: int = 4) -> Path:
    """A small valid curriculum: each topic with sft, dpo and eval files, plus a persona."""
    for t in topics:
        write_jsonl(root / t / "sft.jsonl", [sft_row(f"Question {i} on {t}?") for i in range(n)])
        write_jsonl(root / t / "dpo.jsonl", [dpo_row(f"Prompt {i} on {t}?") for i in range(n)])
        write_jsonl(root / t / "eval.jsonl", [eval_row(i) for i in range(n)])
    (root / "persona.yaml").write_text(yaml.safe_dump(PERSONA))
    return root


def make_spec(path: Path, data_dir: Path, topics=("alpha", "beta"), **sections) -> Path:
    spec = {
        "name": "t",
        "model": {"name": "tiny", "path": str(path.parent / "no-model")},
        "curriculum": {"data_dir": str(data_dir), "topics": list(topics)},
        "hardware": {"profile": "cpu-2"},
    }
    for key, value in sections.items():
        spec.setdefault(key, {}).update(value) if isinstance(value, dict) else spec.__setitem__(key, value)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return make_data(tmp_path / "data")


@pytest.fixture
def spec_file(tmp_path: Path, data_dir: Path) -> Path:
    return make_spec(tmp_path / "run.yaml", data_dir)


def tiny_model_key() -> str:
    """A digest of what writes the tiny model: the package's sources, the sample corpus and the pinned versions."""
    import hashlib

    digest = hashlib.sha256()
    sources = [*(ROOT / "mindprint_ray").rglob("*.py"), *SAMPLE_DATA.rglob("*"), ROOT / "constraints.txt"]
    for path in sorted(p for p in sources if p.is_file()):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny model built from the sample corpus (about a minute), once for both pytest runs of `make test` and
    their reruns: kept in .cache/test-models under the digest of its sources, built under a file lock and moved
    into place whole. Tests read it; a test that changes a model copies it first."""
    import fcntl
    import shutil

    from mindprint_ray.models.tiny import write_tiny_model

    cache = ROOT / ".cache" / "test-models"
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"tiny-{tiny_model_key()}"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "tokenizer.json").is_file():
            for stale in cache.glob("*tiny-*"):  # builds of older sources, or one a killed run left half written
                shutil.rmtree(stale)
            building = cache / f".building-tiny-{os.getpid()}"
            write_tiny_model(building, SAMPLE_DATA).rename(out)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> None:
    import socket
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory):
    """A real moto S3 server on 127.0.0.1, with the AWS environment pointing at it."""
    import signal

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_port(port)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "MINDPRINT_CACHE": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real sample model (SmolLM2-135M-Instruct), converted once into models/smollm2 and reused."""
    from mindprint_ray.models.sample import ensure_sample_model

    return ensure_sample_model(ROOT / "models" / "smollm2")
