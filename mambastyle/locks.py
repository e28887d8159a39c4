"""One writer per storage root: a lock object at ``{root}/_writer.lock`` held while a stage writes.

Two runs writing one root (two ``dvc repro`` on one machine, a CLI run beside a pipeline, two
cluster jobs) could interleave their shards, parts and manifests. The second run fails at once
with :class:`RootLocked`, naming the holder (host, pid, what it runs, since when).

- Local roots: an exclusive ``flock`` on the lock file for the duration of the run. The kernel
  drops it when the holder dies, however it dies, so a dead run's lock is free at once; the
  file itself (holder details, emptied on release) stays.
- S3 roots: the lock object is created with a conditional put (``If-None-Match: *``), which S3
  lets only one writer win. The holder rewrites it every :data:`HEARTBEAT_S` seconds; a lock
  whose heartbeat is older than :data:`STALE_AFTER_S` belongs to a dead run and is taken over
  with a put conditional on the ETag read (``If-Match``), so of two runs taking it over one
  wins. A holder that finds its lock taken (it stalled past the stale limit) fails on release
  rather than let its results pass as the only writer's.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # storage brings pyarrow; the CLI imports this module for RootLocked alone
    from mambastyle.storage import Location, StorageOptions

log = logging.getLogger(__name__)


class RootLocked(RuntimeError):
    """Another run holds the root's writer lock (or took it over from this one)."""


LOCK_NAME = "_writer.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _holder(what: str) -> dict:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "what": what,
        "started": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "heartbeat": now,
    }


def _describe(holder: dict) -> str:
    return (
        f"{holder.get('what', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"since {holder.get('started', '?')})"
    )


@contextmanager
def writer_lock(root: str, options: StorageOptions | None, what: str) -> Iterator[None]:
    """Holds ``{root}/_writer.lock`` while the block runs; raises :class:`RootLocked` at once
    when another live run holds it. ``what`` names this run in the holder details."""
    from mambastyle.storage import StorageOptions, resolve

    loc = resolve(root, options).join(LOCK_NAME)
    manager = _s3_lock if loc.is_s3 else _local_lock
    with manager(loc, options or StorageOptions(), _holder(what)):
        yield


@contextmanager
def _local_lock(loc: Location, options: StorageOptions, holder: dict) -> Iterator[None]:
    import fcntl

    os.makedirs(os.path.dirname(loc.path), exist_ok=True)
    fd = os.open(loc.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RootLocked(f"{_root_of(loc)} is being written by {_describe(_read_local(fd))}; "
                             f"wait for it to finish or stop it (lock: {loc.uri})") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released: no holder to name
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_local(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
        return {}


def _root_of(loc: Location) -> str:
    return loc.uri[: -len(LOCK_NAME)].rstrip("/")


def _s3_client(options: StorageOptions):
    import boto3

    session = boto3.Session(profile_name=options.profile) if options.profile else boto3.Session()
    region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return session.client("s3", endpoint_url=options.endpoint_url, region_name=region or "us-east-1")


def _precondition_failed(exc) -> bool:
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


@contextmanager
def _s3_lock(loc: Location, options: StorageOptions, holder: dict) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_client(options)
    bucket, _, key = loc.path.partition("/")

    def put(**condition) -> str:
        holder["heartbeat"] = time.time()
        body = json.dumps(holder).encode()
        return client.put_object(Bucket=bucket, Key=key, Body=body, **condition)["ETag"]

    try:
        try:
            etag = put(IfNoneMatch="*")
        except ClientError as exc:
            if not _precondition_failed(exc):
                raise
            etag = _take_over_if_stale(client, bucket, key, loc, put)
    except (BotoCoreError, ClientError) as exc:  # unreachable, refused: a storage error, in one line
        raise OSError(f"cannot take the writer lock {loc.uri}: {exc}") from None
    state = {"etag": etag, "lost": False}
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                state["etag"] = put(IfMatch=state["etag"])
            except ClientError as exc:
                if _precondition_failed(exc):  # another run took the lock over
                    state["lost"] = True
                    log.error("the writer lock %s was taken over by another run", loc.uri)
                    return
                log.warning("writer lock heartbeat failed (will retry): %s", exc)

    thread = threading.Thread(target=beat, name="writer-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if not state["lost"]:
            try:
                current = client.head_object(Bucket=bucket, Key=key)["ETag"]
            except ClientError:
                current = None
            if current == state["etag"]:
                client.delete_object(Bucket=bucket, Key=key)
    if state["lost"]:
        raise RootLocked(
            f"{_root_of(loc)}: another run took over the writer lock while this one ran (its "
            f"heartbeat stopped for over {STALE_AFTER_S:.0f} s); its results are suspect"
        )


def _take_over_if_stale(client, bucket: str, key: str, loc: Location, put) -> str:
    from botocore.exceptions import ClientError

    try:
        found = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:  # released between our put and this read: try once more
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return put(IfNoneMatch="*")
        raise
    try:
        other = json.loads(found["Body"].read() or b"{}")
    except ValueError:
        other = {}
    age = time.time() - float(other.get("heartbeat", 0))
    if age <= STALE_AFTER_S:
        raise RootLocked(f"{_root_of(loc)} is being written by {_describe(other)}; wait for it to "
                         f"finish or stop it (lock: {loc.uri}, heartbeat {age:.0f} s ago)")  # fmt: skip
    try:
        etag = put(IfMatch=found["ETag"])
    except ClientError as exc:
        if _precondition_failed(exc):
            raise RootLocked(f"{_root_of(loc)}: another run took over the stale writer lock first") from None
        raise
    log.warning("took over the writer lock of %s from %s (no heartbeat for %.0f s)", _root_of(loc),
                _describe(other), age)  # fmt: skip
    return etag
