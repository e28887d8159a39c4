"""Dataset-scale benchmark: prepare -> invert -> edit on N generated face photos (not in CI).

Every stage runs as the CLI runs it (its own driver process, a local Ray), on photos made here:
two face photos that ship with installed packages (scikit-image's astronaut, matplotlib's
Grace Hopper), each copy turned, scaled, shifted, re-lit and JPEG-compressed at random. Printed,
each as a ratio against a baseline measured in the same run:

1. resume: the pipeline (prepare, invert, edit in turn, as ``dvc repro`` runs them) killed once
   half its work is saved, then run again from its first stage; the second run's time over the
   uninterrupted run's (target <= 0.55). Also each stage on its own, killed
   once about half its work is saved and run again, against its own uninterrupted time (where a
   stage's fixed start-up is a large share of its run, its own ratio shows it).
2. incremental: 10% new photos added; prepare (extend) + invert + edit over all photos, against
   the three stages' uninterrupted times (target <= 0.15).
3. driver memory: the edit driver's peak RSS editing N rows vs N/10 rows (target <= 1.2).

The stages' throughput against the bare model forward is measured by ``benchmarks/invert.py``
and ``benchmarks/edit.py``.

Usage:
    python benchmarks/scale.py [--images 10000] [--workers 2] [--keep DIR]
                               [--phases memory,resume,pipeline,grow]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGE_TIMEOUT_S = 4 * 3600


def base_faces() -> list[np.ndarray]:
    """Face-centred 256 px crops of the photos that ship with installed packages."""
    import matplotlib
    import skimage.data
    from PIL import Image

    from mambastyle.data.align import detect_faces

    grace = Image.open(Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg")
    out = []
    for img in (skimage.data.astronaut(), np.asarray(grace.convert("RGB"))):
        left, top, right, bottom = detect_faces(img, min_score=0.5)[0].box
        cx, cy, half = (left + right) / 2, (top + bottom) / 2, 1.3 * max(right - left, bottom - top)
        crop = Image.fromarray(img).crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half)))
        out.append(np.asarray(crop.resize((256, 256), Image.Resampling.LANCZOS)))
    return out


def make_photos(folder: Path, first: int, count: int, seed: int = 0) -> None:
    """Photos ``first`` .. ``first + count - 1``: a base face turned up to 10 degrees, scaled
    0.9-1.15, shifted, with brightness, contrast and noise varied, JPEG quality 80-95."""
    from PIL import Image

    faces = base_faces()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        rng = np.random.default_rng([seed, i])
        img = Image.fromarray(faces[i % len(faces)])
        angle, scale = rng.uniform(-10, 10), rng.uniform(0.9, 1.15)
        a = math.radians(angle)
        cos, sin = math.cos(a) / scale, math.sin(a) / scale
        dx, dy = rng.uniform(-12, 12, 2)
        c = 128.0
        coeffs = (cos, sin, c - c * cos - c * sin + dx, -sin, cos, c + c * sin - c * cos + dy)
        img = img.transform((256, 256), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
        px = np.asarray(img).astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
        px += rng.normal(0, rng.uniform(1, 6), px.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(
            buf, "JPEG", quality=int(rng.integers(80, 96))
        )
        (folder / f"face_{i:06d}.jpg").write_bytes(buf.getvalue())


def write_inputs(tmp: Path, workers: int) -> Path:
    """params.yaml for the runs, the tiny encoder checkpoint and the edit direction."""
    import torch
    import yaml

    from mambastyle.checkpoints import save_encoder, state_sha256
    from mambastyle.config import load_params, to_dict
    from mambastyle.generate import resolve_generator
    from mambastyle.models.encoders import build_encoder

    p = to_dict(load_params(REPO / "params.yaml"))
    gp = load_params(REPO / "params.yaml").generator
    g = resolve_generator(None, gp.architecture, gp.init_seed, gp.latent_avg_samples)
    enc = build_encoder("mambastyle_tiny", gp.architecture.resolution, seed=0, input_size=64,
                        style_dim=g.style_dim).eval()  # fmt: skip
    enc.set_latent_avg(g.latent_avg)
    made_for = {"sha256": state_sha256(g), "n_styles": g.n_styles, "resolution": gp.architecture.resolution}
    save_encoder(enc, str(tmp / "encoder.pt"), generator=made_for)
    direction = np.random.default_rng(0).normal(size=g.style_dim).astype(np.float32)
    torch.save(torch.from_numpy(direction / np.linalg.norm(direction)), tmp / "direction.pt")
    p["storage"]["root"] = str(tmp / "root")
    p["prepare"].update(workers=workers, executor="processes", mode="extend")
    p["invert"].update(encoder=str(tmp / "encoder.pt"), metrics=False)
    p["edit"].update(table=None, where="true", mode="w_plus", output="shards", grid_samples=2, edits=[
        {"name": "d", "source": "interfacegan", "uri": str(tmp / "direction.pt"), "component": None,
         "absolute": False, "column": None, "labels": None, "fit_where": None, "space": "W",
         "strengths": [-1.0, 1.0], "layers": None},
    ])  # fmt: skip
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


class Stage:
    """One CLI stage run as its own process: its wall time and the driver's peak RSS."""

    def __init__(self, args: list[str], params: Path):
        self.cmd = [sys.executable, "-m", "mambastyle.cli", *args, "--params", str(params), "--json"]
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def run(self, kill_when=None) -> tuple[float, int, dict | None]:
        """(seconds, peak driver RSS in bytes, the printed statistics or None when killed)."""
        import psutil

        t0 = time.perf_counter()
        pipe = subprocess.PIPE
        proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=pipe, stderr=pipe, text=True)
        driver, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                peak = max(peak, driver.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            if kill_when is not None and kill_when():
                family = [driver, *driver.children(recursive=True)]
                for p in family:
                    try:
                        p.send_signal(signal.SIGKILL)
                    except psutil.NoSuchProcess:
                        pass
                proc.wait()
                psutil.wait_procs(family, timeout=60)
                return time.perf_counter() - t0, peak, None
            if time.perf_counter() - t0 > STAGE_TIMEOUT_S:
                raise TimeoutError(" ".join(self.cmd))
            time.sleep(0.05)
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(self.cmd)} failed:\n{err[-3000:]}")
        return time.perf_counter() - t0, peak, json.loads(out)


def parquet_rows(folder: Path) -> int:
    import pyarrow.parquet as pq

    total = 0
    for f in folder.rglob("*.parquet"):
        if not f.name.startswith("."):
            try:
                total += pq.ParquetFile(f).metadata.num_rows
            except Exception:  # being written: counted on the next look
                pass
    return total


def done(what: str, stats: dict) -> None:
    keys = ("inputs", "computed", "reused", "written")
    print(f"{what}: " + ", ".join(f"{k} {stats[k]}" for k in keys), flush=True)


def newest_table(folder: Path) -> Path:
    return max((d for d in folder.glob("run-*") if (d / "_manifest.json").exists()),
               key=lambda d: (d / "_manifest.json").stat().st_mtime)  # fmt: skip


def full_runs(stages: dict, edit, memory: bool = True) -> tuple[dict, int]:
    """Each stage once, uninterrupted: (seconds per stage, selected rows); and the driver memory."""
    full = {}
    for name in ("prepare", "invert"):
        full[name], _, stats = stages[name].run()
        done(f"full {name}: {full[name]:.0f} s", stats)
    full["edit"], peak_full, stats = edit().run()
    done(f"full edit: {full['edit']:.0f} s", stats)
    selected = stats["inputs"]
    if not memory:
        return full, selected
    # driver memory: the same job on a tenth of the rows (another selection: computed afresh)
    _, peak_tenth, tenth = edit("hash(key) % 10 = 0").run()
    print(f"3. edit driver peak RSS: {peak_full / 2**20:.0f} MiB for {selected} rows vs "
          f"{peak_tenth / 2**20:.0f} MiB for {tenth['inputs']}: ratio {peak_full / peak_tenth:.3f} "
          "(target <= 1.2)", flush=True)  # fmt: skip
    return full, selected


def progress(root: Path, n: int, selected: int) -> dict:
    """Per stage, the share of its work saved so far (0..1): prepare's saved units of 64 inputs,
    invert's written rows, edit's written rows (one per selected row and strength)."""
    units = math.ceil(n / 64)
    return {
        "prepare": lambda: len(list((root / "shards" / "_work").glob("unit-*.tar"))) / units,
        "invert": lambda: parquet_rows(root / "latents") / n,
        "edit": lambda: parquet_rows(root / "edits") / (2 * selected),
    }


def resume_runs(stages: dict, edit, root: Path, n: int, selected: int, full: dict) -> None:
    """Each stage's outputs removed, the stage killed at about half its work, then run again."""
    shutil.rmtree(root / "shards")
    share = progress(root, n, selected)
    resumed = {}
    for name in ("prepare", "invert", "edit"):
        if name == "invert":
            for folder in ("latents", "edits"):
                shutil.rmtree(root / folder, ignore_errors=True)
        stage = edit() if name == "edit" else stages[name]
        stage.run(lambda name=name: share[name]() >= 0.5)
        resumed[name], _, stats = stage.run()
        done(f"   {name} re-run after a kill", stats)
    for name in ("prepare", "invert", "edit"):
        print(f"1a. resume {name} alone: {resumed[name]:.0f} s vs {full[name]:.0f} s uninterrupted: ratio "
              f"{resumed[name] / full[name]:.3f}", flush=True)  # fmt: skip


def pipeline_resume(stages: dict, edit, root: Path, n: int, selected: int, full: dict) -> None:
    """The three stages from nothing, killed once half the full run's work is saved, then all
    three run again (the killed stage resumes from what it saved; the later ones run whole).

    Half the work is placed by the stages' shares of the uninterrupted run's time (prepare's
    being most of it, the kill lands in prepare once enough of its inputs are saved), and
    measured by saved work rather than elapsed time, which this machine's drifting speed would
    move."""
    for folder in ("shards", "latents", "edits"):
        shutil.rmtree(root / folder, ignore_errors=True)
    share, base = progress(root, n, selected), sum(full.values())
    left = base / 2  # seconds of the uninterrupted run before the kill
    for name in ("prepare", "invert", "edit"):
        stage = edit() if name == "edit" else stages[name]
        if left < full[name]:
            at = left / full[name]
            stage.run(lambda name=name, at=at: share[name]() >= at)
            killed = f"{name} at {at:.0%} of its work"
            break
        stage.run()
        left -= full[name]
    t0 = time.perf_counter()
    for name in ("prepare", "invert", "edit"):
        _, _, stats = (edit() if name == "edit" else stages[name]).run()
        done(f"   {name} in the pipeline's re-run", stats)
    again = time.perf_counter() - t0
    print(f"1. resume the pipeline (killed in {killed}): {again:.0f} s vs {base:.0f} s uninterrupted: "
          f"ratio {again / base:.3f} (target <= 0.55)", flush=True)  # fmt: skip


def grow_runs(stages: dict, edit, photos: Path, n: int, extra: int, full: dict) -> None:
    """10% new photos, then the three stages over all of them."""
    make_photos(photos, n, extra)
    grown = {}
    for name in ("prepare", "invert", "edit"):
        grown[name], _, stats = (edit() if name == "edit" else stages[name]).run()
        done(f"   {name} over +{extra} photos", stats)
    total, base = sum(grown.values()), sum(full.values())
    print(f"2. +10% photos: {total:.0f} s vs {base:.0f} s for the full run: ratio {total / base:.3f} "
          "(target <= 0.15)", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2, help="prepare's local processes")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--phases", default="memory,resume,pipeline,grow",
                        help="what to measure after the uninterrupted runs (default: all)")  # fmt: skip
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if phases - {"memory", "resume", "pipeline", "grow"}:
        parser.error(f"unknown phases: {sorted(phases - {'memory', 'resume', 'pipeline', 'grow'})}")
    n, extra = args.images, max(1, args.images // 10)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        photos, root = tmp / "photos", tmp / "root"
        t0 = time.perf_counter()
        make_photos(photos, 0, n)
        print(f"{n} photos made in {time.perf_counter() - t0:.0f} s", flush=True)
        params = write_inputs(tmp, args.workers)
        stages = {"prepare": Stage(["data", "prepare", "--input", str(photos)], params),
                  "invert": Stage(["latents", "invert"], params)}  # fmt: skip

        def edit(where: str = "true") -> Stage:
            table = str(newest_table(root / "latents"))
            return Stage(["edit", "apply", "--table", table, "--where", where], params)

        full, selected = full_runs(stages, edit, "memory" in phases)
        if "resume" in phases:
            resume_runs(stages, edit, root, n, selected, full)
        if "pipeline" in phases:
            pipeline_resume(stages, edit, root, n, selected, full)
        if "grow" in phases:
            grow_runs(stages, edit, photos, n, extra, full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
