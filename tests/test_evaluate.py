"""Encoder evaluation: metrics against the invert core, latent recovery's scale, the DVC stage."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import params, write_shards

from mambastyle.checkpoints import save_encoder
from mambastyle.config import to_dict
from mambastyle.evaluate import latency, latent_recovery, reconstruction_metrics
from mambastyle.generate import resolve_generator
from mambastyle.models.arcface import ArcFaceIRSE
from mambastyle.models.encoders import build_encoder
from mambastyle.models.inversion import invert_batch
from mambastyle.pretrained import IdentityLoss
from mambastyle.storage import resolve


def official_psp(path, g, seed: int) -> None:
    """A narrow pSp in the layout pSp's training script saves, with ``g`` as its decoder."""
    enc = build_encoder("psp_tiny", g.resolution, seed=seed, style_dim=g.style_dim, widths=(16, 32, 64, 128))
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"decoder.{k}": v for k, v in g.state_dict().items()})
    opts = {"encoder_type": "GradualStyleEncoder", "output_size": g.resolution, "start_from_latent_avg": True}
    torch.save({"state_dict": sd, "opts": opts, "latent_avg": g.latent_avg.repeat(g.n_styles, 1)}, path)


@pytest.fixture(scope="module")
def models():
    p = params()
    gp = p.generator
    g = resolve_generator(None, gp.architecture, gp.init_seed, gp.latent_avg_samples)
    enc = build_encoder("mambastyle_tiny", 32, seed=0, input_size=32, style_dim=32).eval()
    enc.set_latent_avg(g.latent_avg)
    return enc, g


def test_reconstruction_metrics_agree_with_the_invert_core(models):
    enc, g = models
    images = torch.randint(0, 256, (7, 3, 48, 48), dtype=torch.uint8)
    arcface = IdentityLoss(ArcFaceIRSE().eval())
    values, pairs = reconstruction_metrics(enc, g, iter(images), 3, identity=arcface)
    ref = invert_batch(enc, images, g)
    # bound: batches of 3 vs 7 change only float32 kernel rounding: measured mse <= 5e-7 relative (200x
    # under 1e-4); SSIM of noise images is ~1e-4, so atol carries it: measured <= 4e-8 (25x under 1e-6)
    np.testing.assert_allclose(values["mse"], ref.mse, rtol=1e-4)
    np.testing.assert_allclose(values["ssim"], ref.ssim, rtol=1e-4, atol=1e-6)
    assert "lpips" not in values and len(pairs) == 7 and pairs[0].shape == (2, 3, 32, 32)
    # identity similarity is the cosine of the two embeddings (1 for an image and itself)
    x, y = pairs[2][0:1], pairs[2][1:2]
    with torch.no_grad():
        ex, ey = arcface.embed(x), arcface.embed(y)
        want = torch.nn.functional.cosine_similarity(ex, ey).item()
        self_sim = torch.nn.functional.cosine_similarity(ex, arcface.embed(x)).item()
    # bound: the same embeddings, normalised in another order: measured <= 9e-8 (abs 1e-5 is 100x);
    # a cosine of a vector with itself is 1 within an ulp (1.2e-7 measured, approx's rel 1e-6)
    assert values["id_similarity"][2] == pytest.approx(want, abs=1e-5) and self_sim == pytest.approx(1.0)


def test_latent_recovery_is_relative_to_answering_the_average(models):
    enc, g = models
    # an encoder that always answers latent_avg scores exactly 1 on both scales
    blank = build_encoder("mambastyle_tiny", 32, seed=0, input_size=32, style_dim=32).eval()
    blank.set_latent_avg(g.latent_avg)
    for head in (blank.output_layer_1, blank.output_layer_2, blank.output_layer_3):
        if head is not None:
            torch.nn.init.zeros_(head[-1].weight)
            torch.nn.init.zeros_(head[-1].bias)
    out = latent_recovery(blank, g, 12, seed=3, truncation=0.8, batch_size=5)
    # bound: zero heads answer latent_avg exactly, so both ratios are x / x = 1 exactly (measured)
    assert out["latent_rel"] == pytest.approx(1.0) and out["style_rel"] == pytest.approx(1.0)
    assert out["samples"] == 12
    # the same samples for the same seed, whatever the batch size
    a = latent_recovery(enc, g, 12, seed=3, truncation=0.8, batch_size=4)
    b = latent_recovery(enc, g, 12, seed=3, truncation=0.8, batch_size=12)
    # bound: same samples; batch size may change float32 kernel rounding (~1e-6 relative; measured equal)
    assert a["latent_mse"] == pytest.approx(b["latent_mse"], rel=1e-4)
    speed = latency(enc, 4, 2)
    assert speed["ms_per_image"] > 0 and speed["batch_size"] == 4


def test_bf16_evaluation_measures_what_the_invert_core_does_in_bf16(models):
    enc, g = models
    images = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8)
    values, pairs = reconstruction_metrics(enc, g, iter(images), 5, precision="bf16")
    ref = invert_batch(enc, images, g, pad_to=5, precision="bf16")
    fp32, _ = reconstruction_metrics(enc, g, iter(images), 5)
    # bound: the same bf16 forward passes as the invert core, float32 metrics: measured equal; rtol 1e-4
    # as in the fp32 test above
    np.testing.assert_allclose(values["mse"], ref.mse, rtol=1e-4)
    # bound: bf16 vs fp32 codes differ by < 1% of their spread (test_invert); mse measured within 1.3%
    # (30 seeds), 5% as in test_invert's bf16 bound
    np.testing.assert_allclose(values["mse"], fp32["mse"], rtol=0.05)
    assert pairs[0].dtype == torch.float32 and values["mse"] != fp32["mse"]  # it did run in bf16
    got = latent_recovery(enc, g, 8, seed=3, truncation=0.8, batch_size=4, precision="bf16")
    want = latent_recovery(enc, g, 8, seed=3, truncation=0.8, batch_size=4)
    # bound: as above: measured within 0.03% (30 seeds)
    assert got["latent_mse"] == pytest.approx(want["latent_mse"], rel=0.05)
    assert latency(enc, 2, 1, "bf16")["precision"] == "bf16"


def test_stage_reports_what_it_measured_and_names_what_it_did_not(tmp_path, models, repo):
    enc, g = models
    root = resolve(str(tmp_path / "data"))
    images = write_shards(root, {"train": [5], "test": [3, 2]})
    buf = io.BytesIO()
    save_encoder(enc, buf)
    (tmp_path / "encoder.pt").write_bytes(buf.getvalue())
    invert_out = tmp_path / "invert"
    invert_out.mkdir()
    (invert_out / "manifest.json").write_text(
        json.dumps({"metadata": {"encoder_uri": str(tmp_path / "encoder.pt")}})
    )
    official_psp(tmp_path / "psp.pt", g, seed=3)
    p = params(storage={"root": root.uri},
               evaluate={"lpips_alexnet": str(tmp_path / "no-alexnet.pth"), "synthetic_samples": 6,
                         "batch_size": 4, "latency_batches": 1, "grid_samples": 3,
                         "encoders": [{"name": "pipeline", "uri": None},
                                      {"name": "psp", "uri": str(tmp_path / "psp.pt")}]})  # fmt: skip
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(to_dict(p)))
    out = tmp_path / "evaluate"

    def stage():
        cmd = [sys.executable, "pipelines/evaluate.py", "--params", str(pf), "--out", str(out),
               "--invert-out", str(invert_out), "--metrics", str(tmp_path / "metrics")]  # fmt: skip
        return subprocess.run(cmd, cwd=repo, capture_output=True, text=True)

    run = stage()
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 5 and metrics["split"] == "test"
    assert set(metrics["not_measured"]) == {"lpips", "id_similarity"}
    assert "no-alexnet.pth" in metrics["not_measured"]["lpips"]
    assert set(metrics["reconstruction"]) == {"mse", "ssim"}  # nothing faked for the others
    head = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert head["images"] == 5 and set(head["quality"]) <= {"mse", "ssim", "identity_dlib"}
    # bound: the same figure, each rounded to 6 significant digits (<= 5e-6 relative)
    assert head["quality"]["mse"] == pytest.approx(metrics["reconstruction"]["mse"], rel=1e-5)
    test_keys = sorted(k for k in images if k.startswith("test"))
    from PIL import Image

    batch = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(images[k])).convert("RGB")).copy())
                         .permute(2, 0, 1) for k in test_keys])  # fmt: skip
    # bound: 6-digit rounding (5e-6) plus batch-dependent float32 bits (~5e-7): rel 1e-4 is 20x (and below)
    assert metrics["reconstruction"]["mse"] == pytest.approx(
        float(invert_batch(enc, batch, g).mse.mean()), rel=1e-4
    )
    assert 0 < metrics["latent_recovery"]["latent_rel"] and metrics["encoder"]["parameters"] > 0
    assert json.loads((out / "latency.json").read_text())["ms_per_image"] > 0
    picture = np.asarray(Image.open(out / "reconstructions.png"))
    assert picture.shape == (2 + 34, 2 + 6 * 34, 3)  # three faces, each next to its reconstruction
    # side by side: the same faces through both encoders, at the smaller input size (32)
    side = json.loads((out / "comparison.json").read_text())
    assert side["images"] == 5 and side["size"] == 32 and list(side["encoders"]) == ["pipeline", "psp"]
    pipe, psp = side["encoders"]["pipeline"], side["encoders"]["psp"]
    assert pipe["mse"] == pytest.approx(metrics["reconstruction"]["mse"], rel=1e-4)
    assert psp["arch"] == "psp" and psp["uri"].endswith("psp.pt") and psp["mse"] != pipe["mse"]
    for row in (pipe, psp):
        assert {"mse", "ssim", "identity_dlib", "parameters"} <= set(row)
        assert -1 <= row["identity_dlib"] <= 1 and row["parameters"] > 0
    speeds = json.loads((out / "latency.json").read_text())["encoders"]
    assert all(speeds[n]["ms_per_image_batch1"] > 0 and speeds[n]["ms_per_image_batch8"] > 0 for n in speeds)
    table = (out / "comparison.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| pipeline |") and table[3].startswith("| psp |")
    assert "no table" in side["not_measured"]["editability"]  # this record names no latent table
    assert np.asarray(Image.open(out / "comparison.png")).shape == (2 + 3 * 34, 2 + 3 * 34, 3)
    # an encoder whose decoder is not the configured generator is refused, naming both
    other = resolve_generator(None, p.generator.architecture, p.generator.init_seed + 1, 100)
    official_psp(tmp_path / "psp.pt", other, seed=4)
    run = stage()
    assert run.returncode == 1 and "psp.pt: its decoder" in run.stderr
    assert "differs from the configured" in run.stderr
    official_psp(tmp_path / "psp.pt", g, seed=3)
    # without the invert stage's record, a clear error
    (invert_out / "manifest.json").unlink()
    run = stage()
    assert run.returncode == 1 and "run the invert stage first" in run.stderr


def test_compare_encoders_measures_each_at_the_common_size(models):
    from mambastyle.evaluate import compare_encoders
    from mambastyle.models.inversion import prepare_images, ssim

    enc, g = models
    wide = build_encoder("mambastyle_tiny", 32, seed=5, input_size=64, style_dim=32).eval()
    wide.set_latent_avg(g.latent_avg)
    seed = 17
    rng = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8, generator=rng)
    values, shown = compare_encoders({"a": enc, "b": wide}, g, iter(images), 2)
    ref = invert_batch(enc, images, g)  # enc's input size (32) is the common one
    # bound: as in test_reconstruction_metrics_agree_with_the_invert_core: measured mse <= 5e-7 relative,
    # SSIM (~1e-4 here) <= 4e-8 absolute
    np.testing.assert_allclose(values["a"]["mse"], ref.mse, rtol=1e-4, err_msg=f"seed {seed}")
    with torch.no_grad():
        y = g.synthesis(wide(prepare_images(images, 64)), noise_mode="const")
        y = torch.nn.functional.interpolate(y, size=(32, 32), mode="bilinear", antialias=True)
        x = prepare_images(images, 32)
    np.testing.assert_allclose(values["b"]["mse"], (y - x).pow(2).flatten(1).mean(1), rtol=1e-4)
    np.testing.assert_allclose(values["b"]["ssim"], ssim(y.clamp(-1, 1), x), rtol=1e-4, atol=1e-6)
    assert set(values["a"]) == {"mse", "ssim"} and len(shown) == 5 and shown[0].shape == (3, 3, 32, 32)


class _PosedGenerator(torch.nn.Module):
    """Renders a fixed aligned face turned by an angle read off the code (its mean over code
    entries times ``gain``): a generator whose yaw response to any direction is known."""

    def __init__(self, face: np.ndarray, n_styles: int, style_dim: int):
        super().__init__()
        self.face, self.n_styles, self.style_dim = face, n_styles, style_dim
        self.register_buffer("latent_avg", torch.zeros(style_dim))

    def synthesis(self, w, noise_mode="const"):
        out = []
        for code in w:
            squeeze = float(code.mean()) * 0.15  # a horizontal squeeze of one half reads as a turn
            h, wd, _ = self.face.shape
            xs = np.arange(wd, dtype=np.float64)
            centre = wd / 2
            left, right = centre - (centre - xs) * (1 + squeeze), centre + (xs - centre) * (1 - squeeze)
            src = np.where(xs < centre, left, right)
            src = np.clip(np.round(src).astype(int), 0, wd - 1)
            out.append(torch.from_numpy(self.face[:, src].copy()).permute(2, 0, 1).float() / 127.5 - 1)
        return torch.stack(out)


def test_editability_reads_a_planted_turn_and_its_linearity():
    from mambastyle.data.align import align_face, detect_faces
    from mambastyle.data.demo import photos
    from mambastyle.evaluate import editability
    from mambastyle.identity import DlibIdentity, aligned_pose

    img = np.asarray(next(iter(photos().values())))
    face = max(detect_faces(img), key=lambda f: f.score)
    crop = np.asarray(align_face(img, face.landmarks, 128)[0])
    # the aligned crop's pose agrees with the pose the prepare stage records for the photo
    yaw, pitch, roll = aligned_pose(crop[None])[0]
    from mambastyle.data.align import estimate_pose

    want = estimate_pose(face.landmarks)
    # bound: deterministic photo; measured yaw 2.3 and pitch 5.2 degrees apart (landmarks re-detected on a
    # 128 px crop; estimate_pose promises "a few degrees")
    assert abs(yaw - want[0]) < 6 and abs(pitch - want[1]) < 8, (yaw, pitch, want)
    mirrored = aligned_pose(crop[None, :, ::-1].copy())[0]
    # bound: dlib is not mirror-symmetric; measured 1.9 degrees
    assert abs(mirrored[0] + yaw) < 4, (mirrored, yaw)

    class Identity(torch.nn.Module):  # an "encoder" answering zero codes
        config = type("C", (), {"input_size": 32})()

        def __init__(self):
            super().__init__()
            self.register_buffer("latent_avg", torch.zeros(4, 8))

        def forward(self, x):
            return self.latent_avg.expand(x.shape[0], -1, -1)

    g = _PosedGenerator(crop, 4, 8)
    direction = np.ones((4, 8), np.float32)
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    out = editability(Identity(), g, iter(images), direction, [-1.0, 0.0, 1.0, 2.0], 2, DlibIdentity())
    assert out["faces"] == 3 and out["strengths"] == [-1.0, 1.0, 2.0]
    # bound: deterministic (fixed face, no noise); measured -6.8 degrees per unit, r2 0.917, identity 0.991
    assert abs(out["yaw_per_strength"]) > 3, out  # the squeeze turns the face by degrees per unit
    assert out["linearity_r2"] > 0.8, out
    assert np.sign(out["yaw_change"]["2"]) == np.sign(out["yaw_change"]["-1"]) * -1, out
    assert 0.5 < out["identity_kept_dlib"] <= 1.0, out
    flat = editability(Identity(), g, iter(images), np.zeros((4, 8), np.float32), [1.0], 2)
    assert flat["yaw_per_strength"] == 0 and "identity_kept_dlib" not in flat
