"""Worker environment for the Ray actors that run models (glibc allocator settings)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mambastyle.runtime import ALLOCATOR_ENV, worker_env, worker_options

# Page faults per encoder forward pass (256 px, batch 16) in a thread other than the main
# one, as Ray Data and Ray Train run user code.
FAULTS = """
import resource, threading
import torch
from mambastyle.models.encoders import build_encoder
torch.set_num_threads(2)
enc = build_encoder("mambastyle_tiny", 1024, seed=0).eval()
x = torch.rand(16, 3, 256, 256) * 2 - 1
out = []
def work():
    with torch.no_grad():
        # the heap settles within two passes (the second still grows it by 30-60k pages)
        enc(x)
        enc(x)
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        enc(x)
        enc(x)
    out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) // 2)
th = threading.Thread(target=work)
th.start()
th.join()
print(out[0])
"""


def _faults(env: dict[str, str]) -> int:
    base = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    done = subprocess.run([sys.executable, "-c", FAULTS], env={**base, **env}, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_allocator_settings_keep_freed_buffers_in_a_worker_thread():
    # glibc's defaults fault a forward pass's activations in again on every pass (~300k
    # pages here); with the settings, the buffers freed by one pass serve the next (0 faults
    # once warm; the bound leaves room for a few stray pages).
    default, tuned = _faults({}), _faults(ALLOCATOR_ENV)
    assert default > 20 * tuned, (default, tuned)


# Page faults per pass that allocates, touches and frees one 1.2 GB block with glibc's malloc
# (a batch of 32 of the full encoder has single activations that large).
BIG_BLOCK = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.restype, libc.memset.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 1200 << 20
def one_pass():
    block = libc.malloc(size)
    assert block
    libc.memset(block, 1, size)
    libc.free(block)
one_pass()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
one_pass()
one_pass()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) // 2)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_allocator_settings_keep_a_block_over_a_gibibyte():
    base = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}

    def faults(**limits):
        overrides = {f"MALLOC_{k.upper()}_THRESHOLD_": str(v) for k, v in limits.items()}
        env = {**base, **ALLOCATOR_ENV, **overrides}
        done = subprocess.run([sys.executable, "-c", BIG_BLOCK], env=env, capture_output=True, text=True,
                              check=True)  # fmt: skip
        return int(done.stdout.strip())

    # The block is ~300k pages. A 1 GiB mmap threshold maps and unmaps it on every pass; a 1 GiB
    # trim threshold gives it back to the OS as the heap's free top; with the settings it stays
    # (the bound leaves room for a few stray pages).
    assert faults(mmap=1 << 30) > 250_000
    assert faults(trim=1 << 30) > 250_000
    assert faults() < 5_000


def test_worker_env_defaults_and_what_the_user_set(monkeypatch):
    for key in (*ALLOCATOR_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    assert worker_env() == ALLOCATOR_ENV
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_env() == {**ALLOCATOR_ENV, "MALLOC_ARENA_MAX": "4", "OMP_NUM_THREADS": "3"}


def _actor_env(ray, options: dict) -> dict:
    @ray.remote(num_cpus=0)
    def env():
        return {k: os.environ.get(k) for k in ALLOCATOR_ENV}

    return ray.get(env.options(**options).remote())


def test_local_instance_workers_inherit_the_settings(ray_local):
    # connect_ray put them in the environment before starting Ray: no runtime_env needed, so
    # Ray can hand out the workers it started in advance.
    # (and actors are not restarted on one machine, where a crash would only repeat)
    assert worker_options() == {"max_restarts": 0}
    assert _actor_env(ray_local, {}) == {k: worker_env()[k] for k in ALLOCATOR_ENV}


def test_local_instance_keeps_idle_workers_for_the_next_tasks(ray_local):
    # More workers than CPUs (tasks that ask for no CPU, as the stages' read and write tasks
    # do), then a pause longer than Ray's default idle limit (1 s): the next tasks find the
    # same workers instead of waiting for new processes to start. Ray hands tasks to idle
    # workers first, so the first round also takes in any idle worker from before (the
    # module's instance has at most three).
    @ray_local.remote(num_cpus=0)
    def pid(wait):
        import time

        time.sleep(wait)
        return os.getpid()

    def round_of_four():
        # each task outlasts a worker's start-up on a busy machine, so the four run side by side
        return set(ray_local.get([pid.remote(3.0) for _ in range(4)]))

    first = round_of_four()
    assert len(first) == 4
    import time

    time.sleep(3)
    assert round_of_four() <= first


def test_other_ray_instances_get_the_settings_through_runtime_env(monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for key in ALLOCATOR_ENV:  # Ray starts without them, as a cluster node may
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        options = worker_options()
        assert options == {"runtime_env": {"env_vars": worker_env()}}
        assert _actor_env(ray, {}) == dict.fromkeys(ALLOCATOR_ENV)  # what a plain worker has
        assert _actor_env(ray, options) == ALLOCATOR_ENV
    finally:
        ray.shutdown()


def test_worker_logging_reaches_stderr_only_where_nothing_handles_logs():
    code = (
        "import logging, sys\n"
        "if sys.argv[1] == 'configured': logging.basicConfig(level=logging.INFO, format='root %(message)s')\n"
        "from mambastyle.runtime import worker_logging\n"
        "worker_logging(); worker_logging()\n"
        "logging.getLogger('mambastyle.invert.pipeline').info('scan backend cpu on cpu')\n"
    )
    bare = subprocess.run([sys.executable, "-c", code, "bare"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0, bare.stderr
    assert bare.stderr.count("scan backend cpu on cpu") == 1  # once, though called twice
    assert "mambastyle.invert.pipeline INFO" in bare.stderr
    configured = subprocess.run([sys.executable, "-c", code, "configured"], capture_output=True, text=True,
                                timeout=60)  # fmt: skip
    assert configured.stderr.splitlines() == ["root scan backend cpu on cpu"]  # the driver's format, once
