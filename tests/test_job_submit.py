"""`ray job submit` to a real local Ray head (token authentication on), as the README shows."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, wait_for_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` in its own process group; everything it started is killed afterwards."""
    port, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(dash, timeout=120)
        token = (
            subprocess.run([str(BIN / "ray"), "get-auth-token"], env=env, capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        yield f"http://127.0.0.1:{dash}", {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def test_submit_without_token_is_refused(ray_head):
    address, env = ray_head
    env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN",)}
    env["RAY_AUTH_MODE"] = "disabled"
    r = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0


def test_job_submit_trains_the_tiny_config(ray_head, tmp_path, tiny_model_dir):
    address, env = ray_head
    storage = tmp_path / "runs"
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--working-dir",
        ".",
        "--",
        "python",
        "-m",
        "mindprint_ray",
        "train",
        "configs/tiny-cpu.yaml",
        "--name",
        "job1",
        f"storage.path={storage}",
        f"model.path={tiny_model_dir}",
        "curriculum.topics=[capitulation]",
        "sft.max_steps=4",
        "dpo.steps_per_topic=2",
        "eval.enabled=false",
    ]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    summary = json.loads((storage / "job1" / "summary.json").read_text())
    assert summary["topics"]["capitulation"]["status"] == "done"
    assert (storage / "job1" / "adapters" / "capitulation" / "adapter_model.safetensors").is_file()
    assert time.time() - t0 < 900
