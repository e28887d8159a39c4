"""Ray Data bulk inversion: prepare-stage shards -> a committed Parquet latent table.

``read_webdataset`` over the shards the manifest lists -> an actor pool (encoder and, for
metrics, generator loaded once per actor; GPUs when asked) running
:func:`mambastyle.models.inversion.invert_batch` -> a datasink whose write tasks each write one
Parquet part per split (at least ``rows_per_file`` rows, explicit row groups) -> on the
driver, a completeness check (every sample of the manifest exactly once) and the table's
``_manifest.json``, written last. The table's prefix is ``{root}/latents/{run}`` with
``run`` derived from the inputs (shard manifest, encoder, generator, settings, inversion code).

Runs resume and grow incrementally (see :mod:`mambastyle.invert.resume`): a re-run withdraws
the manifest, keeps the parts a killed run left, takes the rows of unchanged shards from an
earlier table made the same way, and computes only the rest.

Its length is the stage in one place: the job, the actor, the part writer, the Ray Data wiring
(with why each setting is what it is), the completeness check and the stage's input checks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import posixpath
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from mambastyle.invert import resume
from mambastyle.latents import (
    MANIFEST,
    build_part,
    commit,
    part_metadata,
    remove_unlisted,
    schema,
    write_part,
)
from mambastyle.locks import writer_lock
from mambastyle.runstats import TABLE_STATS_NAME, RunStats
from mambastyle.runtime import TorchThread, actor_device, collecting_datasink, root_cause, worker_options
from mambastyle.storage import Location, StorageOptions, delete, read_bytes, resolve, write_bytes

log = logging.getLogger(__name__)


CALL_BATCHES = 16  # model batches per actor call


class InvertError(RuntimeError):
    """The inversion cannot run or its result is incomplete (the message names the cause)."""


@dataclass(frozen=True)
class InvertJob:
    """Everything the actors and the sink need (plain and picklable)."""

    root: str  # storage root holding shards/
    encoder: str  # encoder checkpoint URI
    out: str  # the table's prefix
    options: StorageOptions
    generator: object  # GeneratorParams (for reconstructions), or None for codes only
    batch_size: int
    num_actors: int
    use_gpu: bool
    row_group_size: int
    rows_per_file: int
    metadata: dict
    lpips_alexnet: str | None = None  # LPIPS backbone file (checked to exist by the caller)
    cpus_per_actor: int = 1  # CPU slots (and torch threads) per actor when not on a GPU
    fuser: str | None = None  # a fuser checkpoint: its encoder makes the codes, its fuser the *_fuser metrics
    shards: dict = field(default_factory=dict)  # shard file name -> its shard manifest entry
    skip: dict = field(default_factory=dict)  # shard file name -> keys a killed run already wrote
    precision: str = "fp32"  # fp32 | bf16 (autocast; see models.inversion.inference_precision)


@functools.cache
def compute_hash() -> str:
    """Hash of the code that turns a face into its row (the inversion and the models it runs),
    so rows from other code are never reused."""
    from mambastyle import __version__
    from mambastyle.codegraph import source_hash

    return source_hash("mambastyle.models.inversion", salt=__version__)


def run_id(manifest: bytes, encoder_sha256: str, generator_sha256: str, settings: dict) -> str:
    h = hashlib.sha256(manifest)
    h.update(f"{encoder_sha256}/{generator_sha256}/{json.dumps(settings, sort_keys=True)}".encode())
    return f"run-{h.hexdigest()[:16]}"


class Inverter:
    """Ray Data actor: loads the models once, turns decoded samples into latent-table rows."""

    def __init__(self, job: InvertJob):
        self.thread = TorchThread()
        self.thread.run(self._load, job)

    def __call__(self, batch: dict) -> pa.Table:
        return self.thread.run(self._invert, batch)

    def _load(self, job: InvertJob) -> None:
        from mambastyle.checkpoints import checkpoint_source, load_encoder
        from mambastyle.generate import resolve_generator
        from mambastyle.layers.ss2d import describe_scan

        self.job = job
        self.device = actor_device(job.use_gpu, job.cpus_per_actor)
        self.fuser = None
        if job.fuser is not None:
            from mambastyle.checkpoints import load_fuser

            src = checkpoint_source(job.fuser, job.options)
            self.encoder, self.fuser, _ = load_fuser(src, device=self.device)
        else:
            self.encoder, _ = load_encoder(checkpoint_source(job.encoder, job.options), device=self.device)
        log.info("invert actor: %s, %s", describe_scan(self.encoder, self.device), job.precision)
        from mambastyle.models.inversion import warn_if_emulated

        warn_if_emulated("invert.precision", job.precision, self.device)
        self.generator = None
        if job.generator is not None:
            gp = job.generator
            self.generator = resolve_generator(
                gp.checkpoint, gp.architecture, gp.init_seed, gp.latent_avg_samples, self.device, job.options
            )
        self.lpips = None
        if job.lpips_alexnet is not None and self.generator is not None:
            from mambastyle.pretrained import build_lpips

            self.lpips = build_lpips(job.lpips_alexnet, job.options).to(self.device)
        n_styles, style_dim = self.encoder.n_styles, self.encoder.config.style_dim
        self.schema = schema(n_styles, style_dim, job.metadata)

    def _invert(self, batch: dict) -> pa.Table:
        import torch

        from mambastyle.models.inversion import invert_batch

        keys, urls = [str(k) for k in batch["__key__"]], [str(u) for u in batch["__url__"]]
        if self.job.skip:  # rows a killed run already wrote are not computed again
            skip = self.job.skip
            done = [k in skip.get(posixpath.basename(u), ()) for k, u in zip(keys, urls, strict=True)]
            if any(done):
                keep = np.flatnonzero(~np.asarray(done))
                batch = {name: (np.asarray(col, dtype=object) if isinstance(col, list) else col)[keep]
                         for name, col in batch.items()}  # fmt: skip
                keys, urls = [keys[i] for i in keep], [urls[i] for i in keep]
                if not keys:
                    return self.schema.empty_table().append_column("split", pa.array([], pa.string()))
        if batch["png"].dtype == object:  # undecoded (CPU actors decode their own, see run_inversion)
            from mambastyle.data.shards import decode_png

            where = [f"{u}#{k}.png" for u, k in zip(urls, keys, strict=True)]
            images = torch.stack([decode_png(png, w) for png, w in zip(batch["png"], where, strict=True)])
            meta = [json.loads(m) for m in batch["json"]]
        else:
            images = torch.from_numpy(np.ascontiguousarray(batch["png"]))
            meta = list(batch["json"])
        out = invert_batch(self.encoder, images, self.generator, self.lpips, self.job.batch_size, self.fuser,
                           self.job.precision)  # fmt: skip
        rows = {
            "key": keys,
            "shard": [u.rsplit("/", 1)[-1] for u in urls],
            "w_plus": out.w_plus,
            "mse": out.mse,
            "ssim": out.ssim,
            "lpips": out.lpips,
            "mse_fuser": out.mse_fuser,
            "ssim_fuser": out.ssim_fuser,
            "lpips_fuser": out.lpips_fuser,
            **{name: [m.get(name) for m in meta] for name in ("yaw", "pitch", "roll", "source")},
            "score": [m.get("detector_score") for m in meta],
        }
        table = build_part(rows, self.schema)
        return table.append_column("split", pa.array([str(m.get("split")) for m in meta], pa.string()))


def write_parts(tables: Iterable[pa.Table], job: InvertJob, task: int) -> list[dict]:
    """One write task: its rows as one Parquet part per shard (see :mod:`resume`); returns the
    parts' manifest entries, each with its keys."""
    tables = list(tables)
    if not tables:
        return []
    table = pa.concat_tables(tables)
    prefix = resolve(job.out, job.options)
    written = []
    names = table.column("shard").to_pylist()
    for name in sorted(set(names)):
        shard = job.shards[name]
        part = table.filter(pa.array([n == name for n in names])).drop_columns(["split"])
        path = resume.part_path(shard["split"], shard["path"])
        write_part(part, prefix.join(path), job.row_group_size)
        written.append(resume.part_entry(path, shard, part.num_rows, keys=part.column("key").to_pylist()))
    return written


def run_inversion(job: InvertJob, shards: list[dict], stats: RunStats | None = None) -> dict:
    """Computes what is missing of the table for ``shards`` (the shard manifest's entries) on the
    connected Ray and commits it; returns its manifest. Staged and reusable rows are found
    first (:func:`resume.plan`); ``stats`` (when given) gets the computed and reused counts."""
    prefix = resolve(job.out, job.options)
    delete(prefix.join(MANIFEST))  # readers trust only a manifest: none while parts change
    if not shards:
        raise InvertError("the shard manifest lists no shards")
    try:
        work = resume.plan(prefix, shards, job.metadata, job.row_group_size)
    except ValueError as exc:
        raise InvertError(str(exc)) from None
    if work.staged or work.reused:
        log.info("%d rows written by an interrupted run, %d reused from earlier tables, %d shards to read",
                 work.staged_rows, work.reused_rows, len(work.todo))  # fmt: skip
    computed = _infer(dataclasses.replace(job, shards={posixpath.basename(s["path"]): s for s in shards},
                                          skip=work.skip), work.todo) if work.todo else []  # fmt: skip
    parts = work.staged + work.reused + [{k: v for k, v in p.items() if k != "keys"} for p in computed]
    keys = [k for p in computed for k in p["keys"]]
    _check_complete(shards, parts, len(keys) + len(work.keys), len(set(keys) | work.keys))
    if stats is not None:
        stats.computed, stats.reused = len(keys), work.staged_rows + work.reused_rows
    sources: dict[str, int] = {}
    for p in work.reused:
        sources[p["reused_from"]] = sources.get(p["reused_from"], 0) + p["rows"]
    extra = {"reused": {"rows": work.reused_rows, "from": sources}, "resumed": work.staged_rows,
             "computed": len(keys)}  # fmt: skip
    manifest = commit(prefix, parts, part_metadata(prefix, parts), extra)
    remove_unlisted(prefix, [p["path"] for p in parts])
    return manifest


def _infer(job: InvertJob, todo: list[dict]) -> list[dict]:
    """The Ray Data job over the shards in ``todo``: the written parts' entries, with keys."""
    import ray

    shard_uris = [resolve(job.root, job.options).join("shards", s["path"]).uri for s in todo]
    fs = resolve(shard_uris[0], job.options).fs
    paths = [resolve(u, job.options).path for u in shard_uris]
    # Reading asks for no CPU of its own: with as many actors as CPUs (the usual CPU setup)
    # a read task that waits for a free CPU would never run and the pipeline would stall.
    # One read task per shard (as long as there are at least as many shards as actors), whose
    # blocks are runs of up to 512 samples (Ray's webdataset chunk). Left to itself, Ray splits
    # each shard's output into blocks of a few rows for parallelism; the calls below then get
    # bundles of such blocks that overshoot CALL_BATCHES batches by a few rows, and each
    # overshoot costs a whole padded model batch. On CPUs, reading is many times cheaper than
    # inference, so one read task per actor at a time keeps the actors fed; more start extra
    # worker processes (each importing Ray Data) that slow the actors' start-up on the same
    # cores. GPU actors can outpace one reader each: no limit there.
    # CPU actors get the samples' bytes and decode PNG and JSON themselves, in the CPU slots
    # they hold (read tasks hold none, and would compete with them), and the pixels skip a
    # round trip through Arrow tensor blocks. GPU actors get samples decoded in parallel.
    ds = ray.data.read_webdataset(paths, filesystem=fs, num_cpus=0, decoder=True if job.use_gpu else None,
                                  override_num_blocks=max(len(paths), job.num_actors),
                                  concurrency=None if job.use_gpu else job.num_actors)  # fmt: skip
    ds = ds.map_batches(
        Inverter,
        fn_constructor_kwargs={"job": job},
        # Each call gets CALL_BATCHES model batches' worth of rows and runs the models on batches
        # of exactly batch_size (the last padded, see invert_batch's pad_to). A call ends wherever
        # its bundle of read blocks ends: with one model batch per call, many calls would be a
        # full batch plus a padded sliver.
        batch_size=job.batch_size * CALL_BATCHES,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=job.num_actors),
        num_gpus=1 if job.use_gpu else 0,
        num_cpus=1 if job.use_gpu else job.cpus_per_actor,
        **worker_options(),
    )
    sink = collecting_datasink(job.rows_per_file, lambda tables, task: write_parts(tables, job, task))
    try:
        # Writing asks for no CPU slot either: with the actors holding every CPU, a write task
        # would otherwise wait for the last actor to shut down before writing anything.
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})
    except Exception as exc:  # Ray wraps task errors: find out which shard, if any, is bad
        sizes = {u: int(s["bytes"]) for u, s in zip(shard_uris, todo, strict=True) if "bytes" in s}
        bad = _damaged_shards(shard_uris, sizes, job.options)
        where = f" (damaged shard: {', '.join(bad)})" if bad else ""
        raise InvertError(f"inversion failed{where}: {root_cause(exc)}") from exc
    return sink.results


def _check_complete(shards: list[dict], parts: list[dict], n_keys: int, n_distinct: int) -> None:
    """Every shard's rows are all there, once (the parts written now and found earlier)."""
    rows: dict[str, int] = {}
    for p in parts:
        rows[p["shard"]] = rows.get(p["shard"], 0) + p["rows"]
    short = [s["path"] for s in shards if rows.get(s["path"], 0) != int(s["samples"])]
    expected = sum(int(s["samples"]) for s in shards)
    if short or n_keys != n_distinct or sum(rows.values()) != expected:
        raise InvertError(
            f"incomplete table: {sum(rows.values())} rows ({n_keys - n_distinct} repeated keys) for the "
            f"{expected} samples the shard manifest lists"
            + (f"; shards not matched: {', '.join(short[:5])}" if short else "")
            + "; nothing committed"
        )


def default_actors(use_gpu: bool) -> int:
    """Actors when ``invert.num_actors`` is null: one per GPU of the connected Ray, or on CPUs
    one per CPU, each with one thread. Separate single-threaded actors outrun one actor with
    a thread per CPU: a multi-threaded forward waits at every parallel region for its slowest
    thread, and Ray's own processes keep interrupting one (benchmarks/invert.py compares)."""
    import ray

    return max(1, int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1)))


def _damaged_shards(uris: list[str], sizes: dict[str, int], options: StorageOptions) -> list[str]:
    """Shards that are missing or whose size differs from the manifest (checked after a failure)."""
    import pyarrow.fs as pafs

    bad = []
    for uri in uris:
        loc = resolve(uri, options)
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound or (uri in sizes and info.size != sizes[uri]):
            bad.append(uri)
    return bad


def read_manifest(root: Location) -> tuple[bytes, dict]:
    loc = root.join("shards", "manifest.json")
    try:
        data = read_bytes(loc)
    except FileNotFoundError:
        raise InvertError(f"no shard manifest at {loc.uri}: run the prepare stage first") from None
    try:
        manifest = json.loads(data)
        samples = sum(int(e["samples"]) for e in manifest["shards"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvertError(f"{loc.uri} is not a shard manifest ({type(exc).__name__}: {exc})") from None
    if samples == 0:  # found before any model is loaded or Ray started
        counts = manifest.get("counts", {})
        raise InvertError(
            f"{loc.uri} lists no faces ({counts.get('inputs', '?')} inputs, {counts.get('quarantined', '?')} "
            "quarantined: see quarantine.jsonl beside it): nothing to invert"
        )
    return data, manifest


def invert_from_params(params, ray_connect: bool = True) -> tuple[dict, Location]:
    """The invert stage from validated params: finds the encoder, checks it against the
    configured generator, runs the pipeline and commits ``{root}/latents/{run}``.

    Returns (the table's manifest, its prefix).
    """
    from mambastyle.checkpoints import check_encoder_generator, state_sha256
    from mambastyle.errors import CheckpointError
    from mambastyle.generate import resolve_generator
    from mambastyle.models.inversion import precision_tag

    stats, t0 = RunStats("invert"), time.perf_counter()
    options = params.storage.options()
    root = resolve(params.storage.root, options)
    manifest_bytes, manifest = read_manifest(root)
    ip = params.invert
    encoder_loc, encoder_name, fuser_loc, encoder_sha, meta = _checked_encoder(params, manifest_bytes)
    gp = params.generator
    g = resolve_generator(
        gp.checkpoint, gp.architecture, gp.init_seed, gp.latent_avg_samples, options=options
    )
    generator_name = gp.checkpoint or f"random init (seed {gp.init_seed})"
    try:
        check_encoder_generator(meta, g, encoder_loc.uri, generator_name)
    except CheckpointError as exc:
        raise InvertError(str(exc)) from None
    generator_sha = state_sha256(g)
    lpips = _lpips_weights(ip, options)
    settings = {"metrics": ip.metrics, "lpips": lpips is not None, "generator": gp.identity(),
                "fuser": fuser_loc is not None, "code": compute_hash(),
                **precision_tag(ip.precision)}  # fmt: skip
    run = run_id(manifest_bytes, encoder_sha, generator_sha, settings)
    out = root.join("latents", run)
    metadata = _metadata(ip, lpips, fuser_loc, encoder_sha, encoder_name, generator_sha, manifest_bytes, run)
    metadata.update(precision_tag(ip.precision))
    # what makes a row from a face; equal for two tables -> rows of one shard are interchangeable
    metadata["compute_sha256"] = hashlib.sha256(
        f"{encoder_sha}/{generator_sha}/{json.dumps(settings, sort_keys=True)}".encode()
    ).hexdigest()
    if ray_connect:
        from mambastyle.runtime import connect_ray

        connect_ray(params.ray.address, params.ray.num_cpus, params.ray.num_gpus)
    job = InvertJob(
        root=root.uri, encoder=encoder_loc.uri, out=out.uri, options=options,
        generator=gp if ip.metrics else None, batch_size=ip.batch_size,
        num_actors=ip.num_actors or default_actors(ip.use_gpu),
        use_gpu=ip.use_gpu, row_group_size=ip.row_group_size, rows_per_file=ip.rows_per_file,
        metadata=metadata,
        lpips_alexnet=lpips,
        fuser=None if fuser_loc is None else fuser_loc.uri, precision=ip.precision,
    )  # fmt: skip
    stats.seconds["load"] = time.perf_counter() - t0
    with writer_lock(params.storage.root, options, f"invert {run}"), stats.phase("infer_and_commit"):
        table_manifest = run_inversion(job, manifest["shards"], stats)
    stats.inputs = sum(int(e["samples"]) for e in manifest["shards"])  # what the listed shards hold
    stats.written = table_manifest["rows"]
    write_bytes(out.join(TABLE_STATS_NAME), stats.to_json(), durable=False)
    return table_manifest, out


def _metadata(ip, lpips, fuser_loc, encoder_sha: str, encoder_name: str, generator_sha: str,
              manifest_bytes: bytes, run: str) -> dict[str, str]:  # fmt: skip
    """The table's metadata: what made it (see ``latents``)."""
    from mambastyle import __version__

    measured = "lpips,mse,ssim" if lpips else ("mse,ssim" if ip.metrics else "none")
    if ip.metrics and fuser_loc is not None:
        measured += "".join(f",{m}_fuser" for m in measured.split(","))
    return {
        "encoder_sha256": encoder_sha,
        "encoder_uri": encoder_name,
        "generator_sha256": generator_sha,
        "shard_manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "run_id": run,
        "package_version": __version__,
        "metrics": measured,
        **({"fuser_sha256": encoder_sha, "fuser_uri": encoder_name} if fuser_loc is not None else {}),
    }


def _checked_encoder(params, manifest_bytes: bytes) -> tuple[Location, str, Location | None, str, dict]:
    """The encoder file (see ``_encoder_file``) opened and read: (its location, name, the fuser
    checkpoint or None, its sha256, its metadata)."""
    from mambastyle.checkpoints import FUSER_FORMAT, checkpoint_source, file_sha256, load_encoder
    from mambastyle.errors import CheckpointError

    encoder_loc, encoder_name, fuser_loc = _encoder_file(params, manifest_bytes)
    try:
        src = checkpoint_source(encoder_loc.uri, params.storage.options())
        _, meta = load_encoder(src)
    except CheckpointError as exc:
        stage = "fuser" if fuser_loc is not None else "train"
        hint = "" if params.invert.encoder is not None and fuser_loc is None else (
            f" (the {stage} stage's checkpoint for these params: run it first)")  # fmt: skip
        raise InvertError(f"{exc}{hint}") from None
    encoder_sha = file_sha256(src.getvalue() if hasattr(src, "getvalue") else src)
    if fuser_loc is None and meta.get("format") == FUSER_FORMAT:  # a fuser checkpoint named explicitly
        fuser_loc = encoder_loc
    return encoder_loc, encoder_name, fuser_loc, encoder_sha, meta


def _encoder_file(params, manifest_bytes: bytes) -> tuple[Location, str, Location | None]:
    """Where the codes come from: (the checkpoint, its name as the params give it, the fuser
    checkpoint or None). ``invert.encoder`` when set; else the fuser stage's checkpoint when the
    fuser is enabled (its encoder makes the codes); else the train stage's encoder."""
    from mambastyle.data.shards import ShardError
    from mambastyle.errors import CheckpointError
    from mambastyle.runs import FUSER_RUNS_DIR, fuser_job, trained_encoder

    ip = params.invert
    if ip.encoder is not None:
        return resolve(ip.encoder, params.storage.options()), ip.encoder, None
    if params.fuser.enabled:
        try:
            fuser_run, _ = fuser_job(params)
        except (CheckpointError, ShardError) as exc:
            raise InvertError(f"fuser.enabled: {exc}") from None
        fuser_loc = fuser_run.artifacts.join("fuser.pt")
        parts = (params.storage.root.rstrip("/"), FUSER_RUNS_DIR, fuser_run.run_id, "artifacts", "fuser.pt")
        return fuser_loc, "/".join(parts), fuser_loc
    encoder_loc, encoder_name = trained_encoder(params, manifest_bytes)
    return encoder_loc, encoder_name, None


def _lpips_weights(ip, options) -> str | None:
    """The AlexNet weights LPIPS is measured with, or None (not asked for, or not there)."""
    from mambastyle.pretrained import alexnet_hub_path, weights_available

    if not ip.metrics:
        return None
    candidate = ip.lpips_alexnet or alexnet_hub_path()
    if weights_available(candidate, options):
        return candidate
    log.warning("lpips is not measured: no AlexNet weights at %s (invert.lpips_alexnet)", candidate)
    return None
