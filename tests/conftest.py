"""Shared fixtures. Tests never download anything and leave no server running."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep any Ray instance a test starts on loopback (must be set before Ray starts).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_torch_seed():
    """Each test draws its own fresh random inputs, but failures can be reproduced."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield
    # pytest shows this on failure via the captured output
    print(f"torch seed for this test: {seed}")


@pytest.fixture
def repo() -> Path:
    return REPO


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """A real S3-protocol server (moto) on 127.0.0.1; yields its endpoint URL, stops it after."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto[server] is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """Credentials for the moto server (test values only) and a fresh bucket; yields (endpoint, bucket)."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return moto_server, bucket


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray for a test module (stopped after it). Ray's workers inherit the
    environment Ray starts with, so the S3 tests' (fake) credentials are set first."""
    import os

    from mambastyle.runtime import connect_ray

    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    ray = connect_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
