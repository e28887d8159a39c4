"""FFHQ-style face alignment: dlib detection + 68 landmarks, then the FFHQ quad transform.

The transform follows the procedure published with FFHQ: an oriented square ("quad") is
derived from the eye and mouth positions, the image is shrunk when the quad is much
larger than the output, cropped around the quad, padded by reflection with a blurred
border when the quad leaves the image, and resampled to the square output.

Detection uses dlib's HOG frontal-face detector and the 68-point shape predictor that
ships in the ``face-recognition-models`` package; its ``.dat`` file is located by path
(the package itself does not import on current setuptools). Nothing is downloaded. Both are
trained on upright faces, so each face's orientation is searched and a rolled face detected
again turned level (``SEARCH_ANGLES``).

Its length is the three parts of one contract (detection with the orientation search, the quad
and its resampling, the pose estimate), which share the landmark conventions.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"

# A generic 3-D face (arbitrary units, x right, y up, z towards the camera) at six landmarks,
# used to estimate head pose: nose tip, chin, outer eye corners, mouth corners.
_POSE_LANDMARKS = (30, 8, 36, 45, 48, 54)
_POSE_MODEL = np.array(
    [
        [0.0, 0.0, 0.0],
        [0.0, -330.0, -65.0],
        [-225.0, 170.0, -135.0],
        [225.0, 170.0, -135.0],
        [-150.0, -150.0, -125.0],
        [150.0, -150.0, -125.0],
    ]
)
# Least squares against the centred model: pts ~ model @ m is solved by m = pinv(model) @ pts.
_POSE_SOLVE = np.linalg.pinv(_POSE_MODEL - _POSE_MODEL.mean(0))


class AlignmentUnavailable(RuntimeError):
    """dlib or the landmark model cannot be found."""


def predictor_path() -> Path:
    """Path of the 68-point landmark model inside the installed face-recognition-models package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise AlignmentUnavailable(
            "the face-recognition-models package is not installed; it provides "
            f"{PREDICTOR_FILE} (pip install face-recognition-models)"
        )
    for base in spec.submodule_search_locations:
        path = Path(base) / "models" / PREDICTOR_FILE
        if path.is_file():
            return path
    raise AlignmentUnavailable(f"{PREDICTOR_FILE} not found in {list(spec.submodule_search_locations)}")


@functools.cache
def _default_models():
    return _dlib_models(str(predictor_path()))


@functools.cache
def _dlib_models(path: str):
    try:
        import dlib
    except ImportError as exc:  # pragma: no cover - dlib is a core dependency
        raise AlignmentUnavailable(f"dlib is not importable: {exc}") from None
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(path)


@dataclass(frozen=True)
class Face:
    """One detected face: bounding box (left, top, right, bottom), detector score, (68, 2) landmarks."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray

    @property
    def size(self) -> float:
        """Geometric mean of the box's width and height, in pixels."""
        left, top, right, bottom = self.box
        return math.sqrt(max(right - left, 0) * max(bottom - top, 0))


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")


# dlib's HOG detector and landmark model are trained on upright faces: on a face rolled 30
# degrees the landmarks (hence the crop) drift by a fifth of the face, at 38 they can come out
# level and wrong, at 45 the face is not found. So every face's orientation is searched: the
# window around it is turned by SEARCH_ANGLES at low resolution, the best-scoring turn wins,
# and the face is detected again in a window turned so its eyes are level.
SEARCH_ANGLES = (-45.0, -30.0, -15.0, 0.0, 15.0, 30.0, 45.0)
SEARCH_FACE_PX = 120.0  # the face's size in the search windows (the detector's least is 80)
LEVEL_ROLL = 12.0  # degrees: a face whose eyes tilt less is kept as detected in the photo
LEVEL_ROUNDS = 3
ROTATED_PASSES = (35.0, -35.0)  # degrees: a photo without an upright face is searched turned so


def detect_faces(image: np.ndarray, upsample: int = 0, min_score: float = 0.0) -> list[Face]:
    """Faces in an (H, W, 3) uint8 RGB image scoring at least ``min_score``, largest first.

    ``upsample`` > 0 finds smaller faces at several times the cost (and, on some photos,
    false positives on small face-like patterns). Each face's orientation is searched and a
    rolled face is detected again turned level, its landmarks mapped back (see
    :data:`SEARCH_ANGLES`); a photo with no face upright is searched turned by
    :data:`ROTATED_PASSES` (strongly rolled faces are not found otherwise).
    """
    _check_rgb(image)
    image = np.ascontiguousarray(image)
    faces = _detect(image, upsample, min_score)
    if not faces:
        # Any score will do here: a face the turned photo shows only a few degrees off level
        # can score low; it is detected again level below, where it must reach min_score.
        for angle in ROTATED_PASSES:
            turned, back = _turned(image, angle, (image.shape[1] / 2, image.shape[0] / 2))
            faces += [_mapped(f, back) for f in _detect(turned, upsample, 0.0)]
        faces = _distinct(faces)
    faces = [_upright(image, f, upsample, min_score) for f in faces]
    return sorted((f for f in faces if f.score >= min_score), key=lambda f: f.size, reverse=True)


def _detect(image: np.ndarray, upsample: int, min_score: float) -> list[Face]:
    detector, predictor = _default_models()
    rects, scores, _ = detector.run(image, upsample, min_score)
    faces = []
    for rect, score in zip(rects, scores, strict=True):
        shape = predictor(image, rect)
        landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        faces.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), float(score), landmarks))
    return faces


def eye_roll(landmarks: np.ndarray) -> float:
    """Tilt of the line from the left to the right eye's centre, in degrees (positive: the
    right eye lower in the image, i.e. the face turned clockwise as displayed)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    d = lm[42:48].mean(0) - lm[36:42].mean(0)
    return math.degrees(math.atan2(d[1], d[0]))


def _upright(image: np.ndarray, face: Face, upsample: int, min_score: float) -> Face:
    """``face`` as detected in a window around it turned so its eyes are level; the face itself
    when it is level already (its pixels untouched by resampling) or the windows show none."""
    side = max(face.box[2] - face.box[0], face.box[3] - face.box[1], 1)
    centre = _centre(face)
    scale = min(1.0, SEARCH_FACE_PX / side)
    best, angle = face.score if scale == 1.0 else -np.inf, 0.0
    for a in SEARCH_ANGLES:
        if a == 0.0 and scale == 1.0:
            continue  # that window is the photo itself: the face's own score stands
        found = _near(image, a, centre, side, upsample, scale)
        if found is not None and found.score > best:
            best, angle = found.score, a
    level = face
    for _ in range(LEVEL_ROUNDS):
        found = _near(image, angle, centre, side, upsample, 1.0)
        if found is None:
            break
        level, centre = found, _centre(found)
        roll = eye_roll(found.landmarks)
        if abs(roll - angle) < 1.0:
            break
        angle = roll
    if abs(eye_roll(level.landmarks)) <= LEVEL_ROLL and abs(eye_roll(face.landmarks)) <= LEVEL_ROLL:
        return face
    return level if level.score >= min_score or level is face else face


def _near(image: np.ndarray, angle: float, centre: np.ndarray, side: float, upsample: int,
          scale: float) -> Face | None:  # fmt: skip
    """The best-scoring face within half a face of ``centre`` in a window of three faces'
    width turned so a line at ``angle`` is level (sampled at ``scale``), in photo coordinates."""
    window, back = _turned(image, angle, centre, 1.5 * side, scale)
    found = [_mapped(f, back) for f in _detect(window, upsample, 0.0)]
    found = [f for f in found if np.hypot(*(_centre(f) - centre)) < 0.5 * side]
    return max(found, key=lambda f: f.score, default=None)


def _centre(face: Face) -> np.ndarray:
    left, top, right, bottom = face.box
    return np.array([(left + right) / 2, (top + bottom) / 2])


def _turned(image: np.ndarray, angle: float, centre, half: float | None = None, scale: float = 1.0):
    """The image (or a window of half-side ``half`` around ``centre``) turned about ``centre``
    so that a line at ``angle`` degrees (image coordinates, y down) becomes level, and the map
    from the result's pixel coordinates back to ``image``'s. ``scale`` < 1 samples it coarser."""
    cx, cy = centre
    h, w = image.shape[:2]
    if half is None:  # the whole photo, on a canvas that holds all of it turned
        half = math.hypot(w, h) / 2
    side = max(int(math.ceil(2 * half * scale)), 1)
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    # output point (u, v) -> source (x, y) = centre + R(angle) (u - off, v - off) / scale, R
    # rotating the output's x axis onto the direction at ``angle``
    off = side / 2
    coeffs = (cos, -sin, cx - off * cos + off * sin, sin, cos, cy - off * sin - off * cos)
    turned = Image.fromarray(image).transform((side, side), Image.Transform.AFFINE, coeffs,
                                              resample=Image.Resampling.BILINEAR)  # fmt: skip

    def back(points: np.ndarray) -> np.ndarray:
        u, v = points[:, 0] + 0.5, points[:, 1] + 0.5  # pixel centres: PIL samples at (u + .5, v + .5)
        x = coeffs[0] * u + coeffs[1] * v + coeffs[2]
        y = coeffs[3] * u + coeffs[4] * v + coeffs[5]
        return np.stack([x - 0.5, y - 0.5], axis=1)

    return np.asarray(turned), back


def _mapped(face: Face, back) -> Face:
    """A face found in a turned image, in the original's coordinates (the box keeps its size,
    centred on the mapped centre)."""
    left, top, right, bottom = face.box
    cx, cy = back(np.array([[(left + right) / 2, (top + bottom) / 2]]))[0]
    hw, hh = (right - left) / 2, (bottom - top) / 2
    box = (int(round(cx - hw)), int(round(cy - hh)), int(round(cx + hw)), int(round(cy + hh)))
    return Face(box, face.score, back(face.landmarks))


def _distinct(faces: list[Face]) -> list[Face]:
    """One face per place: of faces whose centres lie within half a face of each other, the
    best scored."""
    kept: list[Face] = []
    for f in sorted(faces, key=lambda f: f.score, reverse=True):
        if all(np.hypot(*(_centre(f) - _centre(k))) > 0.5 * max(f.size, k.size) for k in kept):
            kept.append(f)
    return kept


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ crop quad, (4, 2) corners (top-left, bottom-left, bottom-right, top-right)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {lm.shape}")
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    # Oriented crop: x along the eyes (tilted by the eye-to-mouth direction), y perpendicular.
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def align_face(
    image: Image.Image | np.ndarray, landmarks: np.ndarray, output_size: int
) -> tuple[Image.Image, np.ndarray]:
    """Crops and resamples the FFHQ quad of ``landmarks`` to an ``output_size`` square.

    The quad is sampled bilinearly on a grid at twice the output size and the grid is
    downsampled with a Lanczos-3 filter (FFHQ sampled at four times the output; with two,
    the result differs from FFHQ's by less than JPEG noise). A face no larger than the output
    is sampled bilinearly at the output size, once. Faces far larger than the grid are first
    reduced by an integer factor, and padding replaces what lies outside the photo.

    Args:
        image: RGB image, or an (H, W, 3) uint8 array.
        landmarks: (68, 2) dlib landmarks in ``image`` pixel coordinates.
        output_size: side of the result (1024 for FFHQ; 256 or less for CPU runs).

    Returns:
        (aligned RGB image, the (4, 2) quad in ``image`` coordinates).
    """
    from mambastyle.data import _resample

    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        image = np.asarray(image)
    _check_rgb(image)
    if output_size < 1:
        raise ValueError(f"output_size must be positive, got {output_size}")
    quad = ffhq_quad(landmarks)
    q = quad + 0.5  # corner coordinates: pixel (r, s) covers [s, s + 1) x [r, r + 1)
    qsize = float(np.hypot(*(q[3] - q[0])))  # side length of the quad

    # Crop around the quad with a border; reduce very large faces by an integer factor.
    shrink = max(int(qsize / (_resample.SUPERSAMPLE * output_size)), 1)
    border = max(qsize * 0.1, 3.0 * shrink)
    h, w, _ = image.shape
    x0, y0 = max(int(np.floor(q[:, 0].min() - border)), 0), max(int(np.floor(q[:, 1].min() - border)), 0)
    x1, y1 = min(int(np.ceil(q[:, 0].max() + border)), w), min(int(np.ceil(q[:, 1].max() + border)), h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError("the face's quad lies outside the image")
    q = q - [x0, y0]
    if shrink > 1:
        region = _resample.gather_reduce(image, np.arange(y0, y1), np.arange(x0, x1), shrink)
        q, qsize, border = q / shrink, qsize / shrink, border / shrink
    else:
        region = np.ascontiguousarray(image[y0:y1, x0:x1])

    # Pad by reflection where the quad leaves the photo, blurring and flattening the padding.
    n = _resample.SUPERSAMPLE * output_size
    h, w, _ = region.shape
    outside = np.array([-q[:, 0].min(), -q[:, 1].min(), q[:, 0].max() - w, q[:, 1].max() - h])
    if outside.max() > -4.0:
        pad = np.maximum(np.ceil(outside + border), np.rint(qsize * 0.3)).astype(int)
        reach = _resample.MARGIN * qsize / n + 2.0  # how far the grid's samples reach beyond the quad
        region, q = _padded_window(region, pad, q, qsize, reach)

    # Sample the quad on the 2x grid and filter it down; or, where the face is no larger than
    # the output (nothing finer than an output pixel to filter), sample it once.
    direct = qsize <= output_size
    n = output_size if direct else n
    tl, bl, _, tr = q  # grid corner coordinates (u, v) in [0, n] map to the region
    m = np.array(
        [(tr[0] - tl[0]) / n, (bl[0] - tl[0]) / n, tl[0], (tr[1] - tl[1]) / n, (bl[1] - tl[1]) / n, tl[1]]
    )
    src, (h, w) = _resample.planes(region), region.shape[:2]
    if direct:
        out = _resample.interleave_u8(_resample.warp_bilinear(src, h, w, m, n, n, 0))
    else:
        g = n + 2 * _resample.MARGIN
        grid = _resample.warp_bilinear(src, h, w, m, g, g, _resample.MARGIN)
        out = _resample.decimate2(grid, _resample.lanczos_taps(), output_size)
    return Image.fromarray(out, "RGB"), quad


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Indices into an axis of ``size`` for positions mirrored about its first and last pixels."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    r = np.mod(index, period)
    return np.where(r < size, r, period - r)


def _median_u8(pixels: np.ndarray) -> np.ndarray:
    """Per-channel median of an (..., 3) uint8 array, from its histogram."""
    flat = pixels.reshape(-1, 3)
    count = len(flat)
    out = np.empty(3, np.float32)
    for c in range(3):
        cum = np.cumsum(np.bincount(flat[:, c], minlength=256))
        lo, hi = np.searchsorted(cum, [(count - 1) // 2 + 1, count // 2 + 1])
        out[c] = (lo + hi) / 2.0
    return out


def _padded_window(
    region: np.ndarray, pad: np.ndarray, q: np.ndarray, qsize: float, reach: float
) -> tuple[np.ndarray, np.ndarray]:
    """The part of ``region`` padded by (left, top, right, bottom) ``pad`` that the quad ``q``
    covers (plus ``reach``), and the quad in that window's coordinates.

    As in FFHQ, the padding mirrors the photo and fades, over the padding's width, into a
    blur (sigma 2% of the quad) and then into the median colour. Only the window is built.
    The blur runs at a resolution reduced to a sigma of 2-4 pixels and is scaled back
    bilinearly, and the median is that of the reduced window.
    """
    from mambastyle.data import _resample

    h, w, _ = region.shape
    ph, pw = h + pad[1] + pad[3], w + pad[0] + pad[2]
    qp = q + pad[:2]
    x0, x1 = max(int(np.floor(qp[:, 0].min() - reach)), 0), min(int(np.ceil(qp[:, 0].max() + reach)), pw)
    y0, y1 = max(int(np.floor(qp[:, 1].min() - reach)), 0), min(int(np.ceil(qp[:, 1].max() + reach)), ph)
    sigma = qsize * 0.02
    scale = max(int(sigma / 2.0), 1)
    extra = int(np.ceil(4.0 * sigma)) + scale  # the blur's reach
    bx0, bx1 = max(x0 - extra, 0), min(x1 + extra, pw)
    by0, by1 = max(y0 - extra, 0), min(y1 + extra, ph)
    rows = _reflect(np.arange(by0, by1) - pad[1], h)
    cols = _reflect(np.arange(bx0, bx1) - pad[0], w)
    small = _resample.gather_reduce(region, rows, cols, scale)
    blurred = ndimage.gaussian_filter(small.astype(np.float32), [sigma / scale, sigma / scale, 0])
    stride = max(int(np.sqrt(ph * pw / 65536)), 1)  # the median of about 64k pixels of the whole padded image
    every = region[
        _reflect(np.arange(0, ph, stride) - pad[1], h)[:, None],
        _reflect(np.arange(0, pw, stride) - pad[0], w),
    ]
    window = _resample.fill_padding(
        region, rows[y0 - by0 : y1 - by0], cols[x0 - bx0 : x1 - bx0], blurred, scale, y0 - by0, x0 - bx0,
        y0, x0, pad.astype(np.float64), ph, pw, _median_u8(every),
    )  # fmt: skip
    return window, qp - [x0, y0]


def quad_transform(quad: np.ndarray, output_size: int):
    """Maps image coordinates to aligned-output coordinates for ``quad`` (an affine map).

    The quad is a rotated, scaled square, so three corners determine the map exactly.
    Returns a function (n, 2) -> (n, 2).
    """
    src = np.asarray(quad, dtype=np.float64)[[0, 1, 3]]  # top-left, bottom-left, top-right
    dst = np.array([[0.0, 0.0], [0.0, output_size], [output_size, 0.0]])
    m = np.linalg.solve(np.c_[src, np.ones(3)], dst)  # (3, 2): [x y 1] @ m
    return lambda pts: np.c_[np.asarray(pts, dtype=np.float64), np.ones(len(pts))] @ m


def estimate_pose(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from 2-D landmarks, by a weak-perspective fit of a generic 3-D face.

    Positive yaw: the face turns towards the image's right; positive pitch: the face tilts
    up; positive roll: the head tilts counter-clockwise as displayed. Rough (a few degrees
    on real photos): meant for filtering and queries, not measurement.
    """
    pts = np.asarray(landmarks, dtype=np.float64)[list(_POSE_LANDMARKS)]
    pts = pts * [1.0, -1.0]  # image y points down; the model's y points up
    pts = pts - pts.mean(0)
    m = _POSE_SOLVE @ pts  # (3, 2): the least-squares fit pts ~ model @ m
    r1, r2 = m[:, 0] / np.linalg.norm(m[:, 0]), m[:, 1] / np.linalg.norm(m[:, 1])
    # Orthonormalise the two rows symmetrically, then complete the rotation.
    c = (r1 + r2) / np.linalg.norm(r1 + r2)
    d = (r1 - r2) / np.linalg.norm(r1 - r2)
    r1, r2 = (c + d) / math.sqrt(2), (c - d) / math.sqrt(2)
    rot = np.stack([r1, r2, np.cross(r1, r2)])  # rows: image x, image y (up), depth
    yaw = math.degrees(math.asin(float(np.clip(rot[0, 2], -1.0, 1.0))))
    pitch = math.degrees(math.atan2(float(rot[1, 2]), float(rot[2, 2])))
    roll = math.degrees(math.atan2(-float(rot[0, 1]), float(rot[0, 0])))
    return yaw, pitch, roll
