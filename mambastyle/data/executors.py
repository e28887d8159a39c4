"""Where the prepare stage's per-input work runs: in this process, a local process pool, or one
Ray task per input; outcomes come back in input order, and a crashed worker becomes a
``worker_crash`` outcome for the input that killed it."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Literal

from mambastyle.data.faces import Outcome, PrepareConfig, process_input
from mambastyle.data.inputs import InputRef


def _process_star(args):
    return process_input(*args)


def _crashed(ref: InputRef) -> Outcome:
    return Outcome(
        ref.uri,
        reason="worker_crash",
        message="the worker process died on this input (crash or out of memory)",
    )


def isolated(ref: InputRef, config: PrepareConfig) -> Outcome:
    """Runs one input in a process of its own, so that a crash is pinned on that input."""
    with ProcessPoolExecutor(max_workers=1) as pool:
        try:
            return pool.submit(_process_star, (ref, config)).result()
        except BrokenProcessPool:
            return _crashed(ref)


Executor = Literal["processes", "ray"]


def run_inputs(
    refs: list[InputRef], config: PrepareConfig, workers: int = 1, executor: Executor = "processes"
) -> Iterator[Outcome]:
    """Outcomes in input order.

    ``processes``: ``workers`` local processes (1 = in this process). ``ray``: one Ray task
    per input on the cluster the caller has connected to (``ray.init``), two per cluster
    CPU in flight; inputs must be readable from every node (S3, shared storage, or
    in-memory bytes). Failed tasks (a lost node) are retried by Ray.
    """
    if executor == "ray":
        yield from _run_inputs_ray(refs, config)
        return
    if workers <= 1:
        for ref in refs:
            yield process_input(ref, config)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_process_star, [(r, config) for r in refs], chunksize=4)


def _run_inputs_ray(refs: list[InputRef], config: PrepareConfig) -> Iterator[Outcome]:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("executor 'ray' needs a connected Ray (ray.init) first")
    task = ray.remote(num_cpus=1, max_retries=3)(process_input)
    config_ref = ray.put(config)
    in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[int, object] = {}
    next_submit = 0
    for i in range(len(refs)):
        # Keep a bounded window of tasks running; results are yielded in input order.
        while next_submit < len(refs) and next_submit < i + in_flight:
            pending[next_submit] = task.remote(refs[next_submit], config_ref)
            next_submit += 1
        try:
            yield ray.get(pending.pop(i))
        except ray.exceptions.WorkerCrashedError:  # still dying after Ray's retries
            yield _crashed(refs[i])
