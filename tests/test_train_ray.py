"""Training on Ray Train: DDP over a 2-node local cluster, a killed worker resumed from S3
checkpoints, and `ray job submit` of the stage's entry point. Each fit() costs ~35 s here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import REPO, cmdline, free_port, params, write_shards

from mambastyle.config import to_dict
from mambastyle.runs import RUNS_DIR, TrainJob, export_encoder, load_state, run_id
from mambastyle.storage import StorageOptions, list_files, read_bytes, resolve
from mambastyle.train.distributed import fit

pytestmark = pytest.mark.slow

TRAIN = {"steps": 12, "batch_size": 2, "synthetic_ratio": 0.5, "checkpoint_every": 4, "eval_every": 4,
         "log_every": 2, "image_every": 8, "cpus_per_worker": 1, "eval_samples": 4}  # fmt: skip


def _job(root: str, endpoint: str | None = None, **train) -> TrainJob:
    storage = {"root": root, "endpoint_url": endpoint}
    p = params(train={**TRAIN, **train}, storage=storage)
    manifest = read_bytes(resolve(root, p.storage.options()).join("shards", "manifest.json"))
    return TrainJob(p.train, p.generator, p.storage, run_id(p.train, p.generator, manifest))


def _history(job: TrainJob) -> list[dict]:
    return [
        json.loads(line) for line in read_bytes(job.artifacts.join("metrics.jsonl")).decode().splitlines()
    ]


def test_ddp_on_a_two_node_cluster(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    root = resolve(str(tmp_path / "data"))
    write_shards(root, {"train": [3, 3, 2], "val": [2]})
    # Two nodes with one CPU each and workers that need one CPU each: one worker per node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        job = _job(root.uri, num_workers=2)
        result = fit(job)
    finally:
        ray.shutdown()
        cluster.shutdown()
    history = _history(job)
    assert [m["step"] for m in history] == list(range(2, 13, 2))
    assert all(m["world_size"] == 2 for m in history)
    # gloo all-reduce kept both replicas bit-identical at every checkpoint
    assert [m["step"] for m in history if m.get("replicas_in_sync") == 1.0] == [4, 8, 12]
    state = load_state(result.checkpoint)
    assert state["step"] == 12 and state["real_samples"] == 6 * 2  # 6 real steps x batch 2 on each rank
    loc, sha, meta = export_encoder(job, state)
    assert meta["generator"]["n_styles"] == 8 and len(sha) == 64
    assert list_files(job.artifacts.join("images"))  # reconstruction grids


def _kill_worker_after(run_dir: Path | None, job: TrainJob, checkpoint: str, done: threading.Event) -> None:
    """Waits for ``checkpoint`` to appear in the run directory, then SIGKILLs the train worker."""
    ckpt = job.location(RUNS_DIR, job.run_id, checkpoint, "state.pt")
    while not done.is_set():
        if list_files(ckpt):
            for proc in psutil.Process().children(recursive=True):  # only this test's Ray
                if "RayTrainWorker" in " ".join(cmdline(proc)):
                    proc.kill()
                    done.set()
            return
        time.sleep(0.2)


def test_killed_worker_resumes_from_the_last_s3_checkpoint(s3):
    from mambastyle.runtime import connect_ray

    endpoint, bucket = s3
    root = resolve(f"s3://{bucket}/data", StorageOptions(endpoint_url=endpoint))
    write_shards(root, {"train": [4, 3], "val": [2]})
    job = _job(root.uri, endpoint, steps=24, max_failures=2)
    ray = connect_ray(None, num_cpus=2)
    killed = threading.Event()
    killer = threading.Thread(target=_kill_worker_after, args=(None, job, "checkpoint_00000008", killed))
    killer.start()
    try:
        result = fit(job)
        history = _history(job)
        # The same job again (a re-submitted or re-run stage): the finished run is found in S3
        # and not trained again.
        again = fit(job)
        assert load_state(again.checkpoint)["step"] == 24 and _history(job) == history
    finally:
        killed.set()
        killer.join()
        ray.shutdown()
    history = _history(job)
    steps = [m["step"] for m in history]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # no step twice, none lost at the end
    resumed = {m["start_step"] for m in history} - {0}
    # killed once checkpoint 8 was uploading: restarted from 8, or from 4 if 8 was not yet committed
    assert resumed and resumed <= {4, 8}, f"no restart from a checkpoint: {resumed}"
    assert all(m["step"] > m["start_step"] for m in history)
    assert load_state(result.checkpoint)["step"] == 24
    assert any("checkpoint_00000024/state.pt" in p for p in list_files(job.location(RUNS_DIR, job.run_id)))


def _stop_cluster(temp_dir: str) -> None:
    """Kills the processes of the Ray started with ``--temp-dir=temp_dir`` (and theirs)."""
    procs = [p for p in psutil.process_iter() if temp_dir in " ".join(cmdline(p))]
    for proc in list(procs):
        try:
            procs += proc.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def test_ray_job_submit_runs_the_stage_entry_point(tmp_path):
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    root = resolve(str(tmp_path / "data"))
    write_shards(root, {"train": [3, 3], "val": [2]})
    p = params(train={**TRAIN, "steps": 4}, storage={"root": root.uri}, ray={"address": "auto"})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(p)))
    port, dash, agent = free_port(), free_port(), free_port()
    # A private temp dir marks this cluster's processes, so the test stops exactly them (`ray stop`
    # would stop every Ray of the user on the machine). Short: Ray's socket paths live under it.
    # Free ports throughout: the job agent's default port is taken by any other Ray on the machine.
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    start = [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
             f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={agent}"]  # fmt: skip
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        runtime_env = {"excludes": [".git", "data", ".venv", ".dvc/cache", "**/__pycache__"]}
        submit = [
            str(ray_bin),
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dash}",
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "-m",
            "pipelines.train",
            "--params",
            str(params_file),
            "--out",
            str(tmp_path / "out"),
            "--metrics",
            str(tmp_path / "metrics"),
        ]
        deadline = time.time() + 120
        while True:  # the job agent comes up a little after `ray start` returns (later on a busy machine)
            proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
            if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
                break  # (that answer means nothing was submitted, so retrying is safe)
            time.sleep(2)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not [p for p in psutil.process_iter() if temp_dir in " ".join(cmdline(p))], "Ray left running"
    record = json.loads((tmp_path / "out" / "encoder.json").read_text())
    assert record["step"] == 4 and Path(record["uri"]).is_file()
    assert json.loads((tmp_path / "metrics" / "train.json").read_text())["step"] == 4
    assert (tmp_path / "metrics" / "train" / "loss" / "total.tsv").is_file()
    assert shutil.which("ray", path=str(ray_bin.parent))
