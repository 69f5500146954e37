"""Upload time of a checkpoint the size of the 72B adapter's, to a moto S3 server, as Ray Train uploads it
(issue 13, item 4), and what a training step waits for with SYNC vs ASYNC upload.

Size: from the plan of --config (default configs/qwen72b-qlora-8xh100.yaml), `run.zones.trainable_params()`
trainable parameters N. A portable checkpoint (backends/ray_torch/portable_checkpoint.py) holds the adapter
(adapter_model.safetensors, fp32: 4N bytes) and portable_optimizer.pt with the fp32 master copy and Adam's two
fp32 moments (`fp32`, `exp_avg`, `exp_avg_sq`: 12N bytes), so 16N bytes, plus small files (scheduler, RNG state
per rank, trainer state, adapter config; their sizes here are a few KB each, assumed, not measured). The files
are random bytes (S3 does not compress; moto neither).

Upload: what Ray Train V2's StorageContext.persist_current_checkpoint does: `create_dir` on the destination,
then Ray's own `_pyarrow_fs_copy_files` (pyarrow.fs.copy_files from the LocalFileSystem, 64 MiB chunks, no
threads for S3 uploads) to the S3FileSystem that `mindprint_ray.runs.storage.pyarrow_filesystem()` builds from
AWS_ENDPOINT_URL (here a moto server on 127.0.0.1). SYNC: the step waits for that upload. ASYNC
(CheckpointUploadMode.ASYNC, what report_checkpoint uses): the step waits only for handing the same job to a
ThreadPoolExecutor (Ray's checkpoint_upload_threadpool, one thread); the upload then runs in the background.

moto on loopback is not S3 over a network: the figure bounds the client side (pyarrow's multipart upload and a
Python S3 server on the same 2 cores), not the throughput of real S3 from an EC2 node.

    .venv/bin/python bench/checkpoint_upload.py               # ~1-2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.runs.storage import pyarrow_filesystem

BUCKET = "bench-checkpoints"
CHUNK = 64 * 1024 * 1024
RANKS = 8  # rng_state_<rank>.pth per worker of the 8-GPU profile, plus rng_state.pth
SMALL_FILES = {  # assumed sizes (a few KB each); together under 0.1 MB of a ~700 MB checkpoint
    "adapter_config.json": 1_000,
    "scheduler.pt": 1_500,
    "trainer_state.json": 4_000,
    "mindprint_state.json": 100,
    "rng_state.pth": 15_000,
    **{f"rng_state_{r}.pth": 15_000 for r in range(RANKS)},
}


def checkpoint_layout(trainable: int) -> dict[str, int]:
    """File name -> bytes of one portable checkpoint of `trainable` parameters (fp32 adapter, fp32 master copy
    and two fp32 Adam moments)."""
    return {"adapter_model.safetensors": 4 * trainable, "portable_optimizer.pt": 3 * 4 * trainable, **SMALL_FILES}


def write_checkpoint(directory: Path, layout: dict[str, int]) -> float:
    """Random bytes in the layout's files; returns the seconds the writes took (page cache, no fsync)."""
    directory.mkdir(parents=True)
    block = os.urandom(CHUNK)
    start = time.perf_counter()
    for name, size in layout.items():
        with open(directory / name, "wb") as f:
            left = size
            while left > 0:
                f.write(block[: min(left, CHUNK)])
                left -= CHUNK
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server, f"http://127.0.0.1:{port}"
        time.sleep(0.2)
    server.kill()
    raise TimeoutError("moto_server did not start")


def point_aws_at(endpoint: str) -> None:
    """The environment the tests' moto_s3 fixture sets (no real credentials)."""
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )


def create_bucket(endpoint: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)


def upload(local: Path, s3, destination: str) -> None:
    """Ray Train V2's StorageContext.persist_current_checkpoint, for a local checkpoint folder."""
    from pyarrow import fs
    from ray.train.v2._internal.execution.storage import _pyarrow_fs_copy_files

    s3.create_dir(destination)
    _pyarrow_fs_copy_files(
        source=str(local),
        destination=destination,
        source_filesystem=fs.LocalFileSystem(),
        destination_filesystem=s3,
    )


def uploaded_bytes(s3, destination: str) -> int:
    from pyarrow import fs

    infos = s3.get_file_info(fs.FileSelector(destination, recursive=True))
    return sum(i.size for i in infos if i.type == fs.FileType.File)


def one_round(local: Path, s3, index: int, total: int) -> dict:
    """One SYNC upload (the step waits for all of it), then one ASYNC hand-off of the same upload."""
    sync_dest, async_dest = f"{BUCKET}/run/checkpoints/sync-{index}", f"{BUCKET}/run/checkpoints/async-{index}"
    start = time.perf_counter()
    upload(local, s3, sync_dest)
    sync_s = time.perf_counter() - start
    with ThreadPoolExecutor(max_workers=1) as pool:  # Ray's checkpoint_upload_threadpool has one thread
        start = time.perf_counter()
        future = pool.submit(upload, local, s3, async_dest)
        handoff_s = time.perf_counter() - start
        future.result()
        background_s = time.perf_counter() - start
    for dest in (sync_dest, async_dest):
        got = uploaded_bytes(s3, dest)
        if got != total:
            raise RuntimeError(f"{dest} holds {got:,} bytes, the checkpoint has {total:,}")
        s3.delete_dir(dest)  # moto keeps objects in its process: do not let rounds pile up
    return {"sync_s": sync_s, "handoff_s": handoff_s, "background_s": background_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "qwen72b-qlora-8xh100.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    run = load_run(args.config)
    trainable = run.zones.trainable_params()
    layout = checkpoint_layout(trainable)
    total = sum(layout.values())
    print(f"config: {args.config} ({run.spec.model.name}, lora.strategy={run.spec.lora.strategy})")
    print(f"trainable parameters: {trainable:,}")
    print(
        f"checkpoint: 16 bytes x {trainable:,} = {16 * trainable / 1e6:,.1f} MB "
        f"(adapter fp32 {4 * trainable / 1e6:,.1f} MB + portable_optimizer.pt fp32, exp_avg, exp_avg_sq "
        f"{12 * trainable / 1e6:,.1f} MB) + {len(SMALL_FILES)} small files = {total / 1e6:,.1f} MB "
        f"({total / 2**20:,.1f} MiB) in {len(layout)} files"
    )
    import moto
    import pyarrow
    import ray

    print(f"pyarrow {pyarrow.__version__}, moto {moto.__version__} (server mode), ray {ray.__version__}")
    print(f"machine: {os.cpu_count()} CPUs; moto server and client share them")

    tmp = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    server, endpoint = start_moto()
    try:
        local = tmp / "checkpoint-000050"
        write_s = write_checkpoint(local, layout)
        print(f"local write of the files (page cache, no fsync): {write_s:.2f} s")
        point_aws_at(endpoint)
        create_bucket(endpoint)
        s3 = pyarrow_filesystem()
        rounds = []
        for i in range(args.repeats):
            r = one_round(local, s3, i, total)
            rounds.append(r)
            print(
                f"round {i + 1}: SYNC upload {r['sync_s']:.2f} s ({total / 1e6 / r['sync_s']:,.0f} MB/s); "
                f"ASYNC hand-off {r['handoff_s'] * 1e3:.3f} ms, its background upload {r['background_s']:.2f} s",
                flush=True,
            )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    sync_s = statistics.median(r["sync_s"] for r in rounds)
    handoff_s = statistics.median(r["handoff_s"] for r in rounds)
    background_s = statistics.median(r["background_s"] for r in rounds)
    print()
    print(f"median of {args.repeats} rounds, {total / 1e6:,.1f} MB to moto on 127.0.0.1:")
    print(f"  SYNC upload (the step waits): {sync_s:.2f} s, {total / 1e6 / sync_s:,.0f} MB/s")
    print(f"  ASYNC hand-off (the step waits): {handoff_s * 1e3:.3f} ms")
    print(f"  ASYNC background upload (the step does not wait): {background_s:.2f} s")
    print(f"  step wait SYNC / ASYNC: {sync_s / handoff_s:,.0f}x")
    print(
        "NOTE: moto on loopback is not S3 over a network. These figures bound the client side (pyarrow's "
        "multipart upload against a Python S3 server on the same cores); real S3 throughput from an EC2 node "
        "was not measured."
    )


if __name__ == "__main__":
    main()
