"""A Ray Train worker process killed mid-topic under DeepSpeed ZeRO-3: Ray restarts the group, the topic resumes
from its last checkpoint where it was (the redone steps' losses match), every adapter lands in S3 (a real moto
server on 127.0.0.1). The run goes through every in-process hand-over ZeRO-3 makes hard (SFT's engine to DPO's,
TRL's copy of the adapter as reference, the next topic loading the previous adapter) without another restart."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from conftest import ROOT, committed_checkpoints, sft_losses

pytestmark = [pytest.mark.slow, pytest.mark.ray_cluster]
TOPICS = ["cycle_basics", "capitulation"]


def worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "RayTrainWorker" in line and "ps -eo" not in line]


def test_killed_worker_resumes_and_every_adapter_reaches_s3(tmp_path, tiny_model_dir, moto_s3):
    from safetensors.torch import load

    from mindprint_ray.planning.run_plan import load_run

    s3 = boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="mp-ft")
    mirror = Path(moto_s3["MINDPRINT_CACHE"]) / "runs" / "mp-ft" / "runs" / "ft"
    args = [
        sys.executable,
        "-m",
        "mindprint_ray",
        "train",
        "configs/tiny-cpu.yaml",
        "--name",
        "ft",
        "storage.path=s3://mp-ft/runs",
        f"model.path={tiny_model_dir}",
        f"curriculum.topics=[{','.join(TOPICS)}]",
        "storage.checkpoint_every_steps=4",
        "hardware.deepspeed=zero3",
        "eval.enabled=false",
        "ray.dashboard=false",
        "ray.max_failures=2",
        "sft.max_steps=16",
        "dpo.steps_per_topic=4",
    ]
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **moto_s3},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killed = None
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None and killed is None:
            metrics = mirror / "metrics.jsonl"
            steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
            # kill once Ray has committed the step-4 checkpoint (its checkpoint manager snapshot lists it) and the
            # first topic's SFT has gone on past it
            if any(
                r.get("stage") == "sft" and r.get("topic") == TOPICS[0] and r.get("step", 0) >= 5 and "loss" in r
                for r in steps
            ) and f"{TOPICS[0]}-sft-000004" in committed_checkpoints("mp-ft/runs/ft", s3):
                pids = worker_pids()
                assert pids, "no Ray Train worker process found"
                os.kill(pids[-1], signal.SIGKILL)
                killed, killed_at, before = pids[-1], time.time(), sft_losses(steps, TOPICS[0])
            time.sleep(0.3)
        output, _ = proc.communicate(timeout=max(10, deadline - time.time()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed, "the run finished before a worker could be killed"
    assert proc.returncode == 0, output[-4000:]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mp-ft", Prefix="runs/ft/")["Contents"]]
    plan = load_run("configs/tiny-cpu.yaml").zones
    expected = {f"base_model.model.{p}.lora_{ab}.weight" for p in plan.module_paths() for ab in "AB"}
    for topic in TOPICS:
        assert f"runs/ft/adapters/{topic}/mindprint_manifest.json" in keys
        body = s3.get_object(Bucket="mp-ft", Key=f"runs/ft/adapters/{topic}/adapter_model.safetensors")["Body"]
        tensors = load(body.read())  # whole tensors, gathered from the ZeRO-3 partitions
        assert set(tensors) == expected and all(t.numel() > 0 for t in tensors.values())
        assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
    assert any(k.startswith("runs/ft/checkpoints/") for k in keys)  # Ray checkpoints through pyarrow S3
    summary = json.loads(s3.get_object(Bucket="mp-ft", Key="runs/ft/summary.json")["Body"].read())
    assert all(summary["topics"][t]["status"] == "done" for t in TOPICS)
    records = [json.loads(line) for line in (mirror / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("event") == "stage_start" and r["topic"] == TOPICS[0] and r["stage"] == "sft"]
    assert len(starts) == 2 and starts[1]["step"] >= 4  # restarted from the step-4 (or later) checkpoint
    restarts = [r for r in records if r.get("event") == "worker_group_start"]
    assert len(restarts) == 2, restarts  # the kill's restart only: no error that a retry hid
    restored = restarts[-1]["restored"]
    assert restored["topic"] == TOPICS[0] and restored["step"] >= 4
    # the same two workers redo the steps after the checkpoint with the same weights, optimizer state and data
    after = sft_losses(records, TOPICS[0], since=killed_at)
    redone = sorted(set(before) & set(after))
    assert redone and min(after) == restored["step"] + 1, (sorted(before), sorted(after), restored)
    for step in redone:
        assert after[step] == pytest.approx(before[step], rel=1e-3), (step, before, after)
