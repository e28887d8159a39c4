"""Edit directions in W / W+: loaded from the files peers publish, or fitted from a latent table.

Three kinds, one interface (:class:`Direction`: ``delta(w_plus, strength)`` is what an edit
adds to codes of shape (n, n_styles, style_dim)):

* **InterFaceGAN-style** files: a vector of shape (style_dim,), (1, style_dim) -- the same
  direction for every layer -- or (n_styles, style_dim) / (1, n_styles, style_dim), or a W+
  boundary flattened to (1, n_styles * style_dim) (MambaStyle's), as ``.npy`` or a ``.pt``
  tensor. An edit adds ``strength * direction`` to the selected layers.
* **GANSpace** PCA files: ``mean`` (1, style_dim), ``comp`` (K, 1, style_dim), ``std`` (K,) in
  a ``.pt`` dict (the layout e4e ships), or GANSpace's own ``.npz`` (``lat_mean``,
  ``lat_comp``, ``lat_stdev``). An edit names a component and adds ``strength * std_k *
  comp_k`` (strength in standard deviations of that component, so 0 leaves the code as it is);
  ``absolute=True`` instead moves the code *to* coordinate ``strength`` along the component,
  as e4e's editing code does.
* **Fitted** directions: ridge regression of a numeric or boolean table column on the codes
  (layer mean in ``W``, the whole code in ``W+``); the unit normal of the fitted boundary is
  saved as an InterFaceGAN-style ``.npy`` plus a ``.json`` with its provenance and fit quality
  (cross-validated correlation or accuracy), and the fitted linear model can score codes.

Every file is read without unpickling code (``np.load(allow_pickle=False)``,
``torch.load(weights_only=True)``) and checked against the table's code shape; a mismatch is
a :class:`DirectionError` that names the file and both shapes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mambastyle.storage import Location, StorageOptions, read_bytes, resolve, write_bytes

DIRECTION_FORMAT = "mambastyle-direction"
DIRECTION_VERSION = 1


class DirectionError(ValueError):
    """A direction file is missing, unreadable or of the wrong shape, or a fit is impossible."""


def check_layers(layers: tuple[int, int] | None, n_styles: int) -> tuple[int, int]:
    """``layers`` as a validated [start, stop) range of style indices (None = all)."""
    if layers is None:
        return 0, n_styles
    start, stop = (int(v) for v in layers)
    if not 0 <= start < stop <= n_styles:
        raise DirectionError(f"layer range [{start}, {stop}) is not within the {n_styles} styles")
    return start, stop


@dataclass
class Direction:
    """A linear edit: ``vector`` (n_styles, style_dim) float32 is added ``strength`` times."""

    vector: np.ndarray
    source: str = ""  # where it came from (file URI, or "fit")
    sha256: str = ""  # of the file's bytes, or for a fit of its inputs (info: vector_sha256)
    info: dict = field(default_factory=dict)  # provenance and fit quality for fitted ones

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.vector.shape)  # type: ignore[return-value]

    @property
    def identity_at_zero(self) -> bool:
        """Whether strength 0 leaves every code as it is (always, for a linear edit)."""
        return True

    def delta(self, w_plus: np.ndarray, strength: float, layers: tuple[int, int] | None = None) -> np.ndarray:
        """What an edit of ``strength`` adds to ``w_plus`` (n, n_styles, style_dim)."""
        start, stop = check_layers(layers, self.vector.shape[0])
        out = np.zeros_like(w_plus, dtype=np.float32)
        out[:, start:stop] = np.float32(strength) * self.vector[start:stop]
        return out

    def score(self, w_plus: np.ndarray) -> np.ndarray | None:
        """The fitted attribute's predicted value for each code (None unless fitted)."""
        model = self.info.get("model")
        if not model:
            return None
        x = features(w_plus, self.info["space"])
        flat = self.vector[0] if self.info["space"] == "W" else self.vector.reshape(-1)
        return (x @ flat.astype(np.float64)) * model["slope"] + model["offset"]


@dataclass
class GanspaceDirection:
    """One principal component of a GANSpace PCA file."""

    component: np.ndarray  # (style_dim,) unit-ish PCA component
    mean: np.ndarray  # (style_dim,)
    std: float  # standard deviation of W along the component
    absolute: bool = False
    n_styles: int = 0
    source: str = ""
    sha256: str = ""
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_styles, self.component.shape[0]

    @property
    def identity_at_zero(self) -> bool:
        """False in ``absolute`` mode, where strength 0 moves the code to coordinate 0."""
        return not self.absolute

    def delta(self, w_plus: np.ndarray, strength: float, layers: tuple[int, int] | None = None) -> np.ndarray:
        start, stop = check_layers(layers, self.n_styles)
        out = np.zeros_like(w_plus, dtype=np.float32)
        step = self.component * np.float32(self.std)
        if self.absolute:  # move the coordinate (read on the first style) to `strength`
            coord = (w_plus[:, 0].astype(np.float64) - self.mean) @ self.component / self.std
            amount = (strength - coord).astype(np.float32)[:, None, None]
            out[:, start:stop] = amount * step
        else:
            out[:, start:stop] = np.float32(strength) * step
        return out

    def score(self, w_plus: np.ndarray) -> None:
        return None


# --------------------------------------------------------------------------- loading


def _read(uri: str, options: StorageOptions | None) -> tuple[bytes, Location]:
    try:
        loc = resolve(uri, options)
        return read_bytes(loc), loc
    except FileNotFoundError:
        raise DirectionError(f"{uri}: no such direction file") from None
    except (OSError, ValueError) as exc:
        raise DirectionError(f"{uri}: cannot read ({exc})") from None


def _tensor_file(data: bytes, uri: str):
    """A ``.pt`` file's content, loaded with ``weights_only=True`` (tensors as NumPy arrays)."""
    import torch

    from mambastyle.checkpoints import read_checkpoint
    from mambastyle.errors import CheckpointError

    buf = io.BytesIO(data)
    buf.name = uri
    try:
        obj = read_checkpoint(buf)
    except CheckpointError as exc:
        raise DirectionError(str(exc)) from None

    def convert(value):
        if isinstance(value, torch.Tensor):
            return value.detach().float().cpu().numpy()
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        return value

    return convert(obj)


def _array_file(data: bytes, uri: str):
    """``.npy`` -> array, ``.npz`` -> dict of arrays (never unpickled), ``.pt`` -> as stored."""
    name = uri.lower()
    if name.endswith(".pt") or name.endswith(".pth"):
        return _tensor_file(data, uri)
    try:
        if name.endswith(".npz"):
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if name.endswith(".npy"):
            return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise DirectionError(f"{uri}: unreadable ({str(exc).splitlines()[0]})") from None
    raise DirectionError(f"{uri}: unknown direction file type (expected .npy, .npz or .pt)")


def _as_layers(arr: np.ndarray, n_styles: int, style_dim: int, uri: str) -> np.ndarray:
    """(style_dim,), (1, style_dim), (n_styles, style_dim), (1, n_styles, style_dim) or a
    flattened W+ boundary (n_styles * style_dim,) / (1, n_styles * style_dim) -> (n_styles,
    style_dim) float32; anything else is refused with both shapes named."""
    a = np.asarray(arr, dtype=np.float32)
    squeezed = a[0] if a.ndim >= 2 and a.shape[0] == 1 else a
    if squeezed.ndim == 1 and squeezed.shape[0] == style_dim:
        return np.repeat(squeezed[None], n_styles, axis=0)
    if squeezed.ndim == 1 and squeezed.shape[0] == n_styles * style_dim:
        # MambaStyle's editing_directions/*.npy: (1, 18 * 512), read row-major as (18, 512)
        return np.ascontiguousarray(squeezed.reshape(n_styles, style_dim))
    if squeezed.shape == (n_styles, style_dim):
        return np.ascontiguousarray(squeezed)
    raise DirectionError(
        f"{uri}: a direction of shape {tuple(a.shape)} does not fit codes of shape "
        f"({n_styles}, {style_dim}) (expected ({style_dim},), (1, {style_dim}), "
        f"({n_styles}, {style_dim}), (1, {n_styles}, {style_dim}) or (1, {n_styles * style_dim}))"
    )


def load_direction(
    uri: str, n_styles: int, style_dim: int, options: StorageOptions | None = None
) -> Direction:
    """An InterFaceGAN-style direction file (``.npy``, or a ``.pt`` tensor), checked against the
    code shape. A fitted direction's ``.json`` beside it, when present, restores its provenance
    and scoring model."""
    data, loc = _read(uri, options)
    obj = _array_file(data, uri)
    if isinstance(obj, Mapping):
        arrays = [v for v in obj.values() if isinstance(v, np.ndarray)]
        if len(arrays) != 1:
            raise DirectionError(
                f"{uri}: holds {sorted(obj)}; an InterFaceGAN direction is a single tensor "
                "(for a GANSpace PCA file, name a component)"
            )
        obj = arrays[0]
    if not isinstance(obj, np.ndarray):
        raise DirectionError(f"{uri}: holds a {type(obj).__name__}, not a tensor")
    if not np.isfinite(obj).all():
        raise DirectionError(f"{uri}: the direction has non-finite values")
    vector = _as_layers(obj, n_styles, style_dim, uri)
    info: dict = {}
    sidecar = _sidecar(loc)
    try:
        info = json.loads(read_bytes(sidecar))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise DirectionError(f"{sidecar.uri}: unreadable direction record ({exc})") from None
    if info and info.get("format") != DIRECTION_FORMAT:
        info = {}  # some other file that happens to share the name
    return Direction(vector, uri, hashlib.sha256(data).hexdigest(), info)


def load_ganspace(
    uri: str,
    component: int,
    n_styles: int,
    style_dim: int,
    options: StorageOptions | None = None,
    absolute: bool = False,
) -> GanspaceDirection:
    """Component ``component`` of a GANSpace PCA file (``.pt`` {mean, comp, std} or GANSpace's
    ``.npz`` {lat_mean, lat_comp, lat_stdev})."""
    data, _ = _read(uri, options)
    obj = _array_file(data, uri)
    if not isinstance(obj, Mapping):
        raise DirectionError(f"{uri}: a GANSpace PCA file is a dict of mean/comp/std, got one array")
    names = {"mean": ("mean", "lat_mean"), "comp": ("comp", "lat_comp"), "std": ("std", "lat_stdev")}
    found = {}
    for role, keys in names.items():
        key = next((k for k in keys if k in obj), None)
        if key is None:
            raise DirectionError(f"{uri}: no {' or '.join(keys)} entry (has {', '.join(sorted(obj))})")
        found[role] = np.asarray(obj[key], dtype=np.float64)
    comp = found["comp"].reshape(found["comp"].shape[0], -1)
    mean, std = found["mean"].reshape(-1), found["std"].reshape(-1)
    if comp.shape[1] != style_dim or mean.shape[0] != style_dim or std.shape[0] != comp.shape[0]:
        raise DirectionError(
            f"{uri}: components {tuple(found['comp'].shape)}, mean {tuple(found['mean'].shape)}, "
            f"std {tuple(found['std'].shape)} do not fit codes of shape ({n_styles}, {style_dim})"
        )
    if not 0 <= component < comp.shape[0]:
        raise DirectionError(f"{uri}: component {component} out of range (the file has {comp.shape[0]})")
    if not (np.isfinite(comp[component]).all() and np.isfinite(std[component]) and std[component] > 0):
        raise DirectionError(f"{uri}: component {component} is degenerate (non-finite or zero std)")
    return GanspaceDirection(
        comp[component].astype(np.float32), mean, float(std[component]), absolute, n_styles, uri,
        hashlib.sha256(data + f"#{component}/{absolute}".encode()).hexdigest(),
        {"component": component},
    )  # fmt: skip


# --------------------------------------------------------------------------- fitting


def features(w_plus: np.ndarray, space: str) -> np.ndarray:
    """The regression inputs: the layer mean (``W``) or the whole flattened code (``W+``)."""
    w = np.asarray(w_plus, dtype=np.float64)
    if space == "W":
        return w.mean(axis=1)
    if space == "W+":
        return w.reshape(w.shape[0], -1)
    raise DirectionError(f"space must be 'W' or 'W+', got {space!r}")


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge coefficients and intercept (centred; dual form, so it is cheap when d >> n)."""
    xm, ym = x.mean(0), y.mean()
    xc = x - xm
    gram = xc @ xc.T
    coef = xc.T @ np.linalg.solve(gram + alpha * np.eye(len(y)), y - ym)
    return coef, float(ym - xm @ coef)


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def _quality(pred: np.ndarray, y: np.ndarray, boolean: bool) -> float:
    if boolean:
        return float(np.mean((pred > 0) == (y > 0)))
    if pred.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, y)[0, 1])


def _targets(raw: list) -> tuple[list[int], np.ndarray, bool]:
    """The rows with a value, their targets (booleans as -1/+1) and whether the column is boolean."""
    keep = [i for i, v in enumerate(raw) if v is not None and not (isinstance(v, float) and math.isnan(v))]
    boolean = all(isinstance(raw[i], bool | np.bool_) for i in keep) and bool(keep)
    try:
        y = np.array([float(raw[i]) for i in keep], dtype=np.float64)
    except (TypeError, ValueError):
        raise DirectionError("the column to fit must be numeric or boolean") from None
    if boolean:
        y = np.where(y > 0, 1.0, -1.0)
    if len(keep) < 4:
        raise DirectionError(f"{len(keep)} rows with a value: at least 4 are needed to fit a direction")
    if np.all(y == y[0]):
        raise DirectionError("the column is constant over the selected rows: nothing to fit")
    return keep, y, boolean


def _select_penalty(
    x: np.ndarray, y: np.ndarray, splits: list[np.ndarray], penalties: Sequence[float]
) -> tuple[float, np.ndarray]:
    """The penalty with the lowest out-of-fold squared error (the first on ties) and its predictions."""
    best: tuple[float, float, np.ndarray] | None = None
    for penalty in penalties:
        pred = np.empty_like(y)
        for test in splits:
            train = np.setdiff1d(np.arange(len(y)), test)
            if np.all(y[train] == y[train][0]):
                pred[test] = y[train][0]
                continue
            coef, icpt = _ridge(x[train], y[train], penalty)
            pred[test] = x[test] @ coef + icpt
        err = float(np.mean((pred - y) ** 2))
        if best is None or err < best[0] - 1e-12:
            best = (err, penalty, pred)
    assert best is not None
    return best[1], best[2]


def fit_direction(
    w_plus: np.ndarray,
    values: Sequence,
    space: str = "W",
    folds: int = 5,
    seed: int = 0,
    alphas: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
    provenance: Mapping | None = None,
) -> Direction:
    """Fits a linear boundary for ``values`` (numeric, or boolean) over codes (n, S, D).

    Ridge regression (booleans coded -1/+1) with the penalty picked by ``folds``-fold
    cross-validation from ``alphas`` (relative to the mean squared norm of the centred
    features); the direction is the unit normal of the fitted boundary, so strength is a
    distance in W. ``info["quality"]`` holds the out-of-fold correlation (numeric) or
    accuracy (boolean) and the in-sample one; ``info["model"]`` turns ``x . n`` back into
    the attribute (``slope`` = attribute change per unit of strength over all layers).

    Raises:
        DirectionError: fewer than 4 usable rows, a constant column, or non-numeric values.
    """
    w = np.asarray(w_plus, dtype=np.float32)
    if w.ndim != 3:
        raise DirectionError(f"codes must be (n, n_styles, style_dim), got {w.shape}")
    raw = list(values)
    keep, y, boolean = _targets(raw)
    x = features(w[keep], space)
    scale = float(np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))) or 1.0
    k = max(2, min(folds, len(keep) // 2))
    penalty, cv_pred = _select_penalty(x, y, _folds(len(keep), k, seed), [a * scale for a in alphas])
    coef, icpt = _ridge(x, y, penalty)
    norm = float(np.linalg.norm(coef))
    if not math.isfinite(norm) or norm == 0:
        raise DirectionError("the fit is degenerate (zero or non-finite coefficients)")
    unit = coef / norm
    vector = unit[None, :] if space == "W" else unit.reshape(1, *w.shape[1:])
    vector = vector.astype(np.float32)
    n_styles = w.shape[1]
    info = {
        "format": DIRECTION_FORMAT,
        "version": DIRECTION_VERSION,
        "space": space,
        "kind": "boolean" if boolean else "numeric",
        "rows": len(keep),
        "rows_without_value": len(raw) - len(keep),
        "alpha": penalty,
        "folds": k,
        "quality": {
            ("cv_accuracy" if boolean else "cv_correlation"): _quality(cv_pred, y, boolean),
            ("train_accuracy" if boolean else "train_correlation"): _quality(x @ coef + icpt, y, boolean),
        },
        # attribute ~= slope * (x . n) + offset; an edit of strength s on all layers moves it by s * slope
        "model": {"slope": norm, "offset": icpt},
        **dict(provenance or {}),
    }
    info["vector_sha256"] = hashlib.sha256(vector.tobytes()).hexdigest()
    layers = np.repeat(vector, n_styles, axis=0) if space == "W" else vector[0]
    # A fit is identified by its inputs (table, column, rows, settings), not by its floating-point
    # result, which may differ in the last bits between runs that batch rows differently.
    inputs = {k: info.get(k) for k in ("space", "folds", "rows")}
    inputs |= {k: v for k, v in (provenance or {}).items() if k != "table"}  # the table by run id
    inputs["alphas"] = list(alphas)
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return Direction(np.ascontiguousarray(layers), "fit", digest, info)


def _sidecar(loc: Location) -> Location:
    stem = posixpath.splitext(loc.path)[0]
    return Location(loc.fs, stem + ".json", posixpath.splitext(loc.uri)[0] + ".json")


def save_direction(direction: Direction, uri: str, options: StorageOptions | None = None) -> Location:
    """Writes a fitted direction as an InterFaceGAN-style ``.npy`` ((1, style_dim) for ``W``,
    (1, n_styles, style_dim) for ``W+``) and its record (provenance, fit quality) as ``.json``."""
    if not uri.endswith(".npy"):
        raise DirectionError(f"{uri}: a direction is saved as .npy (with a .json record beside it)")
    loc = resolve(uri, options)
    space = direction.info.get("space")
    arr = direction.vector[:1] if space == "W" else direction.vector[None]
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    info = {**direction.info, "shape": list(arr.shape)}
    write_bytes(_sidecar(loc), (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    write_bytes(loc, buf.getvalue())
    return loc
