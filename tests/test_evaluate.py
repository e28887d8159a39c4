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
from train_helpers import params, write_shards

from mambastyle.checkpoints import save_encoder
from mambastyle.config import to_dict
from mambastyle.evaluate import latency, latent_recovery, reconstruction_metrics
from mambastyle.generate import resolve_generator
from mambastyle.invert.core import invert_batch
from mambastyle.models.arcface import ArcFaceIRSE
from mambastyle.models.encoders import build_encoder
from mambastyle.storage import resolve
from mambastyle.train.losses import IdentityLoss


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
    np.testing.assert_allclose(values["mse"], ref.mse, rtol=1e-4)
    np.testing.assert_allclose(values["ssim"], ref.ssim, rtol=1e-4, atol=1e-6)
    assert "lpips" not in values and len(pairs) == 7 and pairs[0].shape == (2, 3, 32, 32)
    # identity similarity is the cosine of the two embeddings (1 for an image and itself)
    x, y = pairs[2][0:1], pairs[2][1:2]
    with torch.no_grad():
        ex, ey = arcface.embed(x), arcface.embed(y)
        want = torch.nn.functional.cosine_similarity(ex, ey).item()
        self_sim = torch.nn.functional.cosine_similarity(ex, arcface.embed(x)).item()
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
    assert out["latent_rel"] == pytest.approx(1.0) and out["style_rel"] == pytest.approx(1.0)
    assert out["samples"] == 12
    # the same samples for the same seed, whatever the batch size
    a = latent_recovery(enc, g, 12, seed=3, truncation=0.8, batch_size=4)
    b = latent_recovery(enc, g, 12, seed=3, truncation=0.8, batch_size=12)
    assert a["latent_mse"] == pytest.approx(b["latent_mse"], rel=1e-4)
    speed = latency(enc, 4, 2)
    assert speed["ms_per_image"] > 0 and speed["batch_size"] == 4


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
    p = params(storage={"root": root.uri},
               evaluate={"lpips_alexnet": str(tmp_path / "no-alexnet.pth"), "synthetic_samples": 6,
                         "batch_size": 4, "latency_batches": 1, "grid_samples": 3})  # fmt: skip
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(to_dict(p)))
    out = tmp_path / "evaluate"

    def stage():
        cmd = [sys.executable, "pipelines/evaluate.py", "--params", str(pf), "--out", str(out),
               "--invert-out", str(invert_out)]  # fmt: skip
        return subprocess.run(cmd, cwd=repo, capture_output=True, text=True)

    run = stage()
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 5 and metrics["split"] == "test"
    assert set(metrics["not_measured"]) == {"lpips", "id_similarity"}
    assert "no-alexnet.pth" in metrics["not_measured"]["lpips"]
    assert set(metrics["reconstruction"]) == {"mse", "ssim"}  # nothing faked for the others
    test_keys = sorted(k for k in images if k.startswith("test"))
    from PIL import Image

    batch = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(images[k])).convert("RGB")).copy())
                         .permute(2, 0, 1) for k in test_keys])  # fmt: skip
    assert metrics["reconstruction"]["mse"] == pytest.approx(
        float(invert_batch(enc, batch, g).mse.mean()), rel=1e-4
    )
    assert 0 < metrics["latent_recovery"]["latent_rel"] and metrics["encoder"]["parameters"] > 0
    assert json.loads((out / "latency.json").read_text())["ms_per_image"] > 0
    picture = np.asarray(Image.open(out / "reconstructions.png"))
    assert picture.shape == (2 + 34, 2 + 6 * 34, 3)  # three faces, each next to its reconstruction
    # without the invert stage's record, a clear error
    (invert_out / "manifest.json").unlink()
    run = stage()
    assert run.returncode == 1 and "run the invert stage first" in run.stderr
