"""ArcFace IR-SE50: the face-recognition network behind the identity loss.

The module layout (``input_layer``, ``body.N.{shortcut_layer,res_layer}``, ``output_layer``)
matches the widely used InsightFace/TreB1eN ``model_ir_se50.pth`` state dict that pSp, e4e
and MambaStyle load, so that file loads with ``strict=True``. The network is only built
here; its weights come from a file (see :mod:`mambastyle.pretrained`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambastyle.models.encoders import irse_body, irse_stem

EMBEDDING_DIM = 512
INPUT_SIZE = 112


class ArcFaceIRSE(nn.Module):
    """(B, 3, 112, 112) faces in [-1, 1] -> (B, 512) unit-norm identity embeddings."""

    def __init__(self, units: tuple[int, ...] = (3, 4, 14, 3), drop_ratio: float = 0.6):
        super().__init__()
        self.input_layer = irse_stem(3, 64)
        self.body, _ = irse_body((64, 128, 256, 512), units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(512 * 7 * 7, EMBEDDING_DIM),
            nn.BatchNorm1d(EMBEDDING_DIM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"ArcFace expects {INPUT_SIZE}x{INPUT_SIZE} faces, got {tuple(x.shape)}")
        x = self.body(self.input_layer(x))  # (B, 512, 7, 7)
        return F.normalize(self.output_layer(x), dim=1)
