"""Connecting to Ray the way params.yaml says (local by default, a cluster by address)."""

from __future__ import annotations

import os


def connect_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None):
    """``ray.init`` for the ``ray`` params section; returns the ``ray`` module.

    ``address: null`` starts a private local instance (``address="local"``, so a stale
    cluster file is never picked up), kept on loopback unless the environment says
    otherwise; ``auto`` or ``ray://host:10001`` joins a cluster (num_cpus/num_gpus are then
    the cluster's own). Reuses an existing connection.
    """
    import ray

    if ray.is_initialized():
        return ray
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
    else:
        ray.init(address=address, log_to_driver=False)
    return ray
