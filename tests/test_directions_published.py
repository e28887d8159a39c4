"""Published edit-direction files, rebuilt in their exact layouts, edit as their publishers do.

The layouts were read off the real files (which are not committed here):

* e4e ``editings/interfacegan_directions/{age,smile}.pt``: a float32 tensor (1, 512);
  ``pose.pt``: float32 (1, 18, 512), saved from ``cuda:0``. Unit norm per layer.
* e4e ``editings/ganspace_pca/ffhq_pca.pt``: a dict ``mean`` (1, 512), ``comp`` (80, 1, 512)
  with strides (1, 80, 80) (a transposed view), ``std`` (80,), all float32; unit components.
* MambaStyle ``editing_directions/*_boundary.npy``: float32 (1, 9216), a W+ boundary flattened
  row-major from (18, 512), unit norm overall.
* InterFaceGAN ``boundaries/stylegan_ffhq_*_w_boundary.npy``: float64 (1, 512), unit norm.

Each test restates the publisher's few lines of edit arithmetic inline and checks that the
project's loader plus :func:`apply_edits` (what the edit stage runs) gives the same codes
(n, 18, 512). Random inputs come from a fresh seed, named in every failure message.

Tolerances (measured over 60 seeds; codes |w| < 8, where a float32 ulp is at most 9.5e-7):
same float32 operations as the publisher's are bit-identical (atol 1e-6: 1 ulp of slack for
an operation order); a float64 reference against the float32 output differs by rounding the
result (measured <= 4.8e-7, atol 1e-5 is 20x); e4e's float32 GANSpace coordinate against the
project's float64 one differs by <= 1.9e-6 on edits up to 14 (atol 1e-4 is 50x).
"""

from __future__ import annotations

import io
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mambastyle.config import EditEntryParams
from mambastyle.directions import DirectionError, load_direction, load_ganspace
from mambastyle.edit.core import Edit, apply_edits
from mambastyle.edit.stage import build_edit
from mambastyle.errors import InvalidConfig
from mambastyle.storage import StorageOptions

S, D = 18, 512  # FFHQ 1024: the codes of every encoder here are (n, 18, 512)
N = 4

# e4e's editings/latent_editor.py / MambaStyle's: name -> (pca_idx, start, end, strength)
E4E_GANSPACE = {
    "eye_openness": (54, 7, 8, 5.0),
    "trimmed_beard": (58, 7, 9, 7.0),
    "lipstick": (34, 10, 11, 20.0),
    "face_roundness": (37, 0, 5, 20.0),
    "nose_length": (51, 4, 5, -30.0),
    "head_angle_up": (11, 1, 4, -10.5),
    "to_zero": (3, 0, 18, 0.0),  # strength 0 moves to coordinate 0: not the identity
}


@pytest.fixture
def seeded(_seed):
    """The test's seed (conftest: printed on failure, MAMBASTYLE_TEST_SEED repeats it) and the
    numpy Generator it seeds."""
    return np.random.default_rng(_seed), _seed


def _codes(rng: np.random.Generator) -> np.ndarray:
    """(N, S, D) float32 codes as encoders give them: a per-image w plus per-layer offsets."""
    return (rng.normal(size=(N, 1, D)) + 0.3 * rng.normal(size=(N, S, D))).astype(np.float32)


def _unit(rng: np.random.Generator, shape: tuple[int, ...], axis=None) -> np.ndarray:
    a = rng.normal(size=shape)
    return a / np.linalg.norm(a, axis=axis, keepdims=axis is not None)


def _save_on_cuda(tensor: torch.Tensor, path) -> None:
    """``torch.save`` as a CUDA process writes it (storage location ``cuda:0``), on any machine."""
    buf = io.BytesIO()
    torch.save(tensor, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert data.count(b"X\x03\x00\x00\x00cpu") == 1  # BINUNICODE 'cpu'
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(info.filename, data)


def _e4e_interfacegan_files(rng: np.random.Generator, tmp_path) -> dict[str, str]:
    """age.pt and smile.pt: (1, 512) float32 on cpu; pose.pt: (1, 18, 512) float32 on cuda:0."""
    paths = {}
    for name in ("age", "smile"):
        paths[name] = str(tmp_path / f"{name}.pt")
        torch.save(torch.from_numpy(_unit(rng, (1, D)).astype(np.float32)), paths[name])
    paths["pose"] = str(tmp_path / "pose.pt")
    _save_on_cuda(torch.from_numpy(_unit(rng, (1, S, D), axis=-1).astype(np.float32)), paths["pose"])
    return paths


def _e4e_pca_file(rng: np.random.Generator, path) -> dict[str, torch.Tensor]:
    """ffhq_pca.pt: mean (1, 512), comp (80, 1, 512) strides (1, 80, 80), std (80,), float32."""
    k = 80
    comp = _unit(rng, (k, D), axis=-1).astype(np.float32)
    storage = torch.from_numpy(np.ascontiguousarray(comp.T))  # (512, 80): e4e's comp is a view of it
    pca = {
        "mean": torch.from_numpy(rng.normal(scale=0.5, size=(1, D)).astype(np.float32)),
        "comp": torch.as_strided(storage, (k, 1, D), (1, k, k)),
        "std": torch.from_numpy(rng.uniform(0.5, 3.0, size=k).astype(np.float32)),
    }
    torch.save(pca, path)
    back = torch.load(path, weights_only=True)  # the layout survives saving, as in the real file
    assert back["comp"].stride() == (1, k, k) and list(back) == ["mean", "comp", "std"]
    return pca


def test_e4e_interfacegan_tensors_edit_as_latent_plus_factor_times_direction(seeded, tmp_path):
    rng, seed = seeded
    w = _codes(rng)
    for name, path in _e4e_interfacegan_files(rng, tmp_path).items():
        # the stored tensor, read without unpickling code (pose.pt needs map_location off a GPU)
        direction = torch.load(path, weights_only=True, map_location="cpu")
        edit = Edit(name, load_direction(path, S, D), (-3.0, 0.0, 2.0))
        out, index = apply_edits(w, [edit])
        for row, (r, _, s) in enumerate(index):
            factor = edit.strengths[s]
            # e4e LatentEditor.apply_interfacegan: latent + factor * direction
            want = (torch.from_numpy(w[r : r + 1]) + factor * direction)[0].numpy()
            # bound: one float32 multiply and add, as e4e does: bit-identical (see the module docstring)
            np.testing.assert_allclose(out[row], want, rtol=0, atol=1e-6, err_msg=f"{name}: seed={seed}")
        # MambaStyle's get_interface_gan_edits adds factor / 2 * direction: its factor f is strength f / 2
        out, _ = apply_edits(w, [Edit(name, load_direction(path, S, D), (5.0 / 2,))])
        want = (torch.from_numpy(w) + 5.0 / 2 * direction).numpy()
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-6, err_msg=f"{name} (MambaStyle): seed={seed}")


def test_mambastyle_flattened_wplus_boundaries_edit_as_its_code_does(seeded, tmp_path):
    rng, seed = seeded
    path = tmp_path / "Smiling_boundary.npy"
    np.save(path, _unit(rng, (1, S * D)).astype(np.float32))  # (1, 9216) float32
    boundary = torch.from_numpy(np.load(path, allow_pickle=False))
    w = _codes(rng)
    factors = (-4.0, 2.5, 12.0)
    out, _ = apply_edits(w, [Edit("smile", load_direction(str(path), S, D), factors)])
    wt = torch.from_numpy(w)
    # LatentEditor.get_fs_edits: flatten the codes, add factor * boundary, view back as (n, -1, 512)
    flat = wt.reshape(N, -1)
    fs = torch.cat([(flat + f * boundary.reshape(1, -1).repeat(N, 1)).view(N, -1, 512) for f in factors])
    # bound: the same float32 operations: bit-identical (see the module docstring)
    np.testing.assert_allclose(out, fs.numpy(), rtol=0, atol=1e-6, err_msg=f"seed={seed}")
    # models/inv_mamba.py: torch.FloatTensor(boundary).reshape(1, 18, 512), added times a strength
    wplus = torch.FloatTensor(boundary.numpy()).reshape(1, 18, 512)
    np.testing.assert_allclose(out[:N], (wt + factors[0] * wplus).numpy(), rtol=0, atol=1e-6,
                               err_msg=f"seed={seed}")  # fmt: skip


def test_flattened_boundary_must_match_the_code_shape(tmp_path):
    np.save(tmp_path / "cars.npy", np.zeros((1, 16 * D), np.float32))  # a 16-style generator's
    with pytest.raises(DirectionError, match=r"\(1, 8192\) does not fit codes of shape \(18, 512\)"):
        load_direction(str(tmp_path / "cars.npy"), S, D)
    assert load_direction(str(tmp_path / "cars.npy"), 16, D).shape == (16, D)


def test_interfacegan_w_boundaries_edit_as_linear_interpolate_in_wplus(seeded, tmp_path):
    rng, seed = seeded
    path = tmp_path / "stylegan_ffhq_smile_w_boundary.npy"
    np.save(path, _unit(rng, (1, D)))  # (1, 512) float64, as InterFaceGAN publishes them
    boundary = np.load(path, allow_pickle=False)
    assert boundary.dtype == np.float64
    w = _codes(rng)
    distances = np.linspace(-3.0, 3.0, 10)  # linear_interpolate's defaults
    out, index = apply_edits(w, [Edit("smile", load_direction(str(path), S, D), tuple(distances))])
    for r in range(N):
        # utils/manipulator.py linear_interpolate, W+ branch: code + distance * boundary on every layer
        latent = w[r : r + 1]
        steps = distances.reshape(-1, 1, 1).astype(np.float32)
        want = latent + steps * boundary.reshape(1, 1, -1)  # (10, 18, 512) float64
        got = out[[row for row, (i, _, _) in enumerate(index) if i == r]]
        # bound: float64 reference vs float32 output: rounding only, <= 2.5e-7 measured
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"row {r}: seed={seed}")


@pytest.mark.parametrize("name", sorted(E4E_GANSPACE))
def test_e4e_ganspace_pca_edits_as_e4e_does(seeded, tmp_path, name):
    rng, seed = seeded
    pca = _e4e_pca_file(rng, tmp_path / "ffhq_pca.pt")
    idx, start, end, strength = E4E_GANSPACE[name]
    w = _codes(rng)
    g = load_ganspace(str(tmp_path / "ffhq_pca.pt"), idx, S, D, absolute=True)
    out, _ = apply_edits(w, [Edit(name, g, (strength,), (start, end))])
    want = []
    for latent in torch.from_numpy(w):  # editings/ganspace.py edit() / get_delta(), on the cpu
        w_centered = latent - pca["mean"]
        coord = torch.sum(w_centered[0].reshape(-1) * pca["comp"][idx].reshape(-1)) / pca["std"][idx]
        delta = (strength - coord) * pca["comp"][idx] * pca["std"][idx]
        padded = torch.zeros(latent.shape)
        padded[start:end] += delta.repeat(end - start, 1)
        want.append(latent + padded)
    # bound: e4e's float32 coordinate vs our float64 one: <= 1.9e-6 measured on edits up to 14
    np.testing.assert_allclose(out, torch.stack(want).numpy(), rtol=1e-5, atol=1e-4, err_msg=f"seed={seed}")
    # relative mode (the edit stage's): strength in standard deviations along the component
    rel = load_ganspace(str(tmp_path / "ffhq_pca.pt"), idx, S, D)
    out, _ = apply_edits(w, [Edit(name, rel, (1.5,), (start, end))])
    step = np.zeros((S, D), np.float32)
    step[start:end] = 1.5 * pca["std"][idx].item() * pca["comp"][idx].numpy()
    # bound: float32 products in another order: 1 ulp of w (<= 4.8e-7 measured)
    np.testing.assert_allclose(out, w + step, rtol=1e-6, atol=1e-5, err_msg=f"seed={seed}")


def test_published_layouts_load_through_the_edit_stage(seeded, tmp_path):
    """``edit.edits`` entries naming each layout build edits that do the publisher's arithmetic."""
    rng, seed = seeded
    files = _e4e_interfacegan_files(rng, tmp_path)
    np.save(tmp_path / "Smiling_boundary.npy", _unit(rng, (1, S * D)).astype(np.float32))
    np.save(tmp_path / "smile_w.npy", _unit(rng, (1, D)))
    files |= {"ms_smile": str(tmp_path / "Smiling_boundary.npy"), "ifg_smile": str(tmp_path / "smile_w.npy")}
    pca = _e4e_pca_file(rng, tmp_path / "ffhq_pca.pt")
    blank = {"absolute": False, "column": None, "labels": None, "fit_where": None, "space": "W",
             "strengths": (-2.0, 0.0, 3.0)}  # fmt: skip
    table = SimpleNamespace(shape=(S, D))  # build_edit reads only the code shape of the table
    w = _codes(rng)
    for name, uri in files.items():
        entry = EditEntryParams(
            name=name, source="interfacegan", uri=uri, component=None, layers=(2, 9), **blank
        )
        out, _ = apply_edits(w, [build_edit(entry, table, StorageOptions())])
        stored = (
            np.load(uri) if uri.endswith(".npy") else torch.load(uri, weights_only=True, map_location="cpu")
        )
        d = np.broadcast_to(np.asarray(stored, np.float64).reshape(-1, D), (S, D)).copy()
        d[:2] = d[9:] = 0
        want = np.concatenate([w + s * d for s in (-2.0, 0.0, 3.0)])
        # bound: float64 reference vs float32 output: rounding only (<= 2.5e-7 measured, this and below)
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-5, err_msg=f"{name}: seed={seed}")
    entry = EditEntryParams(name="gs", source="ganspace", uri=str(tmp_path / "ffhq_pca.pt"), component=54,
                            layers=(7, 8), **blank)  # fmt: skip
    out, _ = apply_edits(w, [build_edit(entry, table, StorageOptions())])
    step = np.zeros((S, D))
    step[7] = pca["std"][54].item() * pca["comp"][54, 0].numpy()
    want = np.concatenate([w + s * step for s in (-2.0, 0.0, 3.0)])
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-5, err_msg=f"seed={seed}")


def test_e4e_ganspace_edits_through_the_edit_stage_with_absolute(seeded, tmp_path):
    """``absolute: true`` in an ``edit.edits`` entry gives e4e's GANSpace edits, strength 0 included."""
    rng, seed = seeded
    pca = _e4e_pca_file(rng, tmp_path / "ffhq_pca.pt")
    idx, start, end, _ = E4E_GANSPACE["eye_openness"]
    entry = EditEntryParams(name="eye_openness", source="ganspace", uri=str(tmp_path / "ffhq_pca.pt"),
                            component=idx, absolute=True, column=None, labels=None, fit_where=None,
                            space="W", strengths=(-5.0, 0.0, 5.0), layers=(start, end))  # fmt: skip
    w = _codes(rng)
    out, _ = apply_edits(w, [build_edit(entry, SimpleNamespace(shape=(S, D)), StorageOptions())])
    want = []
    for strength in entry.strengths:  # editings/ganspace.py, as above
        for latent in torch.from_numpy(w):
            coord = torch.sum((latent - pca["mean"])[0] * pca["comp"][idx].reshape(-1)) / pca["std"][idx]
            delta = (strength - coord) * pca["comp"][idx] * pca["std"][idx]
            padded = torch.zeros(latent.shape)
            padded[start:end] += delta.repeat(end - start, 1)
            want.append(latent + padded)
    # bound: e4e's float32 coordinate vs our float64 one, as in test_e4e_ganspace_pca_edits_as_e4e_does
    np.testing.assert_allclose(out, torch.stack(want).numpy(), rtol=1e-5, atol=1e-4, err_msg=f"seed={seed}")
    with pytest.raises(InvalidConfig, match="ganspace"):
        EditEntryParams(**{**entry.__dict__, "source": "interfacegan", "component": None})
