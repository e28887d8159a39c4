"""The interactive service (``mambastyle serve``): a real server started by the test on 127.0.0.1
(local Ray, Ray Serve, the CLI entry point), its API against the library's own functions, every
refusal with its status and reason, a bounded load, and the page in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import psutil
import pytest
import torch
import yaml
from helpers import REPO, cmdline, free_port, fuser_bytes, params, write_shards
from PIL import Image

from mambastyle.config import to_dict
from mambastyle.data.demo import demo_files
from mambastyle.data.faces import PrepareConfig, process_input
from mambastyle.data.inputs import InputRef
from mambastyle.edit.core import Edit, apply_edits, fused_edits, render
from mambastyle.edit.pipeline import load_fuser_model, read_sources
from mambastyle.edit.stage import build_edit
from mambastyle.generate import resolve_generator
from mambastyle.latents import open_table
from mambastyle.models.fuser import fused_synthesis
from mambastyle.models.inversion import prepare_images
from mambastyle.storage import resolve, write_bytes
from mambastyle.visual import to_uint8

pytestmark = pytest.mark.slow

EDIT = {
    "name": "shift",
    "source": "fit",
    "uri": None,
    "component": None,
    "absolute": False,
    "column": "mse",
    "labels": None,
    "fit_where": "true",
    "space": "W",
    "strengths": [-2.0, 0.0, 3.0],
    "layers": None,
}


class Server:
    """``mambastyle serve`` in its own process group, stopped by its ids."""

    def __init__(self, params_file, port: int):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mambastyle.cli",
                "serve",
                "--params",
                str(params_file),
                "--port",
                str(port),
            ],
            cwd=params_file.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}):\n{self.proc.stderr.read()[-4000:]}")
            try:
                if request(self.url + "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail("the server did not answer /healthz within 240 s")

    def replica(self) -> psutil.Process:
        for proc in psutil.Process(self.proc.pid).children(recursive=True):
            if "ServeReplica:mambastyle:Studio" in " ".join(cmdline(proc)):
                return proc
        raise AssertionError("no replica process among the server's children")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the CLI shuts Serve and its Ray down
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever outlived it in its process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def request(url: str, data: bytes | None = None, ctype: str = "application/json", timeout: float = 120):
    """(status, content type, body) of one request."""
    req = urllib.request.Request(url, data=data, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("content-type"), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("content-type"), exc.read()


def edit(server: Server, body) -> tuple[int, str, bytes]:
    return request(server.url + "/v1/edit", json.dumps(body).encode())


def _image(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _reason(resp) -> tuple[int, str]:
    status, ctype, body = resp
    assert ctype == "application/json", (status, body[:200])
    return status, json.loads(body)["error"]["reason"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A latent table inverted with an encoder and fuser (Ray Data, local Ray), a fitted
    direction, and the server over them."""
    from mambastyle.invert.pipeline import invert_from_params
    from mambastyle.runtime import connect_ray

    tmp = tmp_path_factory.mktemp("serve")
    root = resolve(str(tmp / "data"))
    write_shards(root, {"train": [6], "test": [5]})
    gp = params().generator
    g = resolve_generator(None, gp.architecture, gp.init_seed, gp.latent_avg_samples)
    write_bytes(root.join("fuser.pt"), fuser_bytes(g), durable=False)
    fuser_uri = root.join("fuser.pt").uri
    p = params(storage={"root": root.uri}, invert={"encoder": fuser_uri, "batch_size": 4, "rows_per_file": 5})
    ray = connect_ray(None, num_cpus=2)
    try:
        _, prefix = invert_from_params(p, ray_connect=False)
    finally:
        ray.shutdown()
    p = params(
        storage={"root": root.uri},
        invert={"encoder": fuser_uri},
        serve={"table": prefix.uri, "edits": [EDIT], "max_upload_bytes": 3_000_000},
    )
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(p)))
    server = Server(params_file, free_port())
    try:
        yield server, p, g, open_table(prefix.uri), load_fuser_model(fuser_uri, None)
    finally:
        server.stop()


def test_health_and_directions(served):
    server, p, *_ = served
    status, _, body = request(server.url + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = request(server.url + "/v1/directions")
    listed = json.loads(body)
    assert status == 200 and listed["mode"] == "fuser" and listed["modes"] == ["w_plus", "fuser"]
    assert [d["name"] for d in listed["directions"]] == ["shift"]
    assert listed["directions"][0]["strength"] == {"min": -2.0, "max": 3.0, "default": 0.0}


def test_invert_gives_the_prepare_stages_face_and_the_encoders_code(served):
    server, p, g, table, model = served
    photo = demo_files()["grace_hopper/original.jpg"]
    status, ctype, body = request(server.url + "/v1/invert", photo, "application/octet-stream")
    assert status == 200 and ctype == "application/json"
    got = json.loads(body)
    # the face is the prepare stage's, bit for bit, with its pose
    outcome = process_input(InputRef("x", "x", data=photo), PrepareConfig.from_params(p.prepare))
    sample = outcome.samples[0]
    np.testing.assert_array_equal(_image(base64.b64decode(got["aligned"])), _image(sample.png))
    assert {k: got[k] for k in ("yaw", "pitch", "roll")} == {
        k: sample.meta[k] for k in ("yaw", "pitch", "roll")
    }
    # the code and the fuser's reconstruction are the encoder's on that face
    face = torch.from_numpy(_image(sample.png).copy())[None]
    with torch.no_grad():
        x = prepare_images(face, model.input_size)
        w, feats = model.encoder(x, return_features=True)
        want = to_uint8(fused_synthesis(g, model.fuser, w, feats))[0]
    # bound: the same float32 forward on one thread in both processes; measured 0 on this model,
    # 1e-6 leaves room for a kernel choosing another summation order
    np.testing.assert_allclose(np.array(got["w_plus"], np.float32), w[0].numpy(), atol=1e-6, rtol=0)
    recon = _image(base64.b64decode(got["reconstruction"]))
    assert recon.shape == (g.resolution, g.resolution, 3)
    assert np.abs(recon.astype(int) - want.astype(int)).max() <= 1  # uint8 rounding of equal floats
    assert 0 < got["mse"] < 4  # inputs in [-1, 1]

    # an edit of that upload by its ref, and by its bytes, is the fuser's picture of the moved code
    direction = build_edit(p.serve.edits[0], table, None).direction
    moved = w + torch.from_numpy(direction.delta(w.numpy(), 3.0, (0, g.n_styles)))
    with torch.no_grad():
        want = to_uint8(fused_synthesis(g, model.fuser, moved, feats, moved - w))[0]
    for source in ({"ref": got["ref"]}, {"image": base64.b64encode(photo).decode()}):
        status, ctype, png = edit(server, {**source, "edits": [{"direction": "shift", "strength": 3.0}]})
        assert status == 200 and ctype == "image/png"
        assert np.abs(_image(png).astype(int) - want.astype(int)).max() <= 1
    # strength 0 is the reconstruction
    status, _, png = edit(server, {"ref": got["ref"], "edits": [{"direction": "shift", "strength": 0}]})
    assert status == 200 and np.abs(_image(png).astype(int) - recon.astype(int)).max() <= 1


def test_edit_a_key_matches_the_edit_stages_functions(served):
    server, p, g, table, model = served
    rows = table.to_table(columns=["key", "split", "shard", "w_plus"]).slice(0, 2)
    e = build_edit(p.serve.edits[0], table, None)
    for i, key in enumerate(rows.column("key").to_pylist()):
        # w_plus mode: the table's code moved and rendered, as the edit stage renders it
        edited, _ = apply_edits(table.w_plus(rows)[i : i + 1], [Edit("shift", e.direction, (-2.0,))])
        want = render(g, edited, 1)[0]
        status, _, png = edit(
            server, {"key": key, "mode": "w_plus", "edits": [{"direction": "shift", "strength": -2.0}]}
        )
        assert status == 200
        assert np.abs(_image(png).astype(int) - want.astype(int)).max() <= 1
        # fuser mode: the face re-encoded from its shard, as the edit stage's fuser mode does
        source = read_sources(
            resolve(p.storage.root),
            [key],
            [rows.column("split")[i].as_py()],
            [rows.column("shard")[i].as_py()],
        )
        _, _, images = fused_edits(g, model, source, [Edit("shift", e.direction, (3.0,))], 1)
        status, _, png = edit(server, {"key": key, "edits": [{"direction": "shift", "strength": 3.0}]})
        assert status == 200
        assert np.abs(_image(png).astype(int) - images[0].astype(int)).max() <= 1


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` (its pixel data cut short)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))


def _declared_too_large(server: Server, size: int) -> tuple[int, bytes]:
    """Sends only the headers of a ``size``-byte upload and reads the answer (the body never goes)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(
            f"POST /v1/invert HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 20:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), body


def test_bad_requests_get_their_status_and_reason_and_the_server_keeps_serving(served):
    server, p, _, table, _ = served
    files = demo_files()
    url = server.url
    key = table.to_table(columns=["key"]).column("key")[0].as_py()
    ok = {"direction": "shift", "strength": 1.0}
    cases = [
        (request(url + "/v1/invert", b"\x00garbage" * 50, "application/octet-stream"), 415, "not_an_image"),
        (request(url + "/v1/invert", files["bad/truncated.jpg"], "image/jpeg"), 415, "decode_error"),
        (request(url + "/v1/invert", b"", "application/octet-stream"), 400, "empty_body"),
        (request(url + "/v1/invert", _png_header_only(60000, 60000), "image/png"), 413, "too_large"),
        (request(url + "/v1/invert", files["bad/cat.jpg"], "image/jpeg"), 422, "no_face"),
        (request(url + "/v1/invert", files["bad/small_face.jpg"], "image/jpeg"), 422, "too_small"),
        (
            edit(server, {"key": key, "edits": [{"direction": "smile", "strength": 1}]}),
            422,
            "unknown_direction",
        ),
        (edit(server, {"key": "no-such-key", "edits": [ok]}), 404, "unknown_key"),
        (edit(server, {"key": key, "edits": [{"direction": "shift", "strength": "a"}]}), 422, "bad_strength"),
        (
            edit(server, {"key": key, "edits": [{"direction": "shift", "strength": True}]}),
            422,
            "bad_strength",
        ),
        (edit(server, [key]), 400, "not_an_object"),
        (edit(server, "text"), 400, "not_an_object"),
        (request(url + "/v1/edit", b"{not json"), 400, "bad_json"),
        (request(url + "/v1/edit", b"\xff\xfe"), 400, "bad_json"),
        (edit(server, {"edits": [ok]}), 422, "bad_source"),
        (edit(server, {"key": key, "image": "AAAA", "edits": [ok]}), 422, "bad_source"),
        (edit(server, {"image": "not base64!", "edits": [ok]}), 422, "bad_image"),
        (
            edit(server, {"image": base64.b64encode(b"\x00" * 64).decode(), "edits": [ok]}),
            415,
            "not_an_image",
        ),
        (edit(server, {"ref": "sha256:" + "0" * 64, "edits": [ok]}), 404, "unknown_ref"),
        (edit(server, {"key": key, "edits": ok}), 422, "bad_edits"),
        (edit(server, {"key": key, "edits": [ok] * (p.serve.max_edits + 1)}), 422, "bad_edits"),
        (edit(server, {"key": key, "edits": [ok], "mode": "pixels"}), 422, "bad_mode"),
        (edit(server, {"key": key, "edits": [ok], "colour": 1}), 422, "unknown_field"),
        (request(url + "/v1/nothing"), 404, "not_found"),
        (
            edit(server, {"key": key, "edits": [{"direction": "shift", "strength": 1e300}]}),
            422,
            "bad_strength",
        ),
        (request(url + "/v1/edit", b"[" * 5000 + b"]" * 5000), 400, "bad_json"),
        (
            request(url + "/v1/edit", json.dumps({"key": key, "edits": [{}] * 10000}).encode()),
            400,
            "bad_json",
        ),
        # a base64 photo whose bytes pass the upload limit
        (
            edit(server, {"image": base64.b64encode(b"\xff" * (p.serve.max_upload_bytes + 1)).decode()}),
            413,
            "too_large",
        ),  # fmt: skip
    ]
    for resp, status, reason in cases:
        assert _reason(resp) == (status, reason), resp[2][:300]
        assert b"Traceback" not in resp[2]
    # over the upload limit: refused from the declared length, before the body is sent
    status, body = _declared_too_large(server, p.serve.max_upload_bytes + 1)
    assert status == 413 and json.loads(body)["error"]["reason"] == "too_large"
    # and it keeps serving
    assert request(url + "/healthz")[0] == 200
    assert edit(server, {"key": key, "edits": [ok]})[0] == 200


def test_a_bounded_load_all_succeeds_and_the_replica_memory_stays_flat(served):
    server, _, _, table, _ = served
    keys = table.to_table(columns=["key"]).column("key").to_pylist()
    photo = demo_files()["astronaut/original.jpg"]
    ref = json.loads(request(server.url + "/v1/invert", photo, "application/octet-stream")[2])["ref"]
    failures: list = []

    def worker(seed: int, n: int) -> None:
        rng = np.random.default_rng(seed)
        for i in range(n):
            source = {"ref": ref} if i % 2 else {"key": keys[int(rng.integers(len(keys)))]}
            body = {
                **source,
                "edits": [{"direction": "shift", "strength": float(rng.uniform(-2, 3))}],
                "mode": ["w_plus", "fuser"][int(rng.integers(2))],
            }
            status, ctype, _ = edit(server, body)
            if status != 200 or ctype != "image/png":
                failures.append((status, body))

    def load(n_per_client: int, seed: int) -> float:
        t0 = time.monotonic()
        threads = [threading.Thread(target=worker, args=(seed + c, n_per_client)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        return time.monotonic() - t0

    replica = server.replica()
    load(5, 100)  # warm-up: caches fill, allocator pools settle
    rss0 = replica.memory_info().rss
    seconds = load(15, 200)  # 120 requests at concurrency 8
    rss1 = replica.memory_info().rss
    assert not failures, failures[:5]
    assert seconds < 240, f"120 requests took {seconds:.0f} s"
    # bound: each request's images are a few KB at 64 px and the caches are full after the
    # warm-up; a leak of one request's tensors (~1 MB) per request would add 120 MB
    assert rss1 - rss0 < 40 * 2**20, f"replica RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB"


def test_the_page_in_a_real_browser_inverts_an_upload_and_follows_a_slider(served, tmp_path):
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        if os.environ.get("MAMBASTYLE_REQUIRE_BROWSER"):
            pytest.fail(f"{chromium} is missing (Debian's chromium package; .ci/run installs it)")
        pytest.skip(f"{chromium} is missing (Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    server = served[0]
    photo = tmp_path / "face.jpg"
    photo.write_bytes(demo_files()["grace_hopper/original.jpg"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/")
            page.wait_for_selector("#sliders input[type=range]")
            page.set_input_files("#photo", str(photo))
            page.wait_for_function("document.getElementById('edited').dataset.version === '1'", timeout=60000)
            assert page.eval_on_selector("#aligned", "img => img.naturalWidth") > 0
            assert page.eval_on_selector("#reconstruction", "img => img.naturalWidth") > 0
            before = _shown(page)
            slider = page.locator("#sliders input[type=range]").first
            slider.focus()
            page.keyboard.press("End")  # the slider to its maximum, as a user's key press moves it
            page.wait_for_function(
                "Number(document.getElementById('edited').dataset.version) >= 2", timeout=60000
            )
            page.wait_for_function("document.getElementById('status').textContent === 'Edited.'")
            after = _shown(page)
            assert before.shape == after.shape and np.abs(before.astype(int) - after.astype(int)).max() > 0
            assert page.inner_text("#status") == "Edited." and not errors
        finally:
            browser.close()


def _shown(page) -> np.ndarray:
    """The edited image as the page holds it (its blob read back through a canvas)."""
    data_url = page.evaluate("""() => {
        const img = document.getElementById('edited');
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        c.getContext('2d').drawImage(img, 0, 0);
        return c.toDataURL('image/png');
    }""")
    return _image(base64.b64decode(data_url.split(",", 1)[1]))


def test_serve_refuses_a_missing_table_before_starting_anything(tmp_path):
    p = params(storage={"root": str(tmp_path / "data")}, serve={"table": str(tmp_path / "nope")})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(p)))
    out = subprocess.run(
        [sys.executable, "-m", "mambastyle.cli", "serve", "--params", str(params_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "nope" in out.stderr
    assert "Traceback" not in out.stderr and "Started a local Ray" not in out.stderr
