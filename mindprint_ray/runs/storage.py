"""Storage: local folders and `s3://bucket/prefix`. Credentials and endpoint come only from the standard
AWS environment or the instance role (AWS_ENDPOINT_URL points at S3-compatible stores and test servers).

Uploads are verified (Content-MD5 checked by S3, then size and our SHA-256 read back) and retried with
backoff; the local copy is never removed by an upload.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mindprint_ray.errors import UserError
from mindprint_ray.spec.inputs import check_url_credentials

log = logging.getLogger("mindprint_ray")
SINGLE_PUT_LIMIT = 4 * 1024**3
RETRIES = 5


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def child(self, *parts: str) -> S3Location:
        return S3Location(self.bucket, "/".join(p.strip("/") for p in (self.prefix, *parts) if p))

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


BUCKET_CHARS = re.compile(r"[a-z0-9.-]+")
BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def bucket_problem(bucket: str) -> str | None:
    """Why S3 would reject this bucket name (its general-purpose naming rules), or None."""
    if not 3 <= len(bucket) <= 63:
        return f"is {len(bucket)} characters long (S3 bucket names have 3 to 63)"
    if not BUCKET_CHARS.fullmatch(bucket):
        return "may only hold lower-case letters, digits, '.' and '-'"
    if not (bucket[0].isalnum() and bucket[-1].isalnum()):
        return "must begin and end with a letter or digit"
    if ".." in bucket:
        return "may not hold two adjacent periods"
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket):
        return "may not be formatted as an IP address"
    if bucket.startswith(BUCKET_RESERVED_PREFIXES) or bucket.endswith(BUCKET_RESERVED_SUFFIXES):
        return "uses a prefix or suffix that S3 reserves"
    return None


def parse_s3(uri: str, field: str = "storage.path") -> S3Location:
    """`s3://bucket/prefix`, checked before any network call: no credentials in it, a bucket S3 accepts, and a
    prefix without '.'/'..' parts (the local mirror in the cache would leave its folder)."""
    check_url_credentials(uri, field)
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise UserError(f"'{uri}' names no bucket", field=field, hint="write s3://BUCKET/optional/prefix")
    problem = bucket_problem(bucket)
    if problem:
        raise UserError(
            f"bucket name '{bucket}' {problem}",
            field=field,
            hint="S3 bucket names are 3-63 lower-case letters, digits, '.' and '-' (see the S3 bucket naming rules)",
        )
    if any(part in (".", "..") for part in prefix.split("/")) or "\0" in prefix:
        raise UserError(
            f"the prefix of '{uri}' has a '.' or '..' part", field=field, hint="write s3://BUCKET/plain/prefix"
        )
    return S3Location(bucket, prefix.strip("/"))


def client():
    """A boto3 S3 client from the standard environment (AWS_* variables, profile or instance role)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30),
    )


def check_access(loc: S3Location) -> None:
    """Fail early, as a user error, on missing credentials, an unreachable endpoint or a missing bucket."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    s3 = client()
    probe = loc.key(f".mindprint-preflight-{os.getpid()}")
    try:
        s3.put_object(Bucket=loc.bucket, Key=probe, Body=b"ok")
        s3.delete_object(Bucket=loc.bucket, Key=probe)
    except NoCredentialsError:
        raise UserError(
            "no AWS credentials found",
            field="storage.path",
            hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE in the environment, "
            "or run on an instance with an IAM role",
        ) from None
    except EndpointConnectionError as e:
        raise UserError(
            f"cannot reach the S3 endpoint: {e}", field="storage.path", hint="check AWS_ENDPOINT_URL / the network"
        ) from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        raise UserError(
            f"cannot write to {loc.uri}: {code}",
            field="storage.path",
            hint="check that the bucket exists and the credentials may write to it",
        ) from None


def _digest(path: Path) -> tuple[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
    return base64.b64encode(md5.digest()).decode(), sha.hexdigest()


def upload_file(local: Path, bucket: str, key: str, s3=None) -> None:
    """Upload one file, verify it, retry with exponential backoff."""
    s3 = s3 or client()
    size = local.stat().st_size
    md5, sha = _digest(local)
    for attempt in range(1, RETRIES + 1):
        try:
            if size <= SINGLE_PUT_LIMIT:
                with local.open("rb") as body:
                    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentMD5=md5, Metadata={"sha256": sha})
            else:
                s3.upload_file(str(local), bucket, key, ExtraArgs={"Metadata": {"sha256": sha}})
            head = s3.head_object(Bucket=bucket, Key=key)
            if head["ContentLength"] != size or head.get("Metadata", {}).get("sha256") != sha:
                raise OSError(f"verification failed for s3://{bucket}/{key}")
            return
        except Exception as e:  # network errors, throttling, failed verification
            if attempt == RETRIES:
                raise
            wait = min(30.0, 0.5 * 2 ** (attempt - 1))
            log.warning("upload of %s failed (%s); retry %d/%d in %.1fs", local, e, attempt, RETRIES, wait)
            time.sleep(wait)


def upload_tree(local_root: Path, loc: S3Location, relative: str = "") -> int:
    """Upload a file or every file under a folder (skipping temp/hidden staging names). Returns files sent."""
    s3 = client()
    base = local_root / relative if relative else local_root
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    sent = 0
    for f in files:
        rel = f.relative_to(local_root).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        upload_file(f, loc.bucket, loc.key(rel), s3)
        sent += 1
    return sent


def download_tree(loc: S3Location, local_root: Path, relative: str = "", skip_same_size: bool = False) -> int:
    """Download every object under loc/relative into local_root (same relative paths). Returns files fetched.
    `skip_same_size`: keep a local file of the object's size (for write-once files such as published adapters)."""
    s3 = client()
    prefix = loc.key(relative) if relative else (loc.prefix + "/" if loc.prefix else "")
    fetched = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
        for obj in (o for o in page.get("Contents", []) if not o["Key"].endswith("/")):
            rel = obj["Key"][len(loc.prefix) + 1 :] if loc.prefix else obj["Key"]
            target = local_root / rel
            if skip_same_size and target.is_file() and target.stat().st_size == obj["Size"]:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(loc.bucket, obj["Key"], str(target))
            fetched += 1
    return fetched


def local_cache_root() -> Path:
    return Path(os.environ.get("MINDPRINT_CACHE", Path.home() / ".cache" / "mindprint-ray"))


def local_data_dir(data_dir: str) -> str:
    """Where a curriculum lives on this machine: the folder itself, or the cache copy of an `s3://` one."""
    if not is_s3(data_dir):
        return data_dir
    loc = parse_s3(data_dir, "curriculum.data_dir")
    return str(local_cache_root() / "data" / loc.bucket / loc.prefix)


def materialize_data_dir(data_dir: str) -> str:
    """An `s3://` curriculum is downloaded to the local cache; local folders are returned as they are."""
    if not is_s3(data_dir):
        return data_dir
    loc = parse_s3(data_dir, "curriculum.data_dir")
    target = Path(local_data_dir(data_dir))
    check_read(loc, "curriculum.data_dir")
    download_tree(loc, target)
    return str(target)


def check_read(loc: S3Location, field: str) -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    try:
        client().list_objects_v2(Bucket=loc.bucket, Prefix=loc.prefix, MaxKeys=1)
    except NoCredentialsError:
        raise UserError(
            "no AWS credentials found",
            field=field,
            hint="set AWS credentials in the environment or use an instance role",
        ) from None
    except EndpointConnectionError as e:
        raise UserError(f"cannot reach the S3 endpoint: {e}", field=field) from None
    except ClientError as e:
        raise UserError(f"cannot read {loc.uri}: {e.response.get('Error', {}).get('Code', '')}", field=field) from None


def pyarrow_filesystem():
    """The pyarrow S3 filesystem Ray Train writes checkpoints through (honours AWS_ENDPOINT_URL)."""
    from pyarrow import fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or endpoint, scheme=scheme if host else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return fs.S3FileSystem(**kwargs)
