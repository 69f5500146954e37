"""`ray job submit` to a real local Ray head (token authentication on), as the README shows."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, wait_for_port

pytestmark = [pytest.mark.slow, pytest.mark.ray_cluster]
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
    """The head refuses a client with no token (401) or a wrong one (403), and answers the right one: the refusal
    is the token check, not an unreachable address."""
    address, env = ray_head

    def job_list(**changes):
        client = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | changes
        cmd = [str(BIN / "ray"), "job", "list", "--address", address]
        return subprocess.run(cmd, env=client, capture_output=True, text=True, timeout=120)

    missing = job_list(RAY_AUTH_MODE="disabled")
    assert missing.returncode != 0 and "Authentication required" in missing.stdout + missing.stderr
    wrong = job_list(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32)
    assert wrong.returncode != 0 and "Authentication failed" in wrong.stdout + wrong.stderr
    right = job_list(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=env["RAY_AUTH_TOKEN"])
    assert right.returncode == 0, right.stderr[-2000:]


def readme_block(name: str) -> str:
    """The shell block between `<!-- NAME:start -->` and `<!-- NAME:end -->` in README.md, without its fences."""
    text = (ROOT / "README.md").read_text()
    block = text.split(f"<!-- {name}:start -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0]
    return block.strip().removeprefix("```bash").removesuffix("```").strip()


def test_the_readme_local_head_flow_works_as_written(tmp_path):
    """The README's commands, run by bash from a shell whose PATH has no virtualenv (as a new user's has): only
    the ports (free ones, not the defaults) and the storage folder (tmp) are changed."""
    port, dash = free_port(), free_port()
    script = readme_block("local-head")
    assert "source .venv/bin/activate" in script and "python -m mindprint_ray train" in script
    script = script.replace("ray start --head", f"ray start --head --port={port} --dashboard-port={dash}")
    script = script.replace(":8265", f":{dash}").replace("storage.path=$PWD/runs", f"storage.path={tmp_path}")
    venv = str(ROOT / ".venv" / "bin")
    path = ":".join(p for p in os.environ["PATH"].split(":") if p and Path(p).resolve() != Path(venv).resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=path, RAY_USAGE_STATS_ENABLED="0")
    try:
        r = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run([venv + "/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = r.stdout + r.stderr
    assert "succeeded" in out.lower()
    # the workers got WORKER_ENV inside the job, and Ray Train's per-report lines stayed in its log files
    assert "Reporting training result" not in out and "LOAD_GLOBAL" not in out
    summary = json.loads((tmp_path / "local-check" / "summary.json").read_text())
    assert summary["topics"]["capitulation"]["status"] == "done"
    assert (tmp_path / "local-check" / "adapters" / "capitulation" / "adapter_model.safetensors").is_file()
