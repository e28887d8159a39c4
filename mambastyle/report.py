"""Where a pipeline run's results are: one summary of the stages' records (``mambastyle report``).

Each DVC stage writes small local records under ``{records}/{stage}/`` (``data/`` by default)
while the data itself lives under ``storage.root`` (local or S3). The report reads only those
records, never the data, so it is instant and works the same for a local and an S3 run. A stage
without records is listed as not run; the report never guesses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pictures(*paths: Path) -> str:
    return ", ".join(str(p) for p in paths if p.is_file()) or "none"


def _generator(rec: Path, gen: dict, storage_root: str) -> list[str]:
    cfg = gen.get("config", {})
    return [
        f"generator   {rec / 'generator' / 'generator.pt'}: {cfg.get('resolution')} px, "
        f"{gen.get('n_styles')} styles x {cfg.get('style_dim')}, source {gen.get('source')}",
        f"            samples: {_pictures(rec / 'generator' / 'samples.png')}",
    ]


def _prepare(rec: Path, prep: dict, storage_root: str) -> list[str]:
    counts = prep.get("counts", {})
    splits = ", ".join(f"{k} {v.get('samples')}" for k, v in sorted(prep.get("splits", {}).items()))
    return [
        f"prepare     shards: {storage_root.rstrip('/')}/shards/ ({splits})",
        f"            {counts.get('inputs')} inputs = {counts.get('written')} faces written + "
        f"{counts.get('quarantined')} quarantined (reasons: {rec / 'prepare' / 'quarantine.jsonl'})",
    ]


def _figures(final: dict, keys: tuple[str, ...]) -> str:
    figures = ", ".join(f"{k.split('/')[-1]} {_fmt(final[k])}" for k in keys if k in final)
    return ", " + figures if figures else ""


def _train(rec: Path, enc: dict, storage_root: str) -> list[str]:
    figures = _figures(enc.get("final_metrics", {}), ("eval/latent_rel", "eval/real_mse"))
    return [
        f"train       encoder: {enc.get('uri')} ({enc.get('encoder', {}).get('arch')}, step "
        f"{enc.get('step')}{figures})",
        "            curves: metrics/train/ (dvc plots show)",
    ]


def _fuser(rec: Path, fus: dict, storage_root: str) -> list[str]:
    if not fus.get("enabled"):
        return ["fuser       off (fuser.enabled: false)"]
    figures = _figures(fus.get("final_metrics", {}), ("eval/real_mse_wplus", "eval/real_mse_fuser"))
    cfg = fus.get("fuser", {})
    return [
        f"fuser       checkpoint: {fus.get('uri')} ({cfg.get('dim')} channels at "
        f"{cfg.get('inject_res')} px, step {fus.get('step')}{figures})"
    ]


def _invert(rec: Path, inv: dict, storage_root: str) -> list[str]:
    splits = ", ".join(f"{k} {v}" for k, v in sorted(inv.get("splits", {}).items()))
    return [
        f"invert      latent table: {inv.get('table')} ({inv.get('rows')} rows: {splits})",
        f"            query: mambastyle latents query {inv.get('table')} "
        '"SELECT key, split, yaw, mse FROM latents ORDER BY mse"',
    ]


def _evaluate(rec: Path, ev: dict, storage_root: str) -> list[str]:
    figures = ", ".join(f"{k} {_fmt(v)}" for k, v in ev.get("reconstruction", {}).items())
    rel = ev.get("latent_recovery", {}).get("latent_rel")
    lat = _read(rec / "evaluate" / "latency.json") or {}
    lines = [
        f"evaluate    {rec / 'evaluate' / 'metrics.json'}: {ev.get('split')} split, {ev.get('images')} "
        f"images: {figures}; latent_rel {_fmt(rel)}"
        + (f"; {_fmt(lat['ms_per_image'])} ms/image" if "ms_per_image" in lat else ""),
    ]
    if ev.get("reconstruction_fuser"):
        fused = ", ".join(f"{k} {_fmt(v)}" for k, v in ev["reconstruction_fuser"].items())
        lines.append(f"            with the fuser: {fused}")
    if ev.get("not_measured"):
        lines.append(f"            not measured: {', '.join(sorted(ev['not_measured']))} (see metrics.json)")
    lines.append(f"            reconstructions: {_pictures(rec / 'evaluate' / 'reconstructions.png')}")
    side = _read(rec / "evaluate" / "comparison.json") or {}
    if side.get("encoders"):
        names = ", ".join(side["encoders"])
        lines.append(f"            encoders side by side ({names}): {rec / 'evaluate' / 'comparison.md'}")
    return lines


def _edit(rec: Path, ed: dict, storage_root: str) -> list[str]:
    grids = sorted((rec / "edit" / "grids").glob("*.png"))
    return [
        f"edit        edits table + images: {ed.get('table')} ({ed.get('rows')} rows, "
        f"{ed.get('images')} images, edits: {', '.join(sorted(ed.get('edits', {})))})",
        f"            grids: {_pictures(*grids)}",
    ]


def _stats(s: dict) -> str:
    """One line of a run's statistics (``mambastyle.runstats``)."""
    reasons = s.get("quarantine_reasons") or {}
    quarantined = f", quarantined {s.get('quarantined')}" if reasons else ""
    rate = f", {_fmt(s['items_per_s'])}/s" if s.get("items_per_s") else ""
    return (f"            run: {s.get('inputs')} inputs = computed {s.get('computed')} + reused "
            f"{s.get('reused')}; written {s.get('written')}{quarantined}; "
            f"{_fmt(s.get('seconds_total'))} s{rate}")  # fmt: skip


# stage -> (its record, the lines it contributes); in pipeline order
SECTIONS = {
    "generator": ("info.json", _generator),
    "prepare": ("manifest.json", _prepare),
    "train": ("encoder.json", _train),
    "fuser": ("fuser.json", _fuser),
    "invert": ("manifest.json", _invert),
    "evaluate": ("metrics.json", _evaluate),
    "edit": ("metrics.json", _edit),
}


def pipeline_report(records: str | Path = "data", storage_root: str = "data") -> list[str]:
    """Lines naming each stage's outputs and headline figures, from the records under ``records``."""
    rec = Path(records)
    lines: list[str] = []
    missing: list[str] = []
    for stage, (record, describe) in SECTIONS.items():
        data = _read(rec / stage / record)
        if data is None:
            missing.append(stage)
        else:
            lines += describe(rec, data, storage_root)
            if stats := _read(rec / stage / "stats.json"):
                lines.append(_stats(stats))
    if missing:
        lines.append(f"not run yet: {', '.join(missing)} (no records under {rec}/; run `dvc repro`)")
    lines.append("all metrics: dvc metrics show; all pictures: dvc plots show "
                 "(in a shell where `. .venv/bin/activate` ran)")  # fmt: skip
    return lines
