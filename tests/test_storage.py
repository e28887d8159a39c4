"""Storage URIs: local paths and S3 (moto on loopback) through one filesystem object."""

from __future__ import annotations

import boto3
import pyarrow.fs as pafs
import pytest

from mambastyle.storage import StorageOptions, delete, exists, list_files, read_bytes, resolve, write_bytes


def test_local_round_trip_and_atomic_write(tmp_path):
    loc = resolve(str(tmp_path / "a" / "b.bin"))
    assert isinstance(loc.fs, pafs.LocalFileSystem) and not loc.is_s3
    write_bytes(loc, b"hello")
    assert read_bytes(loc) == b"hello"
    write_bytes(loc, b"world")  # replaces whole
    assert read_bytes(loc) == b"world"
    assert [p.rsplit("/", 1)[-1] for p in list_files(resolve(str(tmp_path)))] == [
        "b.bin"
    ]  # no temp files left
    assert resolve(f"file://{tmp_path}/a/b.bin").path == loc.path
    delete(loc)
    assert not exists(loc)
    assert list_files(resolve(str(tmp_path / "missing"))) == []


def test_s3_round_trip_against_moto(s3):
    endpoint, bucket = s3
    opts = StorageOptions(endpoint_url=endpoint)
    root = resolve(f"s3://{bucket}/prefix/", opts)
    assert root.is_s3 and root.path == f"{bucket}/prefix" and root.uri == f"s3://{bucket}/prefix"
    obj = root.join("x", "y.bin")
    write_bytes(obj, b"\x00payload")
    assert read_bytes(obj) == b"\x00payload"
    # the same object through boto3 (the AWS chain's credentials, explicit endpoint)
    body = (
        boto3.client("s3", endpoint_url=endpoint)
        .get_object(Bucket=bucket, Key="prefix/x/y.bin")["Body"]
        .read()
    )
    assert body == b"\x00payload"
    assert list_files(root) == [f"{bucket}/prefix/x/y.bin"]
    delete(obj)
    assert not exists(obj)


def test_bad_uris():
    with pytest.raises(ValueError, match="unsupported storage URI"):
        resolve("gs://bucket/x")
    with pytest.raises(ValueError, match="needs a bucket"):
        resolve("s3:///x")
    with pytest.raises(ValueError, match="endpoint_url"):
        resolve("s3://b/x", StorageOptions(endpoint_url="127.0.0.1:9000"))


def test_credentials_are_not_in_reprs(s3):
    endpoint, bucket = s3
    loc = resolve(f"s3://{bucket}/p", StorageOptions(endpoint_url=endpoint))
    assert "testing" not in repr(loc) and "testing" not in str(loc.fs)
