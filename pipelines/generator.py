"""DVC stage `generator`: materialise the configured StyleGAN2 generator.

Reads the `generator` section of params.yaml and writes, under data/generator/:
- generator.pt: canonical checkpoint (rosinality `g_ema` layout + `latent_avg` + `config`),
  from the configured checkpoint or a random init (the CPU demo); later stages load it;
- info.json: architecture, parameter count, source and sha256 of the input checkpoint;
- samples.png: a grid of samples (a DVC plot).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from mambastyle.checkpoints import file_sha256, save_generator
from mambastyle.config import Params, to_dict
from mambastyle.errors import CheckpointError
from mambastyle.generate import render_samples, resolve_generator, sample_grid
from mambastyle.stage import stage_main
from mambastyle.visual import save_png

log = logging.getLogger("pipelines.generator")


def run(params: Params, out_dir: Path, metrics: Path) -> dict:
    """Builds or loads the generator, writes the stage's outputs, returns the info record.

    It has no headline metrics: nothing about a generator is compared between experiments."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    gp = params.generator
    g = resolve_generator(gp.checkpoint, gp.architecture, gp.init_seed, gp.latent_avg_samples)
    ckpt_path = out_dir / "generator.pt"
    save_generator(g, ckpt_path)
    sp = gp.sample
    images = render_samples(g, seed=sp.seed, num=sp.num, truncation=sp.truncation, noise_mode=sp.noise_mode)
    save_png(sample_grid(images), out_dir / "samples.png")
    info = {
        "source": gp.checkpoint or f"random-init(seed={gp.init_seed})",
        "source_sha256": file_sha256(gp.checkpoint) if gp.checkpoint else None,
        "sha256": file_sha256(ckpt_path),
        "config": g.config.to_dict(),
        "n_styles": g.n_styles,
        "parameters": sum(p.numel() for p in g.parameters()),
        "latent_avg": g.latent_avg_source,
        "sample": to_dict(sp),
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "generator %s px (%d styles) -> %s in %.1fs",
        g.resolution,
        g.n_styles,
        out_dir,
        time.perf_counter() - t0,
    )
    return info


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__, "data/generator", run, (CheckpointError,), log)


if __name__ == "__main__":
    sys.exit(main())
