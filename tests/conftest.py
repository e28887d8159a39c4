"""Shared fixtures. Tests never download anything and leave no server running."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# Keep any Ray instance a test starts on loopback (must be set before Ray starts).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from helpers import REPO, free_port

# Every random draw in a test comes from one seed per test: fresh each run (so the suite keeps
# trying new inputs), or MAMBASTYLE_TEST_SEED=N for every test (to repeat a failure, or to run
# the suite under chosen seeds). The seed is printed with any failure. Tests take `rng` (numpy)
# or `_seed`; torch's, numpy's and Python's global generators are seeded alike.
SEED_ENV = "MAMBASTYLE_TEST_SEED"


def _test_seed() -> int:
    fixed = os.environ.get(SEED_ENV)
    return int(fixed) if fixed is not None else int.from_bytes(os.urandom(4), "little")


@pytest.fixture(autouse=True)
def _seed(request):
    seed = _test_seed()
    request.node.test_seed = seed
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the global generators too, for code under test that uses them
    random.seed(seed)
    yield seed


@pytest.fixture
def rng(_seed) -> np.random.Generator:
    """numpy's generator for this test, from the test's seed."""
    return np.random.default_rng(_seed)


# Tests that start servers, Ray or whole stages are `slow`; `make test-fast` runs the rest.
SERVICE_FIXTURES = {"ray_local", "s3", "moto_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = getattr(item, "test_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"{seed}: repeat with {SEED_ENV}={seed}"))
    return report


@pytest.fixture
def repo() -> Path:
    return REPO


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
    port = free_port()
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
