"""Latency of the interactive service: p50/p99 of ``POST /v1/edit`` from a photo and from a key, at
concurrency 1 and 8, against the bare work of the same request in this process (alignment,
encoder and generator forward, PNG encoding), measured in the same run.

    python benchmarks/serve.py                      # the demo's models (run `make demo` first)
    python benchmarks/serve.py --small              # mambastyle_small at 256 px (set up here)
    python benchmarks/serve.py --requests 200

A server (``mambastyle serve``) is started on a free 127.0.0.1 port and stopped at the end. Every
photo request sends distinct bytes (the photo with a random tail that decoders ignore), so none is
answered from the replica's cache of recent uploads; key requests go through the table (and in
fuser mode the face's shard) the first time a key is seen, and the key's cached face after.
The bare baseline runs one thread (as the replica does with serve.num_cpus: 1).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> float:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as resp:
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}")
    return time.perf_counter() - t0


def _run(url: str, bodies: list[dict], concurrency: int) -> list[float]:
    """Latencies of ``bodies`` sent by ``concurrency`` clients at once."""
    out: list[float] = []
    lock = threading.Lock()
    it = iter(bodies)

    def client() -> None:
        while True:
            with lock:
                body = next(it, None)
            if body is None:
                return
            seconds = _post(url, body)
            with lock:
                out.append(seconds)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def small_setup(tmp: Path) -> str:
    """A params file serving ``mambastyle_small`` (random weights) on a random 256 px generator
    with 512-wide styles: the demo photos prepared at 256 px and inverted into a table with the
    CLI, a yaw direction fitted on it, W+ mode. Returns the params file's path."""
    import torch
    import yaml

    from mambastyle.checkpoints import save_encoder, state_sha256
    from mambastyle.config import load_params, parse_params, to_dict
    from mambastyle.generate import resolve_generator
    from mambastyle.models.encoders import build_encoder

    base = to_dict(load_params(REPO / "params.yaml"))
    arch = {
        **base["generator"]["architecture"],
        "resolution": 256,
        "style_dim": 512,
        "channel_max": 512,
        "n_mlp": 8,
    }
    yaw = {**base["edit"]["edits"][0], "fit_where": "true"}
    data = {
        **base,
        "storage": {**base["storage"], "root": str(tmp / "data")},
        "generator": {**base["generator"], "architecture": arch},
        "prepare": {**base["prepare"], "source": "demo", "output_size": 256},
        "fuser": {**base["fuser"], "enabled": False},
        "invert": {**base["invert"], "encoder": str(tmp / "encoder.pt"), "metrics": False},
        "serve": {**base["serve"], "mode": "w_plus", "edits": [yaw]},
    }
    p = parse_params(data, "small")
    gp = p.generator
    g = resolve_generator(None, gp.architecture, gp.init_seed, gp.latent_avg_samples)
    enc = build_encoder("mambastyle_small", 256, seed=0, input_size=256, style_dim=512)
    enc.set_latent_avg(g.latent_avg)
    ident = {"sha256": state_sha256(g), "resolution": g.resolution, "n_styles": g.n_styles}
    with torch.no_grad():
        save_encoder(enc, tmp / "encoder.pt", generator=ident)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    cli = [sys.executable, "-m", "mambastyle.cli"]
    subprocess.run(
        [*cli, "data", "prepare", "--params", str(path)], check=True, cwd=tmp, stdout=subprocess.DEVNULL
    )
    out = subprocess.run([*cli, "latents", "invert", "--params", str(path)], check=True, cwd=tmp,
                         capture_output=True, text=True)  # fmt: skip
    table = out.stdout.strip().splitlines()[-1].split("-> ")[-1]
    data["serve"]["table"] = table
    path.write_text(yaml.safe_dump(data))
    return str(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--requests", type=int, default=120, help="timed requests per case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="mambastyle_small at 256 px instead of the demo")
    args = ap.parse_args()
    if args.small:
        import tempfile

        tmp = tempfile.TemporaryDirectory()
        args.params = small_setup(Path(tmp.name))

    import torch

    from mambastyle.config import load_params
    from mambastyle.data.demo import demo_files
    from mambastyle.serve.studio import Studio

    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    params = load_params(args.params)
    studio = Studio.from_params(params)  # the same models the server loads
    photo = demo_files()["grace_hopper/original.jpg"]
    keys = studio.table.to_table(columns=["key"]).column("key").to_pylist()
    direction = next(iter(studio.edits))
    edit = [{"direction": direction, "strength": 1.0}]
    e = [(studio.edits[direction], 1.0)]
    mode = studio.mode

    def unique_photo() -> bytes:
        return photo + rng.bytes(16)

    # bare work of one request, in this process
    def bare_photo() -> float:
        t0 = time.perf_counter()
        aligned, pose = studio.align(unique_photo())
        face = studio.encode([aligned], [pose])[0]
        studio.render([(face, e, mode)])  # PNG bytes, as the server sends them
        return time.perf_counter() - t0

    def bare_key(key: str) -> float:
        t0 = time.perf_counter()
        w, pose, aligned = studio.row(key)
        if aligned is not None:
            face = studio.encode([aligned], [pose])[0]
        else:
            from mambastyle.serve.studio import Face

            face = Face(None, w, None, pose)
        studio.render([(face, e, mode)])  # PNG bytes, as the server sends them
        return time.perf_counter() - t0

    for _ in range(3):
        bare_photo()
    bare = {"photo": [bare_photo() for _ in range(max(20, args.requests // 4))],
            "key": [bare_key(keys[i % len(keys)]) for i in range(max(20, args.requests // 4))]}  # fmt: skip

    port = _port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    command = [sys.executable, "-m", "mambastyle.cli", "serve", "--params", args.params, "--port", str(port)]
    server = subprocess.Popen(command, cwd=Path(args.params).parent, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start:\n{server.stderr.read()[-3000:]}") from None
                time.sleep(0.5)
        endpoint = url + "/v1/edit"
        _run(
            endpoint,
            [{"image": base64.b64encode(unique_photo()).decode(), "edits": edit} for _ in range(8)],
            4,
        )
        r = studio.generator.resolution
        print(f"server: {url}, {studio.info['encoder']} on a {r} px generator, mode {mode}, direction "
              f"{direction}, {args.requests} requests per case")  # fmt: skip
        print(f"{'case':<22}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'bare p50':>10}{'p50/bare':>10}")
        for source in ("photo", "key"):
            for concurrency in (1, 8):
                if source == "photo":
                    bodies = [{"image": base64.b64encode(unique_photo()).decode(), "edits": edit}
                              for _ in range(args.requests)]  # fmt: skip
                else:
                    bodies = [{"key": keys[int(rng.integers(len(keys)))], "edits": edit}
                              for _ in range(args.requests)]  # fmt: skip
                t0 = time.perf_counter()
                lat = _run(endpoint, bodies, concurrency)
                wall = time.perf_counter() - t0
                base = statistics.median(bare[source]) * 1000
                p50 = _pct(lat, 50)
                print(f"{source + f' c={concurrency}':<22}{p50:>9.1f}{_pct(lat, 99):>9.1f}"
                      f"{len(lat) / wall:>8.1f}{base:>10.1f}{p50 / base:>10.2f}")  # fmt: skip
        print("target: p50 at concurrency 1 within 1.3x of the bare work (alignment included for photos)")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
