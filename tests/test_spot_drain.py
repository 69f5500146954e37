"""cluster/spot_drain.py against a fake IMDSv2 on 127.0.0.1 and a fake `ray` on PATH that records its argv:
no Ray, no network. The daemon runs as it does on a node (a subprocess, its own argv parsing and defaults)."""

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

SCRIPT = ROOT / "cluster" / "spot_drain.py"
NODE_ID = "ab" * 28  # a Ray node id is 28 bytes, 56 hex characters
ADDRESS = "10.0.0.5:6379"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"


def load_daemon():
    spec = importlib.util.spec_from_file_location("spot_drain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["spot_drain"] = module
    spec.loader.exec_module(module)
    return module


spot_drain = load_daemon()


class FakeImds:
    """IMDSv2: PUT /latest/api/token hands out a token; GETs of the notice without it get 401. The notice GETs
    are answered from `answers` in order (None: 404), the last one repeated; `reject` 401s the next GETs."""

    def __init__(self, answers: list[str | None], reject: int = 0) -> None:
        self.answers, self.reject, self.tokens, self.requests = list(answers), reject, [], []
        self.lock = threading.Lock()
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                with imds.lock:
                    imds.requests.append(("PUT", self.path, {k.lower(): v for k, v in self.headers.items()}))
                    if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                        return self.reply(400)
                    imds.tokens.append(f"token-{len(imds.tokens) + 1}")
                    self.reply(200, imds.tokens[-1])

            def do_GET(self):
                with imds.lock:
                    imds.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                    token = self.headers.get("X-aws-ec2-metadata-token")
                    if not imds.tokens or token != imds.tokens[-1]:
                        return self.reply(401)
                    if imds.reject:
                        imds.reject -= 1
                        imds.tokens.append("expired")  # the next GET must bring a fresh token
                        return self.reply(401)
                    if self.path != NOTICE_PATH:
                        return self.reply(404)
                    answer = imds.answers.pop(0) if len(imds.answers) > 1 else imds.answers[0]
                    if answer is None:
                        return self.reply(404, "Not Found")
                    self.reply(200, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self) -> list[dict]:
        with self.lock:
            return [headers for method, path, headers in self.requests if method == "GET" and path == NOTICE_PATH]

    def puts(self) -> list[dict]:
        with self.lock:
            return [headers for method, _, headers in self.requests if method == "PUT"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def imds_factory():
    servers = []

    def make(answers, reject=0):
        servers.append(FakeImds(answers, reject))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def fake_ray(tmp_path) -> Path:
    """A `ray` on PATH that appends {"argv", "time"} to calls.jsonl; its first FAKE_RAY_FAILURES calls fail."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ray = bin_dir / "ray"
    ray.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time\n"
        "log = os.environ['FAKE_RAY_LOG']\n"
        "done = sum(1 for _ in open(log)) if os.path.exists(log) else 0\n"
        "with open(log, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'time': time.time()}) + '\\n')\n"
        "if done < int(os.environ.get('FAKE_RAY_FAILURES', '0')):\n"
        "    print('drain refused: GCS unreachable', file=sys.stderr)\n"
        "    sys.exit(1)\n"
    )
    ray.chmod(0o755)
    return tmp_path / "calls.jsonl"


def start_daemon(tmp_path: Path, imds: FakeImds, calls: Path, failures: int = 0) -> subprocess.Popen:
    env = {
        **os.environ,
        "PATH": f"{calls.parent / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "FAKE_RAY_LOG": str(calls),
        "FAKE_RAY_FAILURES": str(failures),
        "SPOT_DRAIN_IMDS_URL": imds.url,
        "SPOT_DRAIN_POLL_S": "0.1",
        "SPOT_DRAIN_PIDFILE": str(tmp_path / "spot_drain.pid"),
    }
    env.pop("SPOT_DRAIN_NODE_ID", None)
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, str(SCRIPT), "--address", ADDRESS, "--node-id", NODE_ID]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(daemon: subprocess.Popen, timeout: float = 15) -> tuple[int, str]:
    out, _ = daemon.communicate(timeout=timeout)
    return daemon.returncode, out


def stop(daemon: subprocess.Popen) -> str:
    daemon.terminate()
    out, _ = daemon.communicate(timeout=10)
    return out


def recorded(calls: Path) -> list[dict]:
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def notice(action: str = "terminate", in_s: int = 120) -> tuple[str, str, float]:
    moment = datetime.fromtimestamp(int(time.time()) + in_s, UTC)
    when = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps({"action": action, "time": when}), when, moment.timestamp()


def expected_argv(action: str, when: str) -> list[str]:
    return [
        "drain-node",
        "--address",
        ADDRESS,
        "--node-id",
        NODE_ID,
        "--reason",
        "DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message",
        f"EC2 spot instance-action {action} at {when}",
        "--deadline-remaining-seconds",
    ]


def test_a_notice_after_404s_drains_once_with_the_notice_deadline(tmp_path, imds_factory, fake_ray):
    body, when, at = notice("terminate", 120)
    imds = imds_factory([None, None, None, body])
    rc, out = finish(start_daemon(tmp_path, imds, fake_ray))
    assert rc == 0, out
    (call,) = recorded(fake_ray)  # exactly one drain, and the daemon is gone: no second one can follow
    assert call["argv"][:-1] == expected_argv("terminate", when)
    deadline = int(call["argv"][-1])
    assert 110 <= deadline <= 120 and abs(call["time"] + deadline - at) <= 1.0
    gets = imds.gets()
    assert len(gets) == 4  # three 404s, then the notice; no poll after the drain
    assert all(g["x-aws-ec2-metadata-token"] == "token-1" for g in gets)  # IMDSv2: every GET carries the token
    assert len(imds.puts()) == 1 and imds.puts()[0]["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert "spot notice: terminate" in out and "drained" in out


def test_404s_never_drain(tmp_path, imds_factory, fake_ray):
    imds = imds_factory([None])
    daemon = start_daemon(tmp_path, imds, fake_ray)
    time.sleep(1.5)
    assert daemon.poll() is None  # still watching
    out = stop(daemon)
    assert len(imds.gets()) >= 5 and recorded(fake_ray) == [], out
    assert "malformed" not in out and "draining" not in out


def test_a_malformed_notice_is_logged_once_and_ignored(tmp_path, imds_factory, fake_ray):
    body, when, _ = notice("stop", 60)
    bad = '{"action": "explode", "time": "2026-12-02T10:00:00Z"}'
    imds = imds_factory([None, "<html>not json</html>", bad, bad, bad, body])
    rc, out = finish(start_daemon(tmp_path, imds, fake_ray))
    assert rc == 0, out
    assert out.count("malformed") == 2 and "explode" in out and "not JSON" in out  # one line per distinct body
    (call,) = recorded(fake_ray)
    assert call["argv"][:-1] == expected_argv("stop", when)


def test_only_malformed_notices_never_drain(tmp_path, imds_factory, fake_ray):
    imds = imds_factory(['{"action": "terminate", "time": "in two minutes"}'])
    daemon = start_daemon(tmp_path, imds, fake_ray)
    time.sleep(1.2)
    out = stop(daemon)
    assert len(imds.gets()) >= 4 and recorded(fake_ray) == []
    assert out.count("malformed") == 1 and "ISO 8601" in out


def test_an_expired_token_is_renewed(tmp_path, imds_factory, fake_ray):
    body, when, _ = notice()
    imds = imds_factory([None, body], reject=1)
    rc, out = finish(start_daemon(tmp_path, imds, fake_ray))
    assert rc == 0, out
    assert len(imds.puts()) == 2  # the 401 dropped the first token
    assert len(recorded(fake_ray)) == 1


def test_a_failed_drain_is_retried_until_it_succeeds(tmp_path, imds_factory, fake_ray):
    body, when, _ = notice()
    imds = imds_factory([body])
    rc, out = finish(start_daemon(tmp_path, imds, fake_ray, failures=1))
    assert rc == 0, out
    calls = recorded(fake_ray)
    assert len(calls) == 2 and calls[0]["argv"][:-1] == calls[1]["argv"][:-1] == expected_argv("terminate", when)
    assert "ray drain-node failed (exit 1): drain refused: GCS unreachable" in out


def test_a_newer_daemon_takes_over(tmp_path, imds_factory, fake_ray):
    imds = imds_factory([None])
    daemon = start_daemon(tmp_path, imds, fake_ray)
    pidfile = tmp_path / "spot_drain.pid"
    for _ in range(50):
        if pidfile.exists() and pidfile.read_text() == str(daemon.pid):
            break
        time.sleep(0.1)
    pidfile.write_text("999999999")  # what a second start of the daemon writes
    rc, out = finish(daemon)
    assert rc == 0 and "another spot_drain took over" in out and recorded(fake_ray) == []


@pytest.mark.parametrize(
    "body,problem",
    [
        ("", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"time": "2026-12-02T10:00:00Z"}', "action None"),
        ('{"action": "terminate"}', "time None"),
        ('{"action": "terminate", "time": "2026-12-02T10:00:00"}', "no time zone"),
    ],
)
def test_parse_notice_refuses(body, problem):
    with pytest.raises(ValueError, match=problem):
        spot_drain.parse_notice(body)


def test_deadline_is_whole_seconds_left_and_at_least_one():
    parsed = spot_drain.parse_notice('{"action": "hibernate", "time": "2026-12-02T10:00:00Z"}')
    at = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC).timestamp()
    assert spot_drain.deadline_seconds(parsed, at - 119.4) == 119
    assert spot_drain.deadline_seconds(parsed, at - 0.5) == 1
    assert spot_drain.deadline_seconds(parsed, at + 30) == 1  # a late notice still drains


def write_proc(root: Path, pid: int, *argv: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")


def test_the_node_id_comes_from_this_hosts_raylet(tmp_path):
    proc = tmp_path / "proc"
    raylet = "/home/ray/anaconda3/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet"
    write_proc(
        proc, 10, raylet, "--raylet_socket_name=/tmp/ray/s/raylet", f"--node_id={NODE_ID}", "--node_ip_address=x"
    )
    write_proc(proc, 11, "/usr/bin/python", "default_worker.py", "--node_id=ff")  # a worker, not the raylet
    (proc / "self").mkdir()
    assert spot_drain.raylet_node_ids(proc) == [NODE_ID]
    assert spot_drain.local_node_id(None, proc) == NODE_ID
    assert spot_drain.local_node_id("cd" * 28, proc) == "cd" * 28  # --node-id wins
    write_proc(proc, 12, raylet, "--node_id=" + "ef" * 28)
    assert spot_drain.local_node_id(None, proc) is None  # two raylets: refuse to guess
    assert spot_drain.local_node_id(None, tmp_path / "empty") is None


def test_aws_cluster_files_start_the_daemon_on_spot_workers():
    files = sorted((ROOT / "cluster").glob("aws-*.yaml"))
    assert files
    for path in files:
        cluster = yaml.safe_load(path.read_text())
        head = cluster["head_node_type"]
        workers = [n for k, n in cluster["available_node_types"].items() if k != head]
        if not any(w["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for w in workers):
            continue
        mount = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
        commands = cluster["worker_start_ray_commands"]
        start = next(i for i, c in enumerate(commands) if c.startswith("ray start --address="))
        daemon = [c for c in commands[start + 1 :] if "spot_drain.py" in c]
        assert len(daemon) == 1, path.name
        assert daemon[0].startswith(f"nohup python {mount}/cluster/spot_drain.py --address=$RAY_HEAD_IP:6379 ")
        assert daemon[0].endswith("&") and ">/tmp/spot_drain.log 2>&1 </dev/null" in daemon[0], path.name
        assert not any("spot_drain" in c for c in cluster["head_start_ray_commands"])  # the head is on demand
