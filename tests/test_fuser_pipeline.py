"""The fuser in the invert and edit stages: metrics with and without it, fuser-mode edits."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import fuser_bytes, params, write_shards
from PIL import Image

from mambastyle.checkpoints import state_sha256
from mambastyle.edit.core import fused_edits
from mambastyle.edit.pipeline import EditError, load_fuser_model, read_images
from mambastyle.edit.stage import edit_from_params
from mambastyle.generate import resolve_generator
from mambastyle.invert.pipeline import invert_from_params
from mambastyle.latents import EDITS_FORMAT, open_table
from mambastyle.models.encoders import build_encoder
from mambastyle.models.inversion import invert_batch
from mambastyle.storage import resolve, write_bytes
from mambastyle.train.fuser import image_with_fuser
from mambastyle.visual import to_uint8

pytestmark = pytest.mark.slow

COUNTS = {"train": [5], "test": [6]}


def _generator():
    gp = params().generator
    return resolve_generator(None, gp.architecture, gp.init_seed, gp.latent_avg_samples)


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _edit_section(**kw) -> dict:
    yaw = {"name": "shift", "source": "fit", "uri": None, "component": None, "absolute": False,
           "column": "mse", "labels": None, "fit_where": "split = 'train'", "space": "W",
           "strengths": [-2.0, 0.0, 2.0],
           "layers": None}  # fmt: skip
    return {"where": "split = 'test'", "edits": [yaw], "batch_size": 4, "rows_per_file": 5,
            "images_per_shard": 50, "grid_samples": 2, **kw}  # fmt: skip


def test_invert_records_both_metrics_and_edit_fuser_mode_matches_the_reconstruction(tmp_path, ray_local):
    root = resolve(str(tmp_path / "data"))
    images = write_shards(root, COUNTS)
    g = _generator()
    write_bytes(root.join("fuser.pt"), fuser_bytes(g), durable=False)
    fuser_uri = root.join("fuser.pt").uri
    p = params(storage={"root": root.uri}, invert={"encoder": fuser_uri, "batch_size": 4, "rows_per_file": 5})
    manifest, prefix = invert_from_params(p, ray_connect=False)
    t = open_table(prefix.uri)
    table = t.to_table()
    keys = table.column("key").to_pylist()
    assert manifest["rows"] == len(images) and t.metadata["metrics"] == "mse,ssim,mse_fuser,ssim_fuser"
    assert t.metadata["fuser_sha256"] == t.metadata["encoder_sha256"] and t.metadata["fuser_uri"] == fuser_uri
    # the codes come from the fuser's encoder; both metrics agree with the core function
    model = load_fuser_model(fuser_uri, None)
    faces = torch.stack([torch.from_numpy(_decode(images[k]).copy()).permute(2, 0, 1) for k in keys])
    core = invert_batch(model.encoder, faces, g, None, pad_to=4, fuser=model.fuser)
    # bound: Ray's single-threaded actors batch other rows together: float32 kernel rounding only, measured
    # <= 2.4e-7 on codes up to 1.8 (atol 1e-5 is 40x) and 3e-7 relative on mse (rtol 1e-4 is 300x)
    np.testing.assert_allclose(t.w_plus(table), core.w_plus, atol=1e-5, rtol=0)
    np.testing.assert_allclose(table.column("mse").to_numpy(), core.mse, rtol=1e-4)
    np.testing.assert_allclose(table.column("mse_fuser").to_numpy(), core.mse_fuser, rtol=1e-4)
    # bound: the correction moves every mse by >= 0.6% (measured), 600x allclose's rtol 1e-5
    assert not np.allclose(core.mse, core.mse_fuser)  # the correction changes the reconstruction
    with torch.no_grad():  # mse_fuser is the error of the fused reconstruction
        x = faces.float() / 127.5 - 1
        y = image_with_fuser(g, model, x)[0]
    # bound: the same computation unbatched: measured 2.4e-7 relative
    np.testing.assert_allclose(((y - x) ** 2).flatten(1).mean(1).numpy(), core.mse_fuser, rtol=1e-4)

    # edit, fuser mode: each test face re-encoded from its shard; strength 0 = fuser reconstruction
    ep = params(storage={"root": root.uri}, edit=_edit_section(table=prefix.uri, mode="fuser"))
    result = edit_from_params(ep, ray_connect=False)
    edits = open_table(result.prefix.uri, fmt=EDITS_FORMAT).to_table().to_pylist()
    test_keys = sorted(k for k in keys if k.startswith("test"))
    assert len(edits) == 3 * len(test_keys) and result.manifest["selected"] == len(test_keys)
    by = {(r["key"], r["strength"]): r for r in edits}
    zero = read_images([by[k, 0.0]["image"] for k in test_keys])
    with torch.no_grad():
        faces = np.stack([_decode(images[k]) for k in test_keys])
        x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1
        recon = to_uint8(image_with_fuser(g, model, x[:4])[0])  # the actors' batch size
    for k, img, ref in zip(test_keys[:4], zero[:4], recon, strict=True):
        # bound: float32 rounding differing with batching/threads can flip a uint8 rounding by 1 (and below)
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1, k
    # the same rows through the core function: identical images, edited codes = code + strength * n
    edit = result.edits[0]
    codes, index, imgs = fused_edits(g, model, faces, [edit], 4)
    for (r, _, s), code, img in zip(index, codes, imgs, strict=True):
        row = by[test_keys[r], edit.strengths[s]]
        assert np.abs(_decode_uri(row["image"]).astype(int) - img).max() <= 1  # float rounding by batch
        # bound: re-encoded in other batches/threads (codes <= 2.4e-7 apart, as measured above) plus rounding
        # w + s * n (<= 2.4e-7 at |w| < 4): <= 5e-7, so 1e-6 leaves only ~2x (tight)
        np.testing.assert_allclose(np.asarray(row["w_plus"], np.float32), code.reshape(-1), atol=1e-6)
    moved = [np.abs(_decode_uri(by[k, 2.0]["image"]).astype(int) - _decode_uri(by[k, 0.0]["image"])).max()
             for k in test_keys]  # fmt: skip
    assert min(moved) > 0
    # W+ mode on the same table renders the codes alone: a different picture at strength 0
    wp = edit_from_params(params(storage={"root": root.uri}, edit=_edit_section(table=prefix.uri)),
                          ray_connect=False)  # fmt: skip
    plain = {r["key"]: r for r in open_table(wp.prefix.uri, fmt=EDITS_FORMAT).to_table().to_pylist()
             if r["strength"] == 0.0}  # fmt: skip
    assert wp.prefix.uri != result.prefix.uri
    assert any((_decode_uri(plain[k]["image"]) != _decode_uri(by[k, 0.0]["image"])).any() for k in test_keys)


def _decode_uri(uri: str) -> np.ndarray:
    return read_images([uri])[0]


def test_fuser_mode_needs_a_table_inverted_with_a_fuser(tmp_path, ray_local):
    root = resolve(str(tmp_path / "data"))
    write_shards(root, COUNTS)
    g = _generator()
    enc = build_encoder("mambastyle_tiny", g.resolution, seed=1, input_size=32, style_dim=g.style_dim)
    enc.set_latent_avg(g.latent_avg)
    from mambastyle.checkpoints import save_encoder

    save_encoder(enc, tmp_path / "enc.pt", generator={"sha256": state_sha256(g), "resolution": g.resolution,
                                                      "n_styles": g.n_styles})  # fmt: skip
    p = params(storage={"root": root.uri}, invert={"encoder": str(tmp_path / "enc.pt"), "batch_size": 4})
    _, prefix = invert_from_params(p, ray_connect=False)
    assert open_table(prefix.uri).to_table().column("mse_fuser").null_count == sum(map(sum, COUNTS.values()))
    ep = params(storage={"root": root.uri}, edit=_edit_section(table=prefix.uri, mode="fuser"))
    with pytest.raises(EditError, match="inverted without a fuser"):
        edit_from_params(ep, ray_connect=False)
    assert not (tmp_path / "data" / "edits").exists() or not any((tmp_path / "data" / "edits").iterdir())
