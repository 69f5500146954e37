"""EC2 spot interruption notice -> Ray node drain with reason PREEMPTION. One daemon per spot worker node.

Why this exists: Ray 2.60's AWS node provider (ray/autoscaler/_private/aws/) and autoscaler v2
(ray/autoscaler/v2/) never read the instance metadata's `spot/instance-action` notice (nor the rebalance
recommendation), so a reclaimed worker would vanish with no drain and Ray Train would count a failure. This
daemon asks the instance metadata service (IMDSv2) every few seconds; at the first well-formed notice it runs

    ray drain-node --address ADDR --node-id ID --reason DRAIN_NODE_REASON_PREEMPTION
        --reason-message "EC2 spot instance-action <action> at <time>" --deadline-remaining-seconds N

once (N: whole seconds left until the notice's time, at least 1), then exits. Ray Train V2 shows the drain to
every worker (ray.train.get_preemption_info()), our workers checkpoint at the next step, and the restart is
counted in FailureConfig.max_preemption_failures, not max_failures. No credentials: IMDS is local to the
instance, `ray drain-node` uses the node's own Ray session (and RAY_AUTH_* from its environment).

The node id is read, at the moment of the notice, from the command line of this host's raylet (its
`--node_id=` flag: the same lookup Ray's own ray.init does to find the local raylet, services.find_node_ids).
That needs no driver and no GCS round trip, and it follows `ray stop; ray start` (a new raylet has a new id).
--node-id (or SPOT_DRAIN_NODE_ID) overrides it.

Started by the cluster files' worker_start_ray_commands after `ray start`. A newer instance takes over the
pid file; an older one sees that at its next poll and exits, so re-running the start commands leaves one daemon.
Standard library only. Settings: flags, or the environment variables named in --help.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger("spot_drain")

IMDS_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 21600  # IMDSv2's maximum; the token is renewed a minute before it runs out, or on a 401
ACTIONS = ("terminate", "stop", "hibernate")
HTTP_TIMEOUT_S = 2.0
DRAIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Notice:
    action: str
    time: datetime  # UTC
    raw: str


class TokenRejected(Exception):
    """IMDS answered 401: the session token expired or was never valid."""


class Imds:
    """IMDSv2 client: a session token from PUT /latest/api/token, sent with every GET."""

    def __init__(self, base_url: str, ttl_s: int = TOKEN_TTL_S) -> None:
        self.base_url, self.ttl_s = base_url.rstrip("/"), ttl_s
        self._token: str | None = None
        self._token_at = 0.0

    def token(self) -> str:
        if self._token is None or time.monotonic() - self._token_at > self.ttl_s - 60:
            request = urllib.request.Request(
                self.base_url + TOKEN_PATH,
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.ttl_s)},
            )
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                self._token = response.read().decode().strip()
            self._token_at = time.monotonic()
        return self._token

    def instance_action(self) -> str | None:
        """The notice's body, or None when there is none (404). A rejected token is dropped and asked again."""
        for _ in range(2):
            try:
                return self._get(NOTICE_PATH, self.token())
            except TokenRejected:
                self._token = None
        raise TokenRejected("IMDS refused a fresh token")

    def _get(self, path: str, token: str) -> str | None:
        request = urllib.request.Request(self.base_url + path, headers={"X-aws-ec2-metadata-token": token})
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                return response.read().decode()
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            if error.code == 401:
                raise TokenRejected(str(error)) from error
            raise


def parse_notice(body: str) -> Notice:
    """{"action": "terminate"|"stop"|"hibernate", "time": "2026-12-02T10:00:00Z"}; ValueError when it is not."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    action, when = data.get("action"), data.get("time")
    if action not in ACTIONS:
        raise ValueError(f"action {action!r} is none of {', '.join(ACTIONS)}")
    if not isinstance(when, str):
        raise ValueError(f"time {when!r} is not a string")
    try:
        moment = datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError as error:
        raise ValueError(f"time {when!r} is not ISO 8601") from error
    if moment.tzinfo is None:
        raise ValueError(f"time {when!r} has no time zone")
    return Notice(action, moment.astimezone(UTC), body)


def deadline_seconds(notice: Notice, now: float) -> int:
    """Whole seconds left until the notice's time (rounded down: Ray must not count on more), at least 1."""
    return max(1, math.floor(notice.time.timestamp() - now))


def drain_command(ray: str, address: str, node_id: str, notice: Notice, now: float) -> list[str]:
    when = notice.time.strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        ray,
        "drain-node",
        "--address",
        address,
        "--node-id",
        node_id,
        "--reason",
        "DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message",
        f"EC2 spot instance-action {notice.action} at {when}",
        "--deadline-remaining-seconds",
        str(deadline_seconds(notice, now)),
    ]


def raylet_node_ids(proc: Path = Path("/proc")) -> list[str]:
    """The --node_id of every raylet running on this host (a process whose argv[0] names `raylet`)."""
    found = []
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process ended, or is not ours to read
            continue
        if not args or "raylet" not in os.path.basename(args[0]):
            continue
        found += [arg.split("=", 1)[1] for arg in args if arg.startswith("--node_id=")]
    return sorted(set(found))


def local_node_id(explicit: str | None, proc: Path = Path("/proc")) -> str | None:
    if explicit:
        return explicit
    ids = raylet_node_ids(proc)
    if len(ids) == 1:
        return ids[0]
    if ids:
        log.error("several raylets on this host (%s): pass --node-id to say which to drain", ", ".join(ids))
    else:
        log.error("no raylet runs on this host: Ray is not started here, there is no node to drain")
    return None


class PidFile:
    """The newest daemon owns the file; an older one finds another pid in it and steps aside."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text(str(os.getpid()))

    def still_ours(self) -> bool:
        try:
            return self.path.read_text().strip() == str(os.getpid())
        except OSError:
            return False


def drain(args: argparse.Namespace, notice: Notice) -> bool:
    node_id = local_node_id(args.node_id)
    if node_id is None:
        return False
    command = drain_command(args.ray, args.address, node_id, notice, time.time())
    log.info("draining: %s", " ".join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=DRAIN_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("ray drain-node did not run: %s", error)
        return False
    if result.returncode != 0:
        log.error("ray drain-node failed (exit %d): %s", result.returncode, (result.stderr or result.stdout).strip())
        return False
    log.info("node %s drained (reason PREEMPTION); Ray Train checkpoints at the next step", node_id)
    return True


def poll(args: argparse.Namespace) -> int:
    """Ask IMDS every poll_s until a notice is drained (exit 0) or a newer daemon takes over (exit 0)."""
    imds, pidfile = Imds(args.imds_url), PidFile(args.pidfile)
    seen_bad: set[str] = set()
    last_error: str | None = None
    start_ids = [args.node_id] if args.node_id else raylet_node_ids()
    log.info(
        "watching %s every %.1fs; Ray %s; this node: %s",
        args.imds_url + NOTICE_PATH,
        args.poll_s,
        args.address,
        ", ".join(start_ids) or "no raylet yet",
    )
    while True:
        if not pidfile.still_ours():
            log.info("another spot_drain took over %s: exiting", args.pidfile)
            return 0
        try:
            body = imds.instance_action()
            if last_error:
                log.info("IMDS answers again")
            last_error = None
        except (OSError, TokenRejected) as error:  # URLError, timeouts and refused connections are OSErrors
            if str(error) != last_error:  # one line per new kind of failure, not one per poll
                log.warning("IMDS not reachable (%s): still trying", error)
            last_error, body = str(error), None
        if body is not None:
            try:
                notice = parse_notice(body)
            except ValueError as error:
                if body not in seen_bad:
                    log.warning("ignoring a malformed spot/instance-action notice (%s): %r", error, body[:200])
                    seen_bad.add(body)
            else:
                log.info("spot notice: %s at %s", notice.action, notice.time.isoformat())
                if drain(args, notice):
                    return 0
                if time.time() > notice.time.timestamp():
                    log.error("the notice's time has passed without a drain: giving up")
                    return 1
        time.sleep(args.poll_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        default=env("RAY_ADDRESS") or "auto",
        help="the Ray cluster (GCS host:port) for ray drain-node; default RAY_ADDRESS, else auto",
    )
    parser.add_argument(
        "--node-id",
        default=env("SPOT_DRAIN_NODE_ID"),
        help="the Ray node id to drain; default SPOT_DRAIN_NODE_ID, else this host's raylet",
    )
    parser.add_argument(
        "--imds-url",
        default=env("SPOT_DRAIN_IMDS_URL", IMDS_URL),
        help=f"instance metadata endpoint; default SPOT_DRAIN_IMDS_URL, else {IMDS_URL}",
    )
    parser.add_argument(
        "--poll-s",
        type=float,
        default=float(env("SPOT_DRAIN_POLL_S", "5")),
        help="seconds between notice checks; default SPOT_DRAIN_POLL_S, else 5",
    )
    parser.add_argument(
        "--pidfile",
        type=Path,
        default=Path(env("SPOT_DRAIN_PIDFILE", "/tmp/spot_drain.pid")),
        help="the newest daemon's pid; default SPOT_DRAIN_PIDFILE, else /tmp/spot_drain.pid",
    )
    parser.add_argument("--ray", default=env("SPOT_DRAIN_RAY", "ray"), help="the ray executable; default ray")
    args = parser.parse_args(argv)
    if args.poll_s <= 0:
        parser.error("--poll-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s spot_drain %(levelname)s %(message)s")
    return poll(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
