"""The driver lease: at most one driver per run folder, local or `s3://`, and a killed driver's lease expires.

`<run folder>/lease.json` names its holder (host, pid, a random token, when it started, when it last renewed, its
ttl_s). It holds no secrets: no credentials, no command line, no environment.

- **Acquire** is a compare-and-swap on that one file. On S3: `PutObject(IfNoneMatch="*")` creates it, and
  `PutObject(IfMatch=<etag>)` renews it or takes over an expired one, so of two drivers that race exactly one
  write lands. Locally: every change happens under an `flock` on `.lease.json.lock` (released by the kernel
  when a process dies), the lease is created with `os.link` (O_EXCL semantics, never half-written) and replaced
  with `os.replace`, each only after checking that the file is still the version this driver read.
- **Renewal**: a daemon thread rewrites the lease every ttl_s/3. When the lease is no longer ours (another
  driver forced or took it over), or no renewal has succeeded for ttl_s, the holder has `lost` it: this is
  logged, `check()` raises and the optional `on_lost` callback runs once.
- **Expiry**: a lease that nobody renews is taken over, race-free, once one of these holds:
  * it was not renewed for its ttl_s as the store's own clock tells (S3: the response's `Date` minus the object's
    `LastModified`, both server times; locally: the holder's `renewed` time, when the holder is this host);
  * the acquiring driver watched it stay unchanged for ttl_s of its own monotonic clock (no clocks compared);
  * the holder is this host, the folder is local and its pid is gone (a zombie counts as gone): the shortcut
    that lets a resubmit on the same machine go on at once. Not for S3: two hosts (containers, pods of two
    clusters) can share a name, and then one's pid says nothing about the other.
  A lease that *is* renewed while we watch proves a live driver: the second driver is refused (UserError, exit 2).
- **Release** deletes the lease only while it is still ours, on normal exit, on an exception, on Ctrl-C and on
  SIGTERM (the context manager turns SIGTERM into SystemExit while it holds the lease, if no handler was set).

ttl_s defaults to 60 s: a resubmit after a SIGKILLed driver waits at most about that long (acquire watches for
up to ttl_s by default), a live driver is seen renewing within ttl/3 (20 s) and refused then, and a renewal every
20 s costs nothing. Far shorter, and a driver stalled by a slow S3 call or a loaded head node could lose a lease
it still needs; far longer, and every resubmit after a crash (on S3, or from another host) idles GPUs for minutes.

After a successful conditional write an acquire on S3 waits CONFIRM_S, reads the lease back and counts only if its
own write is the one that stayed. Real S3 makes this redundant; it guards moto (5.2.5 checks the condition and
then writes, without a lock between them, though 200 races of 8 threads here never gave two winners) and
S3-compatible stores that ignore the conditions (tests/test_lease.py drops If-None-Match to show it). On such a
store renewals are unconditional too, so the lease is then only a best effort.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mindprint_ray.errors import UserError
from mindprint_ray.runs.storage import S3Location, client, parse_s3

if TYPE_CHECKING:
    from mindprint_ray.runs.run_folder import RunFolder

log = logging.getLogger("mindprint_ray")

LEASE_FILE = "lease.json"
DEFAULT_TTL_S = 60.0
FORMAT = 1
LOCK_TIMEOUT_S = 10.0
CONFIRM_S = 0.25  # S3: the pause before an acquire reads its write back
S3_CLOCK_SLACK_S = 1.0  # S3's Date and LastModified have one-second resolution: age - 1 s < the real age


class Conflict(Exception):
    """The lease is not the version we expected: someone else wrote or removed it first."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease. Times are seconds since the epoch on the holder's clock."""

    host: str
    pid: int
    token: str
    started: float
    renewed: float
    ttl_s: float

    @classmethod
    def new(cls, ttl_s: float, token: str) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), token, now, now, float(ttl_s))

    def to_bytes(self) -> bytes:
        return json.dumps({"format": FORMAT, **asdict(self), "started_utc": _utc(self.started)}, indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Holder:
        try:
            raw = json.loads(data)
            return cls(
                str(raw["host"]),
                int(raw["pid"]),
                str(raw["token"]),
                float(raw["started"]),
                float(raw["renewed"]),
                float(raw["ttl_s"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"not a readable driver lease ({e.__class__.__name__}: {e})",
                file=where,
                hint="it was changed by hand; if no driver runs on this run, delete the file and rerun",
            ) from None

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {_utc(self.started)}"


@dataclass(frozen=True)
class Seen:
    """The lease as read: its holder, the version to compare-and-swap against, and its age if the store knows."""

    holder: Holder
    version: str
    age_s: float | None


class LeaseStore(Protocol):
    """One lease file with compare-and-swap writes (`version` is an S3 ETag or a content hash)."""

    where: str
    local: bool

    def read(self) -> Seen | None: ...

    def create(self, data: bytes) -> str: ...

    def replace(self, data: bytes, version: str) -> str: ...

    def delete(self, version: str) -> None: ...


class LocalStore:
    """The lease as a file in a local (or shared, flock-capable) folder."""

    local = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self._lock_path = self.path.with_name(f".{self.path.name}.lock")

    def read(self) -> Seen | None:
        with self._locked():
            return self._read()

    def create(self, data: bytes) -> str:
        with self._locked():
            tmp = self._write_temp(data)
            try:
                _link_exclusive(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            return _digest(data)

    def replace(self, data: bytes, version: str) -> str:
        with self._locked():
            self._expect(version)
            os.replace(self._write_temp(data), self.path)
            return _digest(data)

    def delete(self, version: str) -> None:
        with self._locked():
            self._expect(version)
            self.path.unlink()

    def _read(self) -> Seen | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        holder = Holder.from_bytes(data, self.where)
        age = time.time() - holder.renewed if holder.host == socket.gethostname() else None
        return Seen(holder, _digest(data), age)

    def _expect(self, version: str) -> None:
        seen = self._read()
        if seen is None or seen.version != version:
            raise Conflict(self.where)

    def _write_temp(self, data: bytes) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return Path(tmp)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self._lock_path} stayed locked for {LOCK_TIMEOUT_S:.0f} s") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # closing drops the flock


class S3Store:
    """The lease as one S3 object, written only with conditional PutObject/DeleteObject."""

    local = False

    def __init__(self, loc: S3Location, name: str = LEASE_FILE) -> None:
        self.bucket, self.key = loc.bucket, loc.key(name)
        self.where = f"s3://{self.bucket}/{self.key}"
        self._s3 = client()

    def read(self) -> Seen | None:
        try:
            r = self._s3.get_object(Bucket=self.bucket, Key=self.key)
        except self._s3.exceptions.NoSuchKey:
            return None
        holder = Holder.from_bytes(r["Body"].read(), self.where)
        return Seen(holder, r["ETag"], _server_age(r))

    def create(self, data: bytes) -> str:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> None:
        with _conflicts(self.where):
            self._s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)

    def _put(self, data: bytes, **condition: str) -> str:
        with _conflicts(self.where):
            r = self._s3.put_object(
                Bucket=self.bucket, Key=self.key, Body=data, ContentType="application/json", **condition
            )
        return r["ETag"]


class Lease:
    """A driver's claim on a run folder. Use `hold(folder)` or `Lease.for_folder(folder).acquire()`."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        on_lost: Callable[[], object] | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.store = store
        self.ttl_s = float(ttl_s)
        self.on_lost = on_lost
        self.holder: Holder | None = None
        self._token = secrets.token_hex(8)  # tells this driver's writes from any other's
        self._version: str | None = None
        self._lost = threading.Event()
        self._lost_why = ""
        self._stop = threading.Event()
        self._state = threading.Lock()
        self._thread: threading.Thread | None = None
        self._saved_sigterm = None

    @classmethod
    def for_folder(cls, folder: RunFolder, **kwargs) -> Lease:
        """The lease of a run folder: `<remote>/lease.json` on S3, `<root>/lease.json` otherwise."""
        if folder.remote:
            return cls(S3Store(parse_s3(folder.remote)), **kwargs)
        return cls(LocalStore(folder.root / LEASE_FILE), **kwargs)

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return self._version is not None and not self._lost.is_set()

    @property
    def lost(self) -> bool:
        """True once another driver took the lease, or renewals failed for ttl_s: stop writing to the run."""
        return self._lost.is_set()

    def check(self) -> None:
        """Raise UserError when the lease was lost (call before durable writes, e.g. publishing an adapter)."""
        if self.lost:
            raise UserError(
                f"this driver lost its lease on the run folder: {self._lost_why}",
                file=self.store.where,
                hint="another driver of the same run may be writing it now (--force-lease?); let one of them finish",
            )

    # ---- acquire -------------------------------------------------------------------------------------
    def acquire(self, *, force: bool = False, wait_s: float | None = None) -> Lease:
        """Take the lease, or raise UserError naming the live holder.

        A lease that may belong to a dead driver is watched for up to `wait_s` (default: ttl_s, so a resubmit
        after a kill waits at most that long); one that is written meanwhile (renewed, or taken by a racer) is
        live, and refused at once. `force` takes over any lease (its holder finds out at its next renewal)."""
        if self._version is not None:
            raise RuntimeError("this lease is already acquired")
        wait_s = self.ttl_s if wait_s is None else wait_s
        start = time.monotonic()
        first: Seen | None = None
        raced, forced_tries = False, 0
        while True:
            seen = self.store.read()
            if seen is None:
                if self._try_take(None):
                    return self
                raced = True  # another driver created it first
                continue
            if seen.holder.token == self._token:  # our write landed though its answer was lost
                self._start(seen.holder, seen.version)
                return self
            if not force and (raced or (first is not None and seen.version != first.version)):
                raise self._refusal(seen)  # written while we watched: its driver is alive
            first = first or seen
            if force or self._expired(seen, start):
                if self._try_take(seen):
                    return self
                if force and forced_tries < 4:
                    forced_tries += 1
                    continue  # the old holder renewed in between: take the new version
            waited = time.monotonic() - start
            if waited >= wait_s:
                raise self._refusal(seen)
            if seen is first:
                log.warning(
                    "run folder lease %s is held (%s); waiting up to %.0f s for it to expire or be renewed",
                    self.store.where,
                    seen.holder.describe(),
                    wait_s,
                )
            time.sleep(min(1.0, self.ttl_s / 6, max(0.0, wait_s - waited) + 0.01))

    def _expired(self, seen: Seen, start: float) -> bool:
        """Not renewed for its ttl (by the store's clock, or unchanged while we watched), or its local pid is gone."""
        h = seen.holder
        slack = 0.0 if self.store.local else S3_CLOCK_SLACK_S
        if seen.age_s is not None and seen.age_s >= h.ttl_s + slack:
            return True
        if time.monotonic() - start > h.ttl_s:  # the caller has seen this very version since `start`
            return True
        return self.store.local and h.host == socket.gethostname() and h.pid != os.getpid() and _pid_gone(h.pid)

    def _try_take(self, seen: Seen | None) -> bool:
        """Create the lease (none exists) or replace `seen` (expired or forced); False when another won."""
        holder = Holder.new(self.ttl_s, self._token)
        try:
            if seen is None:
                version = self.store.create(holder.to_bytes())
            else:
                version = self.store.replace(holder.to_bytes(), seen.version)
        except Conflict:
            return False
        if not self.store.local and not self._confirmed(holder, version):
            return False
        if seen is not None:
            log.warning("took over the run folder lease %s from %s", self.store.where, seen.holder.describe())
        self._start(holder, version)
        return True

    def _confirmed(self, holder: Holder, version: str) -> bool:
        """S3: after a pause, our write must still be the lease (guards stores whose conditions are not atomic)."""
        time.sleep(CONFIRM_S)
        seen = self.store.read()
        return seen is not None and seen.holder.token == holder.token and seen.version == version

    def _refusal(self, seen: Seen) -> UserError:
        h = seen.holder
        age = f", renewed {seen.age_s:.0f} s ago" if seen.age_s is not None else ""
        return UserError(
            f"another driver holds this run ({h.describe()}{age}); a run is trained by one driver at a time",
            file=self.store.where,
            hint=f"wait for that driver to finish or stop it; if you are sure it is dead, rerun with --force-lease, "
            f"or rerun after {h.ttl_s:.0f} s, when its lease has expired",
        )

    # ---- renewal ---------------------------------------------------------------------------------------
    def _start(self, holder: Holder, version: str) -> None:
        self.holder, self._version = holder, version
        self._lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="mindprint-lease", daemon=True)
        self._thread.start()
        log.info("holding the run folder lease %s (%s, ttl %.0f s)", self.store.where, holder.describe(), self.ttl_s)

    def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
                last_ok = time.monotonic()
            except Conflict:
                self._mark_lost("another driver now holds it")
                return
            except Exception as e:  # network trouble: keep trying until the lease could have expired
                log.warning("renewing the run folder lease %s failed: %s", self.store.where, e)
                if time.monotonic() - last_ok > self.ttl_s:
                    self._mark_lost(f"no renewal succeeded for {self.ttl_s:.0f} s")
                    return

    def renew(self) -> None:
        """Rewrite the lease with a new renewed time; Conflict if it is no longer ours."""
        with self._state:
            if self._version is None or self.holder is None:
                raise Conflict(self.store.where)
            renewed = dataclasses.replace(self.holder, renewed=time.time())
            try:
                self._version = self.store.replace(renewed.to_bytes(), self._version)
            except Conflict:
                self._version = self._own_version()  # a retried write that did land is still ours
                if self._version is None:
                    raise
            self.holder = renewed

    def _own_version(self) -> str | None:
        seen = self.store.read()
        return seen.version if seen is not None and seen.holder.token == self._token else None

    def _mark_lost(self, why: str) -> None:
        self._lost_why = why
        self._lost.set()
        log.error("lost the run folder lease %s: %s; this driver must stop", self.store.where, why)
        if self.on_lost is not None:
            self.on_lost()

    # ---- release ---------------------------------------------------------------------------------------
    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (a lost lease is left to its new holder)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._state:
            version, self._version = self._version, None
        if version is None or self._lost.is_set():
            return
        try:
            self.store.delete(version)
            log.info("released the run folder lease %s", self.store.where)
        except Conflict:
            log.warning("the run folder lease %s was no longer ours at release", self.store.where)
        except Exception as e:  # never mask the error the driver is exiting with
            log.warning(
                "could not release %s (%s); it expires %.0f s after its last renewal", self.store.where, e, self.ttl_s
            )

    def __enter__(self) -> Lease:
        if self.holder is None:
            self.acquire()
        self._trap_sigterm()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.release()
        finally:
            self._untrap_sigterm()

    def _trap_sigterm(self) -> None:
        """SIGTERM (`ray job stop`, a container stop) becomes SystemExit, so the lease is released on the way out."""
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL,
            None,
        ):
            self._saved_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def _untrap_sigterm(self) -> None:
        if self._saved_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._saved_sigterm)
            self._saved_sigterm = None


def lease_ttl_s() -> float:
    """The lease's time to live: MINDPRINT_LEASE_TTL_S, else DEFAULT_TTL_S (why 60 s: the module's docstring)."""
    return float(os.environ.get("MINDPRINT_LEASE_TTL_S", DEFAULT_TTL_S))


def hold(folder: RunFolder, *, force: bool = False, ttl_s: float = DEFAULT_TTL_S, **kwargs) -> Lease:
    """The acquired lease of `folder`, for `with hold(folder, force=args.force_lease): ...`."""
    return Lease.for_folder(folder, ttl_s=ttl_s, **kwargs).acquire(force=force)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _link_exclusive(tmp: Path, path: Path) -> None:
    """Publish `tmp` as `path` only if `path` does not exist (hard link; O_EXCL where links are unsupported)."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise Conflict(str(path)) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise Conflict(str(path)) from None
    with os.fdopen(fd, "wb") as f:
        f.write(tmp.read_bytes())
        f.flush()
        os.fsync(f.fileno())


def _pid_gone(pid: int) -> bool:
    """No process has this pid on this host, or only a zombie (killed, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _server_age(response: dict) -> float | None:
    """Seconds since the object was last written, by the server's clock (its Date header minus LastModified)."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    modified = response.get("LastModified")
    if not date or modified is None:
        return None
    return (parsedate_to_datetime(date) - modified).total_seconds()


@contextmanager
def _conflicts(where: str) -> Iterator[None]:
    """S3's answers to a failed condition (412), a concurrent conditional write (409) or a missing key (404)."""
    from botocore.exceptions import ClientError

    try:
        yield
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (404, 409, 412):
            raise Conflict(where) from None
        raise


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
