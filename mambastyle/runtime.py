"""Connecting to Ray the way params.yaml says (local by default, a cluster by address)."""

from __future__ import annotations

import os

# glibc malloc for processes that run models on CPU. A forward pass allocates and frees the
# same large activation buffers each time; by default glibc hands such blocks back to the OS
# and page-faults them in again on the next pass (see the README for the cost). Blocks up to
# 4 GiB come from the heap (a batch of 32 at 256 px has single activations over 1 GiB), and
# up to 16 GiB of free heap top is kept: a model's peak is reused by every later batch, and
# a batch size that changes (1, then 8) no longer pushes the freed top over the threshold
# and out to the OS on every pass. Threads other than the main one (Ray Data and Ray Train
# run user code in threads of their own) get extra arenas, whose heaps cannot keep blocks
# over 64 MiB at all, so there is one arena. glibc reads these when a process starts.
ALLOCATOR_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
}


# How long a local instance keeps an idle worker process beyond its CPU count (Ray's default
# is 1 s). A stage's read tasks finish early; with the default their workers are gone by the
# time its last step (a Parquet write task) runs, which then waits ~1.3 s for a fresh worker
# to start and import Ray Data again.
LOCAL_IDLE_WORKER_MS = 60_000

_local_gcs: str | None = None  # the GCS address of the local instance connect_ray started


def worker_env() -> dict[str, str]:
    """Environment variables for the Ray workers that run models (a ``runtime_env``'s
    ``env_vars``): the allocator settings above, unless this process's environment sets them
    otherwise, and this process's OMP_NUM_THREADS if set."""
    env = {k: os.environ.get(k, v) for k, v in ALLOCATOR_ENV.items()}
    if "OMP_NUM_THREADS" in os.environ:
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    return env


def worker_options() -> dict:
    """Ray options for the actors that run models: no ``runtime_env`` where every worker
    inherits :func:`worker_env` already (a local instance started by :func:`connect_ray`, which
    puts it in the environment first), so that Ray can hand out its pre-started workers; else a
    ``runtime_env`` with the variables, which makes Ray start a worker process with them
    (about 2 s more per actor). On that local instance, actors are not restarted."""
    import ray

    ours = ray.is_initialized() and ray.get_runtime_context().gcs_address == _local_gcs
    if ours:
        # On one machine an actor dies of a bug or of memory, which a restart would only repeat;
        # restarts are for clusters, where nodes come and go (and where Ray warns that a restart
        # fails if the actor's constructor arguments were evicted from the object store).
        options: dict = {"max_restarts": 0}
        if all(os.environ.get(k) == v for k, v in worker_env().items()):
            return options
        return options | {"runtime_env": {"env_vars": worker_env()}}
    return {"runtime_env": {"env_vars": worker_env()}}


def connect_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None):
    """``ray.init`` for the ``ray`` params section; returns the ``ray`` module.

    ``address: null`` starts a private local instance (``address="local"``, so a stale
    cluster file is never picked up), kept on loopback unless the environment says
    otherwise; ``auto`` or ``ray://host:10001`` joins a cluster (num_cpus/num_gpus are then
    the cluster's own). Reuses an existing connection. A local instance's workers inherit
    this process's environment, with :data:`ALLOCATOR_ENV` added where unset, and idle ones
    are kept for :data:`LOCAL_IDLE_WORKER_MS`.
    """
    global _local_gcs
    import ray

    if ray.is_initialized():
        return ray
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        for key, value in ALLOCATOR_ENV.items():
            os.environ.setdefault(key, value)
        _token_auth_for_local_instance()
        # No metrics: a private instance has no dashboard to show them, and a driver that exits
        # soon after start can hang in the metrics exporter's final flush (seen at exit, holding
        # gigabytes, after a run that found all its work done).
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=False,
                 _system_config={"idle_worker_killing_time_threshold_ms": LOCAL_IDLE_WORKER_MS,
                                 "enable_metrics_collection": False})  # fmt: skip
        _local_gcs = ray.get_runtime_context().gcs_address
        _wait_for_cpus(ray, 1 if num_cpus is None else min(1, num_cpus))
    else:
        ray.init(address=address, log_to_driver=False)
    return ray


def _wait_for_cpus(ray, cpus: int, timeout_s: float = 30.0) -> None:
    """Returns once the new instance reports ``cpus`` available CPUs (or after ``timeout_s``).

    ``ray.init`` returns before the node's resources reach the cluster state; work submitted
    in that window sees a cluster without CPUs (Ray Data then warns that the job will hang).
    """
    import time

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.05)


def _token_auth_for_local_instance() -> None:
    """Token authentication for the instance about to start, chosen explicitly.

    With ``RAY_AUTH_MODE`` unset, Ray turns token authentication on for a new local instance and
    warns that it did, on every stage. Choosing it here keeps it on without the notice; like
    Ray's own switch, it sets the variable and has this process re-read its Ray config (read
    when Ray was imported). A mode the environment sets is left alone.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._raylet import Config
    except ImportError:  # another Ray: leave the choice (and its notice) to Ray
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def worker_logging() -> None:
    """Sends the package's INFO lines in a Ray worker to the worker's stderr (its log file in
    the session's ``logs/worker-*.err``; ``ray logs``), which Ray leaves unconfigured so that
    they would be dropped. Does nothing where logging is configured (a driver, a test)."""
    import logging

    package = logging.getLogger("mambastyle")
    if logging.getLogger().handlers or package.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def actor_device(use_gpu: bool, cpus: int):
    """The torch device of a Ray Data actor: its GPU when asked for and present, else the CPU
    with ``cpus`` threads (the CPU slots the actor holds). Sets up :func:`worker_logging`."""
    import torch

    worker_logging()
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cpus)
    return device


class TorchThread:
    """One thread for all of a Ray Data actor's model work: loading in ``__init__`` and
    inference in its calls.

    Ray Data runs an actor's ``__init__`` on the worker's main thread and its calls on
    another, while thread settings are per thread: numba's thread count, and libgomp's team
    and thread count (torch's intra-op pool). With torch work on both threads libgomp also
    keeps two teams; counting more of its threads than CPUs, it then barely spins at
    barriers, and the threads of every parallel region sleep and wake thousands of times a
    second. On one thread, the actor runs as a plain script does.
    """

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="models")

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the thread; its result, or its exception raised here."""
        return self._pool.submit(fn, *args, **kwargs).result()


def collecting_datasink(min_rows: int, write):
    """A Ray Data datasink whose write tasks call ``write(tables, task_index)`` -> list of records
    (``tables``: the task's non-empty blocks as Arrow tables, an iterator) and whose ``results``
    collect every task's records on the driver. Write tasks get at least ``min_rows`` rows."""
    import pyarrow as pa
    from ray.data.datasource import Datasink

    class CollectingSink(Datasink):
        def __init__(self):
            self.results: list = []

        @property
        def min_rows_per_write(self) -> int:
            return min_rows

        def write(self, blocks, ctx) -> list:
            tables = (b if isinstance(b, pa.Table) else pa.Table.from_pandas(b) for b in blocks)
            return write((t for t in tables if t.num_rows), ctx.task_idx)

        def on_write_complete(self, write_result) -> None:
            for task_result in write_result.write_returns:
                self.results.extend(task_result)

    return CollectingSink()


def root_cause(exc: BaseException) -> str:
    """The line that names the error in a Ray task failure. Ray's text holds the task's
    traceback, which ends with ``SomeError: message``, then Ray's own wrappers
    (``ray.exceptions...``) and advice: the last such line not from Ray, else the last line
    that mentions an error."""
    import re

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    error_line = re.compile(r"[\w.]*(Error|Exception)\b[^:]*: ")
    named = [line for line in lines if error_line.match(line) and not line.startswith("ray.")]
    errors = named or [line for line in lines if "Error" in line or "error" in line]
    return errors[-1] if errors else lines[-1] if lines else type(exc).__name__
