"""Two Ray nodes on one machine (Ray's own ray.cluster_utils.Cluster), the run's storage on a real moto S3 server:
a node lost mid-SFT (the elastic group continues on one worker, under ZeRO-2, from the last checkpoint, at the
same step and with the same data), and a spot notice (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`)
answered by a checkpoint at the next step, without spending ray.max_failures."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from conftest import ROOT, committed_checkpoints, sft_losses

pytestmark = [pytest.mark.slow, pytest.mark.ray_cluster]
TOPICS = ["cycle_basics", "capitulation"]
SPOT_TOPICS = TOPICS[:1]  # the notice comes mid-SFT of the first topic: one topic shows the whole path
DEADLINE_S = 20  # of the drain (AWS gives 120 s); after a notice each step waits for its checkpoint's upload


@pytest.fixture
def two_nodes(moto_s3, monkeypatch, tiny_model_dir):
    """A head (the driver's node: it holds Ray Train's controller) and a second node, one CPU each, and the model."""
    from ray.cluster_utils import Cluster

    # after a node dies, Ray Train may first try the old size until the cluster marks the node dead: give up
    # on that attempt after 20 s (default 60 s) and start the group that fits
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    # Ray Train's controller asks for drain notices every 5 s (a real notice gives 120 s); the tiny model's steps
    # take well under a second, so ask every second, or SFT may end before the notice arrives
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster, second, tiny_model_dir
    finally:
        cluster.shutdown()


def s3_client(moto_s3):
    return boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"])


def start_run(cluster, model, moto_s3, bucket: str, name: str, *extra: str, topics=TOPICS) -> subprocess.Popen:
    s3_client(moto_s3).create_bucket(Bucket=bucket)
    args = [
        sys.executable,
        "-m",
        "mindprint_ray",
        "train",
        "configs/tiny-cpu.yaml",
        "--name",
        name,
        f"model.path={model}",
        f"storage.path=s3://{bucket}/runs",
        f"curriculum.topics=[{','.join(topics)}]",
        "hardware.profile=cpu-2x1",
        "hardware.num_workers=[1,2]",
        "storage.checkpoint_every_steps=4",
        "sft.max_steps=14",
        "dpo.steps_per_topic=4",
        "eval.enabled=false",
        "lora.dropout=0.0",  # the same step on 1 worker as on 2 gives the same loss (no dropout masks to differ)
        *extra,
    ]
    env = {**os.environ, **moto_s3, "RAY_ADDRESS": cluster.address}
    return subprocess.Popen(
        args, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def records(moto_s3, bucket: str, name: str) -> list[dict]:
    """metrics.jsonl as the driver's node mirrors it (workers of this machine share the mirror)."""
    path = Path(moto_s3["MINDPRINT_CACHE"]) / "runs" / bucket / "runs" / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for(proc, moto_s3, bucket, name, condition, timeout: float = 300) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        rows = records(moto_s3, bucket, name)
        if condition(rows):
            return rows
        time.sleep(0.3)
    out = proc.stdout.read() if proc.poll() is not None else ""
    raise AssertionError(f"condition not met (run ended: {proc.poll()}): {out[-3000:]}")


def finish(proc, timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    return out


def summary_of(moto_s3, bucket, name) -> dict:
    s3 = s3_client(moto_s3)
    return json.loads(s3.get_object(Bucket=bucket, Key=f"runs/{name}/summary.json")["Body"].read())


def test_a_lost_node_resizes_the_zero2_group_and_the_run_continues_at_the_same_step(two_nodes, moto_s3):
    cluster, second, model = two_nodes
    proc = start_run(
        cluster,
        model,
        moto_s3,
        "mp-node",
        "lost",
        "hardware.deepspeed=zero2",
        "ray.max_failures=2",
        "storage.checkpoint_every_steps=3",
    )
    # remove the node once Ray has committed the step-3 checkpoint and step 4 has been logged
    rows = wait_for(
        proc,
        moto_s3,
        "mp-node",
        "lost",
        lambda rows: (
            max(sft_losses(rows, TOPICS[0]), default=0) >= 4
            and f"{TOPICS[0]}-sft-000003" in committed_checkpoints("mp-node/runs/lost", s3_client(moto_s3))
        ),
    )
    removed_at = time.time()
    cluster.remove_node(second, allow_graceful=False)
    before = sft_losses(rows, TOPICS[0])
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    summary = summary_of(moto_s3, "mp-node", "lost")
    assert all(summary["topics"][t]["status"] == "done" for t in TOPICS)
    groups = summary["worker_groups"]
    assert groups[0]["world_size"] == 2 and groups[0]["restored"] is None
    assert groups[-1]["world_size"] == 1, groups  # the elastic group continued on the node that remains
    restored = groups[-1]["restored"]
    assert restored["topic"] == TOPICS[0] and restored["stage"] == "sft" and restored["step"] >= 3
    s3 = s3_client(moto_s3)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mp-node", Prefix="runs/lost/")["Contents"]]
    for topic in TOPICS:
        assert f"runs/lost/adapters/{topic}/adapter_model.safetensors" in keys
    # the resumed curve continues the one before: a step redone on 1 worker (2 micro-batches accumulated) sees
    # the same rows, weights, optimizer state and learning rate as on 2 workers, so its loss is the same. Within
    # the first epoch only: its 13 rows end it unevenly (2 workers pad the last step, 1 worker shortens it).
    after = sft_losses(records(moto_s3, "mp-node", "lost"), TOPICS[0], since=removed_at)
    assert min(after) == restored["step"] + 1 and max(after) == 14, sorted(after)
    redone = [step for step in sorted(set(before) & set(after)) if step <= 7]
    assert redone, (sorted(before), restored)
    for step in redone:
        assert after[step] == pytest.approx(before[step], rel=1e-3), (step, before, after)


def test_a_preemption_notice_checkpoints_at_the_next_step_and_spends_no_failure(two_nodes, moto_s3):
    cluster, second, model = two_nodes
    proc = start_run(
        cluster,
        model,
        moto_s3,
        "mp-spot",
        "spot",
        "ray.max_failures=0",
        "sft.max_steps=30",
        "storage.keep_checkpoints=100",
        topics=SPOT_TOPICS,
    )
    wait_for(
        proc,
        moto_s3,
        "mp-spot",
        "spot",
        lambda rows: any(
            r.get("topic") == SPOT_TOPICS[0] and r.get("stage") == "sft" and r.get("step", 0) >= 2 for r in rows
        ),
    )
    drain = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "drain-node",
            "--address",
            cluster.address,
            "--node-id",
            second.node_id,
            "--reason",
            "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message",
            "spot instance-action",
            "--deadline-remaining-seconds",
            str(DEADLINE_S),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert drain.returncode == 0, drain.stderr
    notice = wait_for(
        proc, moto_s3, "mp-spot", "spot", lambda rows: any(r.get("event") == "preemption_notice" for r in rows)
    )
    event = next(r for r in notice if r.get("event") == "preemption_notice")
    time.sleep(DEADLINE_S + 2)  # past the deadline: the reclaim (`ray drain-node` leaves the killing to its caller)
    cluster.remove_node(second, allow_graceful=False)
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]  # max_failures=0: the preemption did not count as a failure
    summary = summary_of(moto_s3, "mp-spot", "spot")
    assert all(summary["topics"][t]["status"] == "done" for t in SPOT_TOPICS)
    groups = summary["worker_groups"]
    assert [g["world_size"] for g in groups][:1] == [2] and groups[-1]["world_size"] == 1, groups
    # the notice's own step was checkpointed (at most one step of work is lost), and the run resumed from it or
    # from a later one (the group ran on until the deadline)
    name = f"{event['topic']}-{event['stage']}-{event['step']:06d}"
    s3 = s3_client(moto_s3)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mp-spot", Prefix=f"runs/spot/checkpoints/{name}/")["Contents"]]
    assert f"runs/spot/checkpoints/{name}/mindprint_state.json" in keys
    restored = groups[-1]["restored"]
    order = [(t, s) for t in SPOT_TOPICS for s in ("sft", "sft_done", "dpo", "done")]
    resumed = (order.index((restored["topic"], restored["stage"])), restored["step"])
    assert resumed >= (order.index((event["topic"], event["stage"])), event["step"]), (restored, event)
    # after the notice every step is checkpointed, and the last one uploaded is resumed from even when Ray had no
    # time to commit it (rank 0 names it beside Ray's checkpoints): the deadline took at most the step in progress
    synced = json.loads(
        s3.get_object(Bucket="mp-spot", Key="runs/spot/checkpoints/mindprint_synced_checkpoint.json")["Body"].read()
    )
    synced_at = (order.index((synced["topic"], synced["stage"])), synced["step"])
    assert synced_at >= (order.index((event["topic"], event["stage"])), event["step"]), (synced, event)
    assert resumed >= synced_at, (restored, synced)
    rows = records(moto_s3, "mp-spot", "spot")
    cut = max(i for i, r in enumerate(rows) if r.get("event") == "worker_group_start")
    last = [r for r in rows[:cut] if "loss" in r and r.get("stage") in ("sft", "dpo")][-1]
    last_at = (order.index((last["topic"], last["stage"])), last["step"])
    assert resumed >= (last_at[0], last_at[1] - 1), (restored, last)
