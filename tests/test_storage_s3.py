"""S3 storage against a real moto server on 127.0.0.1: verified uploads, data from s3://, clear errors."""

from pathlib import Path

import boto3
import pytest
from conftest import SAMPLE_DATA, free_port, make_spec, run_cli

from mindprint_ray.runs import storage


@pytest.fixture(scope="module")
def bucket(moto_s3):
    s3 = boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="mp-test")
    return "mp-test"


def test_upload_is_verified_and_retried(tmp_path, bucket, monkeypatch):
    local = tmp_path / "adapter.bin"
    local.write_bytes(b"x" * 100_000)
    real = storage.client()
    calls = {"n": 0}

    class Flaky:
        def __getattr__(self, name):
            return getattr(real, name)

        def put_object(self, **kw):
            calls["n"] += 1
            if calls["n"] == 1:
                raise ConnectionError("simulated network failure")
            return real.put_object(**kw)

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    storage.upload_file(local, bucket, "runs/a/adapter.bin", Flaky())
    head = real.head_object(Bucket=bucket, Key="runs/a/adapter.bin")
    assert calls["n"] == 2 and head["ContentLength"] == 100_000 and head["Metadata"]["sha256"]
    assert local.is_file()  # the local copy is kept


def test_tree_round_trip(tmp_path, bucket):
    src = tmp_path / "src"
    (src / "adapters" / "t").mkdir(parents=True)
    (src / "adapters" / "t" / "a.json").write_text("{}")
    (src / "summary.json").write_text('{"x": 1}')
    (src / ".staging").mkdir()
    (src / ".staging" / "partial").write_text("no")
    loc = storage.S3Location(bucket, "round/trip")
    assert storage.upload_tree(src, loc) == 2  # hidden staging folders are never uploaded
    assert storage.download_tree(loc, tmp_path / "dst") == 2
    assert (tmp_path / "dst" / "adapters" / "t" / "a.json").read_text() == "{}"


def test_curriculum_read_from_s3(tmp_path, bucket, moto_s3):
    storage.upload_tree(SAMPLE_DATA, storage.S3Location(bucket, "data"))
    spec = make_spec(tmp_path / "r.yaml", Path("unused"), topics=["accumulation"])
    r = run_cli("validate", str(spec), f"curriculum.data_dir=s3://{bucket}/data", env=moto_s3)
    assert r.returncode == 0, r.stderr
    assert "accumulation" in r.stdout


@pytest.mark.parametrize("case", ["no_bucket", "missing_bucket", "unreachable", "no_credentials"])
def test_storage_errors_exit_2_before_anything_runs(tmp_path, data_dir, bucket, moto_s3, case):
    spec = make_spec(tmp_path / "r.yaml", data_dir)
    env = dict(moto_s3)
    path = {"no_bucket": "s3://", "missing_bucket": "s3://no-such-bucket/x"}.get(case, f"s3://{bucket}/runs")
    if case == "unreachable":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    if case == "no_credentials":
        env.update(
            AWS_ACCESS_KEY_ID="",
            AWS_SECRET_ACCESS_KEY="",
            AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
            AWS_CONFIG_FILE=str(tmp_path / "none"),
            AWS_EC2_METADATA_DISABLED="true",
        )
    r = run_cli("preflight", str(spec), f"storage.path={path}", "--no-gpus", env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "storage.path" in r.stderr
    needle = {
        "no_bucket": "no bucket",
        "missing_bucket": "NoSuchBucket",
        "unreachable": "cannot reach",
        "no_credentials": "no AWS credentials",
    }[case]
    assert needle in r.stderr


def test_preflight_passes_and_reports(tmp_path, data_dir, bucket, moto_s3):
    spec = make_spec(tmp_path / "r.yaml", data_dir)
    r = run_cli("preflight", str(spec), f"storage.path=s3://{bucket}/runs", "--no-gpus", env=moto_s3)
    assert r.returncode == 0, r.stderr
    assert "is writable" in r.stdout and "MiB to upload" in r.stdout


def test_preflight_rejects_a_working_dir_over_the_upload_limit(tmp_path, data_dir):
    spec = make_spec(tmp_path / "r.yaml", data_dir)
    big = tmp_path / "wd"
    big.mkdir()
    (big / "blob.bin").write_bytes(b"\0" * (2 * 1024 * 1024))
    r = run_cli(
        "preflight",
        str(spec),
        "--no-gpus",
        "--working-dir",
        str(big),
        env={"RAY_max_grpc_message_size": str(1024 * 1024)},
    )
    assert r.returncode == 2 and "upload limit" in r.stderr and "blob.bin" in r.stderr


def test_gpu_profile_without_gpus_is_refused(tmp_path, data_dir):
    spec = make_spec(tmp_path / "r.yaml", data_dir)
    r = run_cli("preflight", str(spec), "hardware.profile=8xh100-80gb", "quantization.mode=nf4")
    assert r.returncode == 2 and "needs 8 GPUs" in r.stderr
