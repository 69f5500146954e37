"""The driver lease on a local folder and on a real moto S3 server: one driver per run, killed drivers expire."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import boto3
import pytest
from conftest import ROOT

from mindprint_ray.errors import UserError
from mindprint_ray.runs.lease import Holder, Lease, hold
from mindprint_ray.runs.run_folder import RunFolder

BUCKET = "mp-lease"

# A driver in its own process: `hold STORAGE NAME TTL` holds the lease until killed. `race STORAGE PERIOD N THREADS`
# prints "ready", reads a start time T0, and at T0 + r * PERIOD (r < N) lets THREADS threads at once try to acquire
# run `race-<r>`; each prints "won r" or "refused r" and keeps what it won.
DRIVER = textwrap.dedent(
    """
    import sys, threading, time
    from mindprint_ray.errors import UserError
    from mindprint_ray.runs.lease import Lease, hold
    from mindprint_ray.runs.run_folder import RunFolder

    mode, storage = sys.argv[1], sys.argv[2]
    if mode == "hold":
        with hold(RunFolder.for_storage(storage, sys.argv[3]), ttl_s=float(sys.argv[4])):
            print("held", flush=True)
            time.sleep(600)
    period, rounds, threads = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    leases = [[Lease.for_folder(RunFolder.for_storage(storage, f"race-{r}"), ttl_s=30) for _ in range(threads)]
              for r in range(rounds)]
    print("ready", flush=True)
    t0 = float(sys.stdin.readline())
    out = threading.Lock()

    def attempt(r, lease):
        time.sleep(max(0.0, t0 + r * period - time.time()))
        try:
            lease.acquire(wait_s=0)
            result = "won"
        except UserError:
            result = "refused"
        with out:
            print(result, r, flush=True)

    for r, round_leases in enumerate(leases):
        workers = [threading.Thread(target=attempt, args=(r, lease)) for lease in round_leases]
        [w.start() for w in workers]
        [w.join() for w in workers]
    """
)


@pytest.fixture(scope="module")
def bucket(moto_s3):
    boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> str:
    """A storage path (local folder, or a fresh prefix on the moto server) that run folders live under."""
    if request.param == "local":
        return str(tmp_path / "runs")
    return f"s3://{request.getfixturevalue('bucket')}/{uuid.uuid4().hex}"


def folder(storage: str, name: str = "run-1") -> RunFolder:
    return RunFolder.for_storage(storage, name)


def lease_bytes(lease: Lease) -> bytes | None:
    seen = lease.store.read()
    return None if seen is None else seen.holder.to_bytes()


@pytest.fixture
def start_driver():
    """Start DRIVER in a subprocess (with this test's AWS environment); any still running at the end is killed."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        started.append(
            subprocess.Popen(
                [sys.executable, "-c", DRIVER, *args],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=dict(os.environ),
            )
        )
        return started[-1]

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_second_acquire_is_refused_then_release_lets_it_in(storage):
    first = Lease.for_folder(folder(storage), ttl_s=5).acquire()
    text = lease_bytes(first).decode()
    assert socket.gethostname() in text and f'"pid": {os.getpid()}' in text and '"ttl_s": 5.0' in text
    assert os.environ.get("AWS_SECRET_ACCESS_KEY", "no-secret-set") not in text  # no credentials in the lease
    second = Lease.for_folder(folder(storage), ttl_s=5)
    with pytest.raises(UserError) as refused:
        second.acquire(wait_s=0)
    message = str(refused.value)
    assert first.store.where in message and message.endswith("when its lease has expired")
    assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in message
    assert "--force-lease" in message and "after 5 s" in message
    first.release()
    assert first.store.read() is None
    second.acquire(wait_s=0)
    assert second.held and second.store.read().holder.token == second.holder.token
    second.release()


def test_an_expired_lease_is_taken_over_after_its_ttl(storage):
    """A lease left by a driver on another host that nobody renews: refused at once, taken over after ttl."""
    lease = Lease.for_folder(folder(storage), ttl_s=5)
    dead = Holder("another-host", 4242, "deadbeef", time.time(), time.time(), ttl_s=1.0)
    lease.store.create(dead.to_bytes())
    with pytest.raises(UserError, match="host another-host, pid 4242"):
        lease.acquire(wait_s=0)
    start = time.monotonic()
    lease.acquire(wait_s=4)
    assert 1.0 <= time.monotonic() - start < 2.5
    assert lease.store.read().holder.token == lease.holder.token
    lease.release()


def test_a_local_lease_past_its_ttl_by_the_holders_clock_is_taken_at_once(tmp_path):
    lease = Lease.for_folder(folder(str(tmp_path)), ttl_s=5)
    old = time.time() - 30
    lease.store.create(Holder(socket.gethostname(), os.getpid(), "0ld", old, old, ttl_s=10).to_bytes())
    start = time.monotonic()
    lease.acquire(wait_s=0)
    assert time.monotonic() - start < 0.5 and lease.held
    lease.release()


def test_an_unreadable_lease_is_a_user_error_naming_it(tmp_path):
    lease = Lease.for_folder(folder(str(tmp_path)))
    lease.store.path.parent.mkdir(parents=True)
    lease.store.path.write_text('{"host": "h", "pid": "not a number"')
    with pytest.raises(UserError, match="not a readable driver lease") as bad:
        lease.acquire(force=True)
    assert str(lease.store.path) in str(bad.value) and "delete the file" in str(bad.value)


def test_renewal_keeps_the_lease_beyond_its_ttl(storage):
    holder = Lease.for_folder(folder(storage), ttl_s=1.0).acquire()
    time.sleep(1.5)
    other = Lease.for_folder(folder(storage), ttl_s=1.0)
    with pytest.raises(UserError):
        other.acquire(wait_s=0)
    start = time.monotonic()
    with pytest.raises(UserError, match="another driver holds this run"):
        other.acquire(wait_s=10)  # refused as soon as it sees a renewal, not after 10 s
    assert time.monotonic() - start < 1.5
    assert holder.held and not holder.lost
    holder.release()
    other.acquire(wait_s=0)
    other.release()


def test_forced_takeover_makes_the_old_holder_lose_it(storage):
    lost = threading.Event()
    old = Lease.for_folder(folder(storage), ttl_s=1.0, on_lost=lost.set).acquire()
    new = Lease.for_folder(folder(storage), ttl_s=1.0).acquire(force=True, wait_s=0)
    assert lost.wait(2.0) and old.lost and not old.held
    with pytest.raises(UserError, match="lost its lease"):
        old.check()
    old.release()  # leaves the new holder's lease alone
    assert new.held and new.store.read().holder.token == new.holder.token
    new.release()
    assert new.store.read() is None


def test_context_manager_releases_on_exception(storage):
    with pytest.raises(KeyboardInterrupt), hold(folder(storage), ttl_s=5):
        raise KeyboardInterrupt
    with hold(folder(storage), ttl_s=5) as lease:
        assert lease.held
    assert lease.store.read() is None


def test_killed_holder_on_this_host_is_taken_over_at_once_locally(tmp_path, start_driver):
    driver = start_driver("hold", str(tmp_path), "run-1", "2")
    assert driver.stdout.readline().strip() == "held"
    lease = Lease.for_folder(folder(str(tmp_path)), ttl_s=2)
    with pytest.raises(UserError, match=f"pid {driver.pid}"):
        lease.acquire(wait_s=0)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    start = time.monotonic()
    lease.acquire(wait_s=0)  # same host, pid gone: no need to wait for the ttl
    assert time.monotonic() - start < 0.5
    lease.release()


def test_killed_holder_on_s3_expires_after_its_ttl(bucket, start_driver):
    storage = f"s3://{bucket}/{uuid.uuid4().hex}"
    driver = start_driver("hold", storage, "run-1", "1")
    assert driver.stdout.readline().strip() == "held"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed = time.monotonic()
    lease = Lease.for_folder(folder(storage), ttl_s=1)
    with pytest.raises(UserError, match=f"pid {driver.pid}"):
        lease.acquire(wait_s=0)  # on S3 a pid says nothing: the lease is live until it expires
    time.sleep(max(0.0, killed + 2.2 - time.monotonic()))
    lease.acquire(wait_s=0)  # the server's clock says it was not renewed for ttl (+1 s of resolution)
    assert lease.store.read().holder.token == lease.holder.token
    lease.release()


def test_sigterm_releases_the_lease(tmp_path, start_driver):
    driver = start_driver("hold", str(tmp_path), "run-1", "30")
    assert driver.stdout.readline().strip() == "held"
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=10) == 128 + signal.SIGTERM
    assert not (tmp_path / "run-1" / "lease.json").exists()


def test_two_drivers_racing_exactly_one_wins(storage, start_driver):
    rounds, period, threads = 4, 0.5, 4
    drivers = [start_driver("race", storage, str(period), str(rounds), str(threads)) for _ in range(2)]
    assert [d.stdout.readline().strip() for d in drivers] == ["ready", "ready"]
    t0 = time.time() + 0.2
    for d in drivers:  # both get the start time before either starts
        d.stdin.write(f"{t0}\n")
        d.stdin.close()
    assert all(d.wait(timeout=30) == 0 for d in drivers)
    outputs = [d.stdout.read().split("\n") for d in drivers]
    lines = [line.split() for out in outputs for line in out if line]
    for r in range(rounds):
        results = sorted(word for word, n in lines if n == str(r))
        assert results == ["refused"] * (2 * threads - 1) + ["won"], (r, outputs)


def test_a_store_that_ignores_conditions_still_gets_one_winner(bucket, monkeypatch):
    """An S3-compatible store that drops If-None-Match (here: the header is removed before signing): every create
    lands, and the read-back after the pause leaves exactly one driver holding the lease."""
    from mindprint_ray.runs import lease as lease_module

    def drop_condition(request, **_) -> None:
        if "If-None-Match" in request.headers:
            del request.headers["If-None-Match"]

    def ignoring_client():
        s3 = boto3.client("s3")
        s3.meta.events.register("before-sign.s3.PutObject", drop_condition)
        return s3

    monkeypatch.setattr(lease_module, "client", ignoring_client)
    storage = f"s3://{bucket}/{uuid.uuid4().hex}"
    leases = [Lease.for_folder(folder(storage), ttl_s=30) for _ in range(6)]
    barrier, won = threading.Barrier(len(leases)), []

    def attempt(lease: Lease) -> None:
        barrier.wait()
        try:
            won.append(lease.acquire(wait_s=0))
        except UserError:
            pass

    threads = [threading.Thread(target=attempt, args=(lease,)) for lease in leases]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1 and won[0].store.read().holder.token == won[0].holder.token
    won[0].release()


@pytest.mark.parametrize("backend", ["mindprint_ray", "local_mlx"])
def test_train_on_a_run_another_driver_holds_is_refused_before_anything_starts(tmp_path, tiny_model_dir, backend):
    """Both backends' `train` take the run folder's lease after their checks: while another driver holds it (and
    renews it), the second exits 2 naming the holder, having written nothing (no spec.yaml, no Ray, no MLX)."""
    config = "configs/tiny-cpu.yaml" if backend == "mindprint_ray" else "configs/tiny-mlx.yaml"
    folder = RunFolder.for_storage(str(tmp_path), "held")
    env = {**os.environ, "MINDPRINT_LEASE_TTL_S": "3"}
    args = [sys.executable, "-m", backend, "train", config, "--name", "held", f"storage.path={tmp_path}"]
    with hold(folder, ttl_s=3):
        r = subprocess.run(
            [*args, f"model.path={tiny_model_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "lease" in r.stderr and f"pid {os.getpid()}" in r.stderr and "Traceback" not in r.stderr
    assert not folder.spec_file.exists()
