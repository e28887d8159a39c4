"""The README's pictures: the pipeline diagram, and the demo's reconstructions and edit grid.

.venv/bin/python docs/figures.py      # after `make demo`; writes docs/pipeline.png, docs/demo.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402
from PIL import Image  # noqa: E402

DOCS = Path(__file__).resolve().parent
W, H = 1.9, 0.62  # box size in axis units

STAGE = {"facecolor": "#dbe9f7", "edgecolor": "#3b6ea5", "boxstyle": "round,pad=0.02,rounding_size=0.12"}
DATA = {"facecolor": "#ffffff", "edgecolor": "#777777", "boxstyle": "square,pad=0.02"}


def _box(ax, x, y, title, sub, stage):
    ax.add_patch(FancyBboxPatch((x - W / 2, y - H / 2), W, H, linewidth=1.4, **(STAGE if stage else DATA)))
    ax.text(
        x,
        y + 0.1,
        title,
        ha="center",
        va="center",
        fontsize=11,
        weight="bold",
        color="#1d3c5e" if stage else "#333333",
    )
    ax.text(x, y - 0.15, sub, ha="center", va="center", fontsize=8, color="#555555")


def _arrow(ax, points, dashed=False):
    xs, ys = zip(*points, strict=True)
    ax.plot(xs[:-1] + (xs[-1],), ys[:-1] + (ys[-1],), alpha=0)  # keep the path in the data limits
    for (x0, y0), (x1, y1) in zip(points[:-2], points[1:-1], strict=True):
        ax.plot([x0, x1], [y0, y1], color="#444444", lw=1.3, ls="--" if dashed else "-")
    ax.annotate(
        "",
        xy=points[-1],
        xytext=points[-2],
        arrowprops={"arrowstyle": "-|>", "color": "#444444", "lw": 1.3, "ls": "--" if dashed else "-"},
    )


def pipeline(out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(11, 4.4), dpi=110)
    xs = [1.2 + 2.3 * i for i in range(5)]
    y1, y2, y3 = 3.0, 1.6, 0.2
    row1 = [("photos", "folder, S3 or FFHQ json", False), ("prepare", "dlib alignment", True),
            ("shards", "WebDataset tars, manifest", False), ("train", "Ray Train, DDP", True),
            ("encoder.pt", "MambaStyle, VSS blocks", False)]  # fmt: skip
    # the second row runs right to left, under the first
    row2 = [("edit", "SQL selection, directions", True), ("latent table", "Parquet W+ per split", False),
            ("invert", "Ray Data actor pool", True), ("fuser.pt", "encoder + F-space fuser", False),
            ("fuser", "Ray Train, edit pairs", True)]  # fmt: skip
    for row, y in ((row1, y1), (row2, y2)):
        for x, (t, sub, stage) in zip(xs, row, strict=True):
            _box(ax, x, y, t, sub, stage)
    for i in range(4):
        _arrow(ax, [(xs[i] + W / 2, y1), (xs[i + 1] - W / 2, y1)])
        _arrow(ax, [(xs[i + 1] - W / 2, y2), (xs[i] + W / 2, y2)])
    _arrow(ax, [(xs[4], y1 - H / 2), (xs[4], y2 + H / 2)])
    _arrow(ax, [(xs[2], y1 - H / 2), (xs[2], y2 + H / 2)], dashed=True)  # invert reads the shards
    _box(ax, xs[0], y3, "edited images", "tars + edits table", False)
    _box(ax, xs[1], y3, "evaluate", "MSE, SSIM, LPIPS, identity", True)
    _box(ax, xs[2], y3, "metrics, grids", "dvc metrics / plots", False)
    _arrow(ax, [(xs[0], y2 - H / 2), (xs[0], y3 + H / 2)])
    _arrow(ax, [(xs[1], y2 - H / 2), (xs[1], y3 + H / 2)])
    _arrow(ax, [(xs[1] + W / 2, y3), (xs[2] - W / 2, y3)])
    ax.text(
        xs[4],
        y3 + 0.12,
        "generator.pt (StyleGAN2, frozen): used by\ntrain, fuser, invert, evaluate, edit",
        ha="center",
        va="center",
        fontsize=8.5,
        color="#333333",
    )
    ax.text(
        xs[4],
        y3 - 0.3,
        "stages: dvc repro; data: a folder or s3://bucket/prefix",
        ha="center",
        va="center",
        fontsize=8.5,
        color="#333333",
    )
    ax.set_xlim(0, xs[-1] + 1.2)
    ax.set_ylim(-0.3, 3.5)
    ax.axis("off")
    fig.tight_layout(pad=0.2)
    fig.savefig(out)
    plt.close(fig)
    return out


def demo(records: Path, out: Path) -> Path:
    """The demo's reconstruction strip above its first edit grid, from a finished `make demo`."""
    recon = Image.open(records / "evaluate" / "reconstructions.png").convert("RGB")
    grids = sorted((records / "edit" / "grids").glob("*.png"))
    if not grids:
        raise SystemExit(f"no edit grids under {records}/edit/grids: run `make demo` first")
    grid = Image.open(grids[0]).convert("RGB")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), dpi=110, gridspec_kw={"width_ratios": [1.6, 1]})
    axes[0].imshow(recon)
    axes[0].set_title("evaluate: each test face, its W+ reconstruction, then with the fuser", fontsize=10)
    axes[1].imshow(grid)
    axes[1].set_title(f"edit '{grids[0].stem}': strengths left to right, 0 in the middle", fontsize=10)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    fig.savefig(out)
    plt.close(fig)
    return out


if __name__ == "__main__":
    records = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data")
    print(pipeline(DOCS / "pipeline.png"))
    print(demo(records, DOCS / "demo.png"))
