"""The stages one after another, as DVC runs them (each its own process), on S3 (moto)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from helpers import params

from mambastyle.config import to_dict
from mambastyle.latents import EDITS_FORMAT, open_table
from mambastyle.report import pipeline_report
from mambastyle.storage import StorageOptions, exists, read_bytes, resolve

pytestmark = pytest.mark.slow

STAGES = ("prepare", "train", "fuser", "invert", "evaluate", "edit")
ALARM = re.compile(r"\bWARNING\b|\bERROR\b|^\[.* E \d+ ")  # Python logging, and glog's "E pid" lines
OURS = re.compile(r" (mambastyle|pipelines)\.[\w.]+ (WARNING|ERROR) ")


def test_prepare_train_invert_evaluate_edit_on_s3(s3, tmp_path, repo):
    endpoint, bucket = s3
    root = f"s3://{bucket}/data"
    p = params(storage={"root": root, "endpoint_url": endpoint}, ray={"num_cpus": 2},
               prepare={"output_size": 32, "workers": 2}, train={"steps": 6},
               fuser={"enabled": True, "steps": 4}, edit={"mode": "fuser"})  # fmt: skip
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(to_dict(p)))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the fixture's test credentials
    local = {stage: tmp_path / stage for stage in STAGES}
    for stage in STAGES:
        cmd = [sys.executable, f"pipelines/{stage}.py", "--params", str(pf), "--out", str(local[stage]),
               "--metrics", str(tmp_path / "metrics")]  # fmt: skip
        if stage in ("evaluate", "edit"):
            cmd += ["--invert-out", str(local["invert"])]
        run = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"{stage} failed:\n{run.stderr[-4000:]}"
        # quiet: warnings and errors only from the project's own loggers (about the user's data
        # or settings), none from Ray's machinery (authentication, restarts, resources)
        alarms = [line for line in run.stderr.splitlines() if ALARM.search(line) and not OURS.search(line)]
        assert not alarms, f"{stage}:\n" + "\n".join(alarms)
    options = StorageOptions(endpoint_url=endpoint)
    # every stage's data is on S3; the local records name it
    prepared = json.loads((local["prepare"] / "manifest.json").read_text())
    assert exists(resolve(f"{root}/shards/manifest.json", options))
    assert prepared["counts"]["written"] > 10
    encoder = json.loads((local["train"] / "encoder.json").read_text())
    assert encoder["step"] == 6 and str(encoder["uri"]).startswith(f"{root}/train-runs/")
    fused = json.loads((local["fuser"] / "fuser.json").read_text())
    assert fused["step"] == 4 and str(fused["uri"]).startswith(f"{root}/fuser-runs/")
    assert fused["encoder"]["uri"] == encoder["uri"]
    inverted = json.loads((local["invert"] / "manifest.json").read_text())
    latents = open_table(inverted["table"], options)
    assert inverted["table"].startswith(f"{root}/latents/run-")
    assert latents.manifest["rows"] == prepared["counts"]["written"]
    assert latents.metadata["fuser_uri"] == fused["uri"] and "mse_fuser" in latents.metadata["metrics"]
    evaluated = json.loads((local["evaluate"] / "metrics.json").read_text())
    assert (
        evaluated["images"] == latents.manifest["splits"]["test"] and evaluated["reconstruction"]["mse"] > 0
    )
    assert evaluated["reconstruction_fuser"]["mse"] > 0
    edited = json.loads((local["edit"] / "metrics.json").read_text())
    table = open_table(edited["table"], options, fmt=EDITS_FORMAT)
    n_test = latents.manifest["splits"].get("test", 0)
    strengths = p.edit.edits[0].strengths
    assert n_test > 0 and table.manifest["rows"] == n_test * len(strengths) == edited["rows"]
    assert table.metadata["source_table"] == inverted["table"] and table.metadata["mode"] == "fuser"
    assert (local["edit"] / "grids" / "yaw.png").is_file()
    # the summary `make demo` ends with names every result, read from these records
    report = "\n".join(pipeline_report(tmp_path, root))
    pictures = [local["edit"] / "grids" / "yaw.png", local["evaluate"] / "reconstructions.png"]
    for where in [
        inverted["table"],
        edited["table"],
        encoder["uri"],
        fused["uri"],
        f"{root}/shards/",
        *pictures,
    ]:
        assert str(where) in report
    assert "not run yet: generator " in report  # this test runs the generator in-process
    # the headline metrics agree with the records they summarise, and the curves reach the last step
    head = {stage: json.loads((tmp_path / "metrics" / f"{stage}.json").read_text()) for stage in STAGES}
    assert head["prepare"]["counts"]["written"] == prepared["counts"]["written"]
    assert head["invert"]["counts"]["rows"] == latents.manifest["rows"]
    # bound: the same figure, each rounded to 6 significant digits (<= 5e-6 relative)
    assert head["evaluate"]["quality"]["mse"] == pytest.approx(evaluated["reconstruction"]["mse"], rel=1e-5)
    assert head["edit"]["counts"]["rows"] == edited["rows"]
    assert head["train"]["step"] == 6 and head["fuser"]["step"] == 4 and head["fuser"]["enabled"]
    for stage, steps in (("train", 6), ("fuser", 4)):
        curve = (tmp_path / "metrics" / stage / "loss" / "total.tsv").read_text().splitlines()
        assert curve[0] == "step\ttotal" and int(curve[-1].split("\t")[0]) == steps
    assert set(json.loads((tmp_path / "metrics" / "latency.json").read_text())) >= {"ms_per_image"}
    # each writing stage's run statistics, beside its manifest and in its records; counts add up
    stats = {
        stage: json.loads((local[stage] / "stats.json").read_text())
        for stage in ("prepare", "invert", "edit")
    }
    for stage, s in stats.items():
        assert s["stage"] == stage and s["inputs"] == s["computed"] + s["reused"], s
    assert stats["prepare"]["written"] == prepared["counts"]["written"]
    assert stats["invert"]["inputs"] == stats["invert"]["written"] == latents.manifest["rows"]
    assert stats["edit"]["inputs"] == n_test and stats["edit"]["written"] == edited["rows"]
    assert stats["invert"] == json.loads(read_bytes(resolve(f"{inverted['table']}/_stats.json", options)))
    assert report.count("            run: ") == 3


def test_report_lists_stages_that_have_not_run(tmp_path, capsys):
    from mambastyle.cli import main

    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(to_dict(params())))
    assert main(["report", "--params", str(pf), "--records", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert f"not run yet: {', '.join(('generator',) + STAGES)} (no records under {tmp_path / 'none'}/" in out
