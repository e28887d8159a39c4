"""Edit directions and the plain edit functions (no Ray): fitting, file formats, applying."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mambastyle.directions import (
    DirectionError,
    fit_direction,
    load_direction,
    load_ganspace,
    save_direction,
)
from mambastyle.edit.core import Edit, apply_edits, parse_strengths, render, strength_label

S, D = 6, 24


def _codes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Codes like an encoder's: a shared per-image w plus small per-layer offsets."""
    w = rng.normal(size=(n, 1, D)) + 0.2 * rng.normal(size=(n, S, D))
    return w.astype(np.float32)


def _planted(rng: np.random.Generator, space: str = "W"):
    a = rng.normal(size=D if space == "W" else S * D)
    a /= np.linalg.norm(a)

    def attribute(w: np.ndarray) -> np.ndarray:
        x = w.mean(1) if space == "W" else w.reshape(len(w), -1)
        return 10.0 * x @ a + 3.0

    return a, attribute


@pytest.mark.parametrize("space", ["W", "W+"])
def test_fit_recovers_a_planted_numeric_attribute(rng, space):
    a, attribute = _planted(rng, space)
    w = _codes(rng, 400)
    y = attribute(w) + rng.normal(scale=0.5, size=400)
    d = fit_direction(w[:300], y[:300].tolist(), space, provenance={"column": "attr"})
    held = d.score(w[300:])
    # bound: signal sd 10 vs noise 0.5 caps the correlation at 0.9988; measured held-out/cv >= 0.991
    # (W+, sd 0.001) over 200 seeds; a useless fit's correlation on 100 rows has sd 0.1: 0.95 is 9.5 sd
    assert np.corrcoef(held, y[300:])[0, 1] > 0.95
    assert d.info["quality"]["cv_correlation"] > 0.95 and d.info["column"] == "attr"
    n = d.vector[0] if space == "W" else d.vector.reshape(-1)
    # bound: a float64 unit vector cast to float32 has norm 1 +- 6e-8 (measured); cosine measured
    # >= 0.9998 (W) / 0.962 (W+, sd 0.004) over 200 seeds; a random direction's is 0 +- 0.2 (W) / 0.083 (W+)
    assert abs(np.linalg.norm(n) - 1) < 1e-5 and n @ a > 0.9
    # the slope is the attribute's change per unit strength along the direction on every layer
    edit = Edit("attr", d, (-2.0, -1.0, 0.0, 1.0, 2.0))
    out, index = apply_edits(w[300:], [edit])
    true = attribute(out).reshape(5, -1)  # strengths x rows
    assert np.all(np.diff(true, axis=0) > 0)  # the planted attribute rises with strength, every row
    fitted = d.score(out).reshape(5, -1)
    # bound: exact up to float32 rounding of the edited codes; measured <= 2e-7 relative (500x margin)
    np.testing.assert_allclose(np.diff(fitted, axis=0), d.info["model"]["slope"], rtol=1e-4)


def test_fit_recovers_a_planted_boolean_attribute_and_skips_missing_values(rng):
    a, attribute = _planted(rng)
    w = _codes(rng, 1500)
    labels = [bool(v > 3.0) for v in attribute(w) + rng.normal(scale=0.3, size=1500)]
    values = [None if i % 10 == 0 else v for i, v in enumerate(labels[:1000])]  # unlabelled rows
    d = fit_direction(w[:1000], values, "W")
    assert d.info["kind"] == "boolean" and d.info["rows"] == 900 and d.info["rows_without_value"] == 100
    accuracy = np.mean((d.score(w[1000:]) > 0) == np.array(labels[1000:]))
    # bound: label noise 0.3 vs signal sd 10 (Bayes error ~1%); over 200 seeds held-out accuracy is
    # 0.959 +- 0.011 (min 0.928) and cv 0.955 +- 0.007: 0.9 is >5 sd below; chance is 0.5
    assert accuracy > 0.9 and d.info["quality"]["cv_accuracy"] > 0.9
    # bound: measured 0.992 +- 0.002 (min 0.984); a random direction in 24 dims: 0 +- 0.2, so 0.8 is 4 sd
    assert d.vector[0] @ a > 0.8


def test_fit_refuses_what_cannot_be_fitted(rng):
    w = _codes(rng, 10)
    with pytest.raises(DirectionError, match="constant"):
        fit_direction(w, [1.0] * 10)
    with pytest.raises(DirectionError, match="at least 4"):
        fit_direction(w[:3], [1.0, 2.0, 3.0])
    with pytest.raises(DirectionError, match="numeric or boolean"):
        fit_direction(w, ["a"] * 10)
    with pytest.raises(DirectionError, match="space"):
        fit_direction(w, list(range(10)), "Z")


def test_saved_fit_loads_back_with_its_record(rng, tmp_path):
    _, attribute = _planted(rng)
    w = _codes(rng, 60)
    d = fit_direction(w, attribute(w).tolist(), "W", provenance={"column": "attr", "where": "x > 1"})
    loc = save_direction(d, str(tmp_path / "attr.npy"))
    # the .npy alone is an InterFaceGAN-style (1, style_dim) array
    assert np.load(loc.path, allow_pickle=False).shape == (1, D)
    back = load_direction(str(tmp_path / "attr.npy"), S, D)
    np.testing.assert_array_equal(back.vector, d.vector)
    assert back.info["where"] == "x > 1" and back.info["shape"] == [1, D]
    # bound: vector bit-equal and JSON round-trips float64 exactly: identical (measured 0)
    np.testing.assert_allclose(back.score(w), d.score(w), rtol=1e-6)
    with pytest.raises(DirectionError, match=r"\.npy"):
        save_direction(d, str(tmp_path / "attr.pt"))


@pytest.mark.parametrize("shape", [(D,), (1, D), (S, D), (1, S, D)])
@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_interfacegan_files_load_in_every_layout(rng, tmp_path, shape, suffix):
    arr = rng.normal(size=shape).astype(np.float32)
    path = tmp_path / f"dir{suffix}"
    if suffix == ".npy":
        np.save(path, arr)
    else:
        torch.save(torch.from_numpy(arr), path)  # how e4e's age.pt / pose.pt are stored
    d = load_direction(str(path), S, D)
    want = np.broadcast_to(arr.reshape(-1, D), (S, D))
    np.testing.assert_array_equal(d.vector, want)
    w = _codes(rng, 3)
    # bound: one float32 multiply by an exact 2.5 on both sides: identical (measured 0)
    np.testing.assert_allclose(d.delta(w, 2.5), 2.5 * np.broadcast_to(want, w.shape), rtol=1e-6)
    # a layer range edits only those styles
    part = d.delta(w, 1.0, (2, 4))
    assert np.all(part[:, :2] == 0) and np.all(part[:, 4:] == 0) and np.any(part[:, 2:4] != 0)


def test_wrong_or_unsafe_direction_files_are_refused(tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros((1, 512), np.float32))
    with pytest.raises(DirectionError, match=r"shape \(1, 512\) does not fit codes of shape \(6, 24\)"):
        load_direction(str(tmp_path / "wide.npy"), S, D)
    np.save(tmp_path / "layers.npy", np.zeros((1, 18, D), np.float32))
    with pytest.raises(DirectionError, match="does not fit"):
        load_direction(str(tmp_path / "layers.npy"), S, D)
    np.save(tmp_path / "nan.npy", np.full((1, D), np.nan, np.float32))
    with pytest.raises(DirectionError, match="non-finite"):
        load_direction(str(tmp_path / "nan.npy"), S, D)
    with pytest.raises(DirectionError, match="no such direction file"):
        load_direction(str(tmp_path / "missing.npy"), S, D)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DirectionError, match="unreadable"):
        load_direction(str(tmp_path / "objects.npy"), S, D)
    torch.save({"direction": torch.zeros(1, D), "fn": json.dumps}, tmp_path / "code.pt")
    with pytest.raises(DirectionError, match="refused to load"):
        load_direction(str(tmp_path / "code.pt"), S, D)
    (tmp_path / "x.txt").write_text("0 1 2")
    with pytest.raises(DirectionError, match="unknown direction file type"):
        load_direction(str(tmp_path / "x.txt"), S, D)


def _pca(rng, k: int = 5):
    comp = rng.normal(size=(k, 1, D))
    comp /= np.linalg.norm(comp, axis=-1, keepdims=True)
    return rng.normal(size=(1, D)), comp, rng.uniform(0.5, 2.0, size=k)


def test_ganspace_files_load_in_both_layouts_and_edit_as_documented(rng, tmp_path):
    mean, comp, std = _pca(rng)
    # e4e's ffhq_pca.pt layout and GANSpace's own .npz layout
    torch.save({"mean": torch.tensor(mean), "comp": torch.tensor(comp), "std": torch.tensor(std)},
               tmp_path / "pca.pt")  # fmt: skip
    np.savez(tmp_path / "pca.npz", lat_mean=mean, lat_comp=comp, lat_stdev=std, var_ratio=np.ones(5))
    w = _codes(rng, 4)
    for name in ("pca.pt", "pca.npz"):
        g = load_ganspace(str(tmp_path / name), 3, S, D)
        delta = g.delta(w, 2.0, (1, 3))
        want = (2.0 * std[3] * comp[3, 0]).astype(np.float32)
        # bound: float32 products vs a float64 one rounded once: <= 2 float32 ulps (measured 1.3e-7 relative)
        np.testing.assert_allclose(delta[:, 1:3], np.broadcast_to(want, (4, 2, D)), rtol=1e-5)
        assert np.all(delta[:, [0, 3, 4, 5]] == 0)
        np.testing.assert_array_equal(g.delta(w, 0.0), 0)
    # absolute mode (e4e's semantics) moves the coordinate on the component to `strength`
    g = load_ganspace(str(tmp_path / "pca.pt"), 1, S, D, absolute=True)
    moved = w + g.delta(w, 1.5)
    coord = ((moved[:, 0] - mean) @ comp[1, 0]) / std[1]
    # bound: only float32 rounding of the moved codes and the component (measured <= 4.7e-7; 200x margin)
    np.testing.assert_allclose(coord, 1.5, atol=1e-4)
    with pytest.raises(DirectionError, match="component 9 out of range"):
        load_ganspace(str(tmp_path / "pca.pt"), 9, S, D)
    with pytest.raises(DirectionError, match="do not fit codes"):
        load_ganspace(str(tmp_path / "pca.pt"), 0, S, 2 * D)
    np.savez(tmp_path / "bad.npz", lat_comp=comp, lat_stdev=std)
    with pytest.raises(DirectionError, match="no mean or lat_mean"):
        load_ganspace(str(tmp_path / "bad.npz"), 0, S, D)
    with pytest.raises(DirectionError, match="single tensor"):
        load_direction(str(tmp_path / "pca.pt"), S, D)


def test_strengths_are_validated_and_labelled_uniquely():
    assert parse_strengths("-3, 0,1.5") == (-3.0, 0.0, 1.5)
    for bad, match in (("a,1", "not a number"), ([True], "not a number"), ([1, 1.0], "repeated"),
                       (["nan"], "not finite"), ([], "no strengths"), ([None], "not a number")):  # fmt: skip
        with pytest.raises(DirectionError, match=match):
            parse_strengths(bad)
    values = [-3.0, -1.5, -0.1, 0.0, 0.1, 1.0, 1.5, 2.0, 10.0, 1e-7, 1e20]
    labels = [strength_label(v) for v in values]
    assert len(set(labels)) == len(labels) and all("." not in x and "-" not in x for x in labels)
    assert strength_label(-3.0) == "m3" and strength_label(1.5) == "p1_5" and strength_label(0.0) == "0"


def test_apply_edits_covers_every_combination_and_strength_zero_is_exact(rng):
    w = _codes(rng, 3)
    a = load_like(rng.normal(size=(1, D)))
    b = load_like(rng.normal(size=(S, D)))
    edits = [Edit("a", a, (-1.0, 0.0, 2.0)), Edit("b", b, (0.5,), (0, 2))]
    out, index = apply_edits(w, edits)
    assert out.shape == (12, S, D) and len(index) == 12
    assert sorted(set(index)) == sorted(
        (r, e, s) for e, n in ((0, 3), (1, 1)) for s in range(n) for r in range(3)
    )
    for row, (r, e, s) in enumerate(index):
        edit = edits[e]
        strength = edit.strengths[s]
        if strength == 0:
            np.testing.assert_array_equal(out[row], w[r])  # bit-exact
        else:
            # bound: the same float32 computation: identical, so allclose's default rtol 1e-7 holds
            np.testing.assert_allclose(
                out[row], w[r] + edit.direction.delta(w[r : r + 1], strength, edit.layers)[0]
            )
    with pytest.raises(DirectionError, match="letters, digits"):
        Edit("bad name", a, (1.0,))
    with pytest.raises(DirectionError, match="not within"):
        Edit("a", a, (1.0,), (4, 9))


def load_like(arr: np.ndarray):
    """A direction as load_direction returns it, from an in-memory array."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npy"
        np.save(path, arr.astype(np.float32))
        return load_direction(str(path), S, D)


def test_render_matches_the_generator_in_any_batch_size(rng):
    from mambastyle.models.stylegan2 import GeneratorConfig, build_generator
    from mambastyle.visual import to_uint8

    cfg = GeneratorConfig(resolution=16, style_dim=16, n_mlp=2, channel_multiplier=1, channel_max=16)
    g = build_generator(cfg, seed=0).eval().requires_grad_(False)
    g.compute_latent_avg(100)
    w = rng.normal(size=(5, g.n_styles, 16)).astype(np.float32)
    with torch.no_grad():
        want = to_uint8(g.synthesis(torch.from_numpy(w), noise_mode="const"))
    for batch in (1, 2, 5):
        got = render(g, w, batch)
        assert got.shape == (5, 16, 16, 3) and got.dtype == np.uint8
        # bound: batch size changes float32 summation order (~1e-6), which can flip a uint8 rounding by 1
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert render(g, w[:0], 4).shape == (0, 16, 16, 3)
