"""One writer per storage root (``mambastyle.locks``): a second run fails at once naming the
holder, a dead run's lock is taken over, and on S3 of two runs taking over one wins."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from mambastyle import locks
from mambastyle.locks import RootLocked, writer_lock
from mambastyle.storage import StorageOptions

HOLD = """
import sys, time
from mambastyle.locks import writer_lock
with writer_lock(sys.argv[1], None, "a test holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder_process(root: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, root], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_local_run_fails_at_once_and_a_dead_runs_lock_is_free(tmp_path, capsys):
    from helpers import params

    root = tmp_path / "root"
    holder = _holder_process(str(root))
    try:
        t0 = time.monotonic()
        with pytest.raises(RootLocked, match=rf"a test holder \(pid {holder.pid} on "):
            with writer_lock(str(root), None, "second"):
                pytest.fail("entered a held lock")
        assert time.monotonic() - t0 < 5
        # a real stage through the CLI: one line, nothing written under the root
        import yaml

        from mambastyle.cli import main
        from mambastyle.config import to_dict

        pf = tmp_path / "params.yaml"
        pf.write_text(yaml.safe_dump(to_dict(params())))
        photos = tmp_path / "photos"
        photos.mkdir()
        (photos / "a.jpg").write_bytes(b"not a photo")
        assert (
            main(["data", "prepare", "--params", str(pf), "--input", str(photos), "--output", str(root)]) == 1
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is being written by a test holder" in err[0], err
        assert sorted(p.name for p in root.iterdir()) == [locks.LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing anything
        holder.wait()
    with writer_lock(str(root), None, "after the holder died"):
        assert json.loads((root / locks.LOCK_NAME).read_text())["what"] == "after the holder died"
    assert (root / locks.LOCK_NAME).read_text() == ""  # released: nobody to name


def _s3_lock_object(endpoint, bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return client, f"data/{locks.LOCK_NAME}"


def test_s3_one_writer_release_and_stale_takeover(s3, caplog):
    endpoint, bucket = s3
    options = StorageOptions(endpoint_url=endpoint)
    root = f"s3://{bucket}/data"
    client, key = _s3_lock_object(endpoint, bucket)
    with writer_lock(root, options, "first"):
        with pytest.raises(RootLocked, match="is being written by first"):
            with writer_lock(root, options, "second"):
                pytest.fail("entered a held lock")
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=key)  # released
    # a run that died: its heartbeat stopped long ago
    dead = {"what": "dead run", "pid": 1, "host": "elsewhere", "started": "then",
            "heartbeat": time.time() - locks.STALE_AFTER_S - 5}  # fmt: skip
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(dead).encode())
    with caplog.at_level("WARNING", logger="mambastyle.locks"), writer_lock(root, options, "taker"):
        body = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert body["what"] == "taker"
    assert "took over the writer lock" in caplog.text and "dead run" in caplog.text


def test_s3_of_two_runs_taking_over_a_stale_lock_one_wins(s3):
    endpoint, bucket = s3
    options = StorageOptions(endpoint_url=endpoint)
    root = f"s3://{bucket}/data"
    client, key = _s3_lock_object(endpoint, bucket)
    dead = {"what": "dead run", "heartbeat": time.time() - locks.STALE_AFTER_S - 5}
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(dead).encode())
    barrier, inside, results = threading.Barrier(2), threading.Event(), {}

    def run(name):
        barrier.wait()
        try:
            with writer_lock(root, options, name):
                results[name] = "held"
                inside.wait(10)  # hold until both have tried
        except RootLocked as exc:
            results[name] = str(exc)
            inside.set()

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(v == "held" for v in results.values()) == [False, True], results


def test_s3_a_holder_whose_lock_was_taken_fails_on_release(s3, monkeypatch):
    endpoint, bucket = s3
    options = StorageOptions(endpoint_url=endpoint)
    client, key = _s3_lock_object(endpoint, bucket)
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    with pytest.raises(RootLocked, match="took over the writer lock while this one ran"):
        with writer_lock(f"s3://{bucket}/data", options, "stalled"):
            # another run took it over (as it would after this one stalled past the limit)
            client.put_object(Bucket=bucket, Key=key, Body=json.dumps({"what": "other"}).encode())
            time.sleep(0.5)
    assert json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())["what"] == "other"
