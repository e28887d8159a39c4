"""The ``mambastyle`` console script: noun-verb subcommands over the library's functions.

Results go to stdout, logs and errors to stderr; a failure exits non-zero with a
one-line message (no traceback) for expected errors such as a bad params file or an
unreadable checkpoint. Settings a flag leaves unset come from ``params.yaml``.

Its length is the command tables (one declarative ``_NOUN_commands`` per noun) and one short
function per subcommand; the work is in the library.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from mambastyle import __version__
from mambastyle.errors import CheckpointError, InvalidConfig
from mambastyle.locks import RootLocked
from mambastyle.runstats import STATS_NAME, TABLE_STATS_NAME

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CliError(Exception):
    """An expected failure with a message for the user."""


def _load(params_path: str):
    from mambastyle.config import load_params

    return load_params(params_path)


# --------------------------------------------------------------------------- config


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from mambastyle.config import to_dict

    data = to_dict(_load(args.params))
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    _load(args.params)
    print(f"{args.params}: OK")
    return 0


# --------------------------------------------------------------------------- generator


def _generator_from_args(args: argparse.Namespace):
    """The generator named by --checkpoint, or the one params.yaml configures."""
    from dataclasses import replace

    from mambastyle.checkpoints import load_generator
    from mambastyle.generate import resolve_generator

    gp = _load(args.params).generator
    if args.checkpoint is not None:
        # An explicit checkpoint decides its own resolution unless --resolution asks for one.
        return load_generator(
            args.checkpoint,
            resolution=args.resolution,
            latent_avg_samples=gp.latent_avg_samples,
            device=args.device,
        )
    arch = gp.architecture
    if args.resolution is not None:
        arch = replace(arch, resolution=args.resolution)
    return resolve_generator(gp.checkpoint, arch, gp.init_seed, gp.latent_avg_samples, device=args.device)


def cmd_generator_info(args: argparse.Namespace) -> int:
    g = _generator_from_args(args)
    cfg = g.config
    info = {
        "config": cfg.to_dict(),
        "n_styles": cfg.n_styles,
        "parameters": {
            "mapping": sum(p.numel() for p in g.style.parameters()),
            "total": sum(p.numel() for p in g.parameters()),
        },
        "channels": {str(2**i): cfg.channels(2**i) for i in range(2, cfg.log_size + 1)},
        "latent_avg": getattr(g, "latent_avg_source", "unknown"),
    }
    if args.format == "json":
        print(json.dumps(info, indent=2))
    else:
        print(f"resolution      {cfg.resolution} px ({cfg.n_styles} styles of {cfg.style_dim})")
        print(f"mapping         {cfg.n_mlp} layers, {info['parameters']['mapping']:,} parameters")
        print(f"parameters      {info['parameters']['total']:,}")
        print("channels        " + " ".join(f"{r}:{c}" for r, c in info["channels"].items()))
        print(f"latent_avg      {info['latent_avg']}")
    return 0


def cmd_generator_sample(args: argparse.Namespace) -> int:
    from mambastyle.generate import render_samples, sample_grid
    from mambastyle.visual import save_png

    sp = _load(args.params).generator.sample
    g = _generator_from_args(args)
    seed = sp.seed if args.seed is None else args.seed
    num = sp.num if args.num is None else args.num
    psi = sp.truncation if args.truncation is None else args.truncation
    noise_mode = sp.noise_mode if args.noise_mode is None else args.noise_mode
    if num < 1:
        raise CliError(f"--num must be >= 1, got {num}")
    images = render_samples(g, seed=seed, num=num, truncation=psi, noise_mode=noise_mode)
    path = save_png(sample_grid(images), args.out)
    print(path)
    return 0


# --------------------------------------------------------------------------- encoder


def _encoder_info(name: str, resolution: int, style_dim: int = 512) -> dict:
    import torch

    from mambastyle.layers.selective_scan import available_backends, resolve_backend
    from mambastyle.models.encoders import ENCODERS, build_encoder

    if name not in ENCODERS:
        raise CliError(f"unknown encoder {name!r}; registered: {', '.join(sorted(ENCODERS))}")
    with torch.device("meta"):  # parameter counts without allocating weights
        enc = build_encoder(name, resolution, style_dim=style_dim)
    groups: dict[str, int] = {}
    for pname, p in enc.named_parameters():
        top = pname.split(".")[0]
        groups[top] = groups.get(top, 0) + p.numel()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = enc.config
    return {
        "name": name,
        "description": ENCODERS[name].description,
        "arch": cfg.arch,
        "generator_resolution": resolution,
        "n_styles": cfg.n_styles,
        "input_size": cfg.input_size,
        "parameters": sum(groups.values()),
        "parameters_by_module": groups,
        "scan_backend": resolve_backend("auto", device) if cfg.arch == "mambastyle" else None,
        "scan_backends_available": available_backends(device),
        "device": device,
        "config": cfg.to_dict(),
    }


def cmd_encoder_list(args: argparse.Namespace) -> int:
    from mambastyle.models.encoders import ENCODERS

    rows = [_encoder_info(name, args.resolution, args.style_dim) for name in ENCODERS]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':18} {'parameters':>12} {'styles':>6}  description")
    for r in rows:
        print(f"{r['name']:18} {r['parameters']:12,} {r['n_styles']:6}  {r['description']}")
    return 0


def cmd_encoder_info(args: argparse.Namespace) -> int:
    info = _encoder_info(args.name, args.resolution, args.style_dim)
    if args.format == "json":
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['name']}: {info['description']}")
    styles = f"{info['n_styles']} styles of {info['config']['style_dim']}"
    print(f"generator       {info['generator_resolution']} px -> {styles}")
    print(f"input           (B, 3, {info['input_size']}, {info['input_size']}) in [-1, 1]")
    print(f"parameters      {info['parameters']:,}")
    for mod, n in info["parameters_by_module"].items():
        print(f"  {mod:14}{n:12,}")
    if info["scan_backend"]:
        print(f"scan backend    {info['scan_backend']} on {info['device']} "
              f"(available: {', '.join(info['scan_backends_available'])})")  # fmt: skip
    return 0


# --------------------------------------------------------------------------- data


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from mambastyle.data.faces import PrepareConfig
    from mambastyle.data.prepare import run_from_source

    params = _load(args.params)
    p, st = params.prepare, params.storage
    config = PrepareConfig.from_params(p)
    if args.size is not None:
        config = replace(config, output_size=args.size)
    if args.multi_face is not None:
        config = replace(config, multi_face=args.multi_face)
    try:
        manifest, out = run_from_source(args.input or p.source, args.output or st.root, config, st.options(),
                                        args.workers or p.workers, p.executor, params.ray.address,
                                        params.ray.num_cpus, args.mode or p.mode)  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(_stats(out.join("shards", STATS_NAME))))
        return 0
    c = manifest["counts"]
    print(
        f"{c['inputs']} inputs = {c['written']} written + {c['quarantined']} quarantined; "
        f"{c['samples']} samples in {len(manifest['shards'])} shards -> {out.join('shards').uri}"
    )
    for reason, n in c["quarantine_reasons"].items():
        print(f"  quarantined {reason}: {n}")
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from mambastyle.data.shards import verify
    from mambastyle.storage import resolve

    out = resolve(args.uri, _load(args.params).storage.options())
    try:
        problems = verify(out)
    except (FileNotFoundError, OSError) as exc:
        raise CliError(f"{out.uri}: cannot read the manifest: {exc}") from None
    for problem in problems:
        print(problem)
    if problems:
        raise CliError(f"{len(problems)} shard(s) do not match the manifest")
    print(f"{out.join('shards').uri}: all shards match the manifest")
    return 0


def _open_latents(args: argparse.Namespace):
    from mambastyle.latents import LatentTableError, open_table

    try:
        return open_table(args.uri, _load(args.params).storage.options(), fmt=None)
    except LatentTableError as exc:
        raise CliError(str(exc)) from None


def cmd_latents_info(args: argparse.Namespace) -> int:
    table = _open_latents(args)
    info = {
        "uri": table.prefix.uri,
        "rows": table.manifest["rows"],
        "splits": table.manifest["splits"],
        "parts": len(table.manifest["parts"]),
        "shape": list(table.shape),
        "metadata": table.metadata,
        "columns": {f.name: str(f.type) for f in table.dataset.schema},
    }
    if args.format == "json":
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"{info['uri']}: {info['rows']} rows in {info['parts']} parts {info['splits']}, W+ {table.shape}")
    for key, value in sorted(info["metadata"].items()):
        print(f"  {key}: {value}")
    for name, typ in info["columns"].items():
        print(f"  column {name}: {typ}")
    return 0


def cmd_latents_query(args: argparse.Namespace) -> int:
    from mambastyle.latents import LatentTableError

    table = _open_latents(args)
    try:
        result = table.query(args.sql)
    except LatentTableError as exc:
        raise CliError(str(exc)) from None
    if args.output:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        if args.output.endswith(".parquet"):
            pq.write_table(result, args.output)
        elif args.output.endswith(".csv"):
            if any(str(f.type).startswith("fixed_size_list") for f in result.schema):
                raise CliError("CSV cannot hold w_plus; select other columns or write .parquet")
            pacsv.write_csv(result, args.output)
        else:
            raise CliError(f"--output must end in .parquet or .csv, got {args.output!r}")
        print(f"{result.num_rows} rows -> {args.output}")
        return 0
    shown = result.slice(0, args.limit)
    columns = [f.name for f in shown.schema]
    print("\t".join(columns))
    for row in shown.to_pylist():
        print("\t".join(_cell(row[c]) for c in columns))
    if result.num_rows > args.limit:
        print(f"... {result.num_rows - args.limit} more rows (use --limit or --output)")
    return 0


def cmd_latents_invert(args: argparse.Namespace) -> int:
    import dataclasses

    from mambastyle.invert.pipeline import InvertError, invert_from_params

    params = _load(args.params)
    changes = {k: v for k, v in (("encoder", args.encoder), ("batch_size", args.batch_size),
                                 ("num_actors", args.actors)) if v is not None}  # fmt: skip
    if args.no_metrics:
        changes["metrics"] = False
    storage = params.storage if args.root is None else dataclasses.replace(params.storage, root=args.root)
    params = dataclasses.replace(
        params, invert=dataclasses.replace(params.invert, **changes), storage=storage
    )
    try:
        manifest, prefix = invert_from_params(params)
    except InvertError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(_stats(prefix.join(TABLE_STATS_NAME))))
        return 0
    print(f"{manifest['rows']} rows {manifest['splits']} -> {prefix.uri}")
    return 0


# --------------------------------------------------------------------------- edit


def cmd_edit_fit_direction(args: argparse.Namespace) -> int:
    from mambastyle.directions import DirectionError, save_direction
    from mambastyle.edit.stage import fit_direction_from_table, read_labels

    table = _open_latents(args)
    try:
        options = _load(args.params).storage.options()
        labels = read_labels(args.labels, options) if args.labels else None
        direction = fit_direction_from_table(table, args.column, args.where, args.space, args.uri, labels)
        loc = save_direction(direction, args.out, options)
    except DirectionError as exc:
        raise CliError(str(exc)) from None
    info = direction.info
    quality = ", ".join(f"{k} {v:.3f}" for k, v in info["quality"].items())
    print(f"{args.column} ({info['kind']}, {info['rows']} rows, {args.space}): {quality}; "
          f"{info['model']['slope']:.4g} {args.column} per unit of strength -> {loc.uri}")  # fmt: skip
    return 0


def _edit_entries(args: argparse.Namespace, defined: dict) -> list:
    """``--direction NAME:STRENGTHS[:START-STOP]`` -> edit entries (NAME from --load, --ganspace,
    --fit or the params file's edits)."""
    import dataclasses

    from mambastyle.directions import DirectionError
    from mambastyle.edit.core import parse_strengths

    entries = []
    for spec in args.direction:
        name, _, rest = spec.partition(":")
        strengths, _, layers = rest.partition(":")
        if name not in defined:
            known = ", ".join(sorted(defined)) or "none"
            raise CliError(f"--direction {spec}: unknown direction {name!r} (defined: {known}); "
                           "define it with --load, --ganspace or --fit")  # fmt: skip
        try:
            values = parse_strengths(strengths, name)
        except DirectionError as exc:
            raise CliError(f"--direction {spec}: {exc}") from None
        layer_range = None
        if layers:
            try:
                start, stop = (int(v) for v in layers.split("-"))
            except ValueError:
                raise CliError(f"--direction {spec}: layers must be START-STOP, got {layers!r}") from None
            layer_range = (start, stop)
        entries.append(dataclasses.replace(defined[name], strengths=values, layers=layer_range))
    return entries


def cmd_edit_apply(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from mambastyle.config import EditEntryParams
    from mambastyle.edit.pipeline import EditError
    from mambastyle.edit.stage import edit_from_params
    from mambastyle.visual import save_png

    params = _load(args.params)
    defined = {e.name: e for e in params.edit.edits}
    blank = {"uri": None, "component": None, "absolute": False, "column": None, "labels": args.labels,
             "fit_where": None, "space": "W", "strengths": (0.0,), "layers": None}  # fmt: skip
    for kind, values in (("interfacegan", args.load), ("ganspace", args.ganspace), ("fit", args.fit)):
        for item in values or []:
            name, sep, target = item.partition("=")
            if not sep or not target:
                raise CliError(f"expected NAME=VALUE, got {item!r}")
            entry = dict(blank, name=name, source=kind)
            if kind == "interfacegan":
                entry["uri"] = target
            elif kind == "ganspace":
                uri, _, component = target.rpartition("#")
                if not uri or not component.isdigit():
                    raise CliError(f"--ganspace {item}: expected NAME=FILE#COMPONENT")
                entry.update(uri=uri, component=int(component))
            else:
                entry.update(column=target, fit_where=args.fit_where, space=args.space)
            defined[name] = EditEntryParams(**entry)
    changes: dict = {}
    if args.direction:
        changes["edits"] = tuple(_edit_entries(args, defined))
    for key in ("where", "output", "batch_size", "mode"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.actors is not None:
        changes["num_actors"] = args.actors
    storage = params.storage if args.root is None else dataclasses.replace(params.storage, root=args.root)
    params = dataclasses.replace(params, edit=dataclasses.replace(params.edit, **changes), storage=storage)
    table = args.table or params.edit.table
    if table is None:
        from mambastyle.stage import invert_record

        record = invert_record(args.invert_out)
        if record is None:
            missing = Path(args.invert_out) / "manifest.json"
            raise CliError(f"no latent table: give --table (or run the invert stage: {missing} is missing)")
        table = record["table"]
    try:
        result = edit_from_params(params, table)
    except EditError as exc:
        raise CliError(str(exc)) from None
    m = result.manifest
    if args.json:
        print(json.dumps(_stats(result.prefix.join(TABLE_STATS_NAME))))
    else:
        print(f"{m['rows']} edited rows ({m['selected']} selected x {len(result.edits)} edits), "
              f"{m['images']['count']} images -> {result.prefix.uri}")  # fmt: skip
    if args.grids:
        for name, grid in result.grids.items():
            print(f"  grid {name}: {save_png(grid, Path(args.grids) / f'{name}.png')}")
    return 0


def _stats(loc) -> dict:
    """A run's stats record (``mambastyle.runstats``), as written beside its manifest."""
    from mambastyle.storage import read_bytes

    return json.loads(read_bytes(loc))


def _cell(value) -> str:
    if isinstance(value, list):
        return f"[{len(value)} values]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# --------------------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> int:
    from mambastyle.report import pipeline_report

    root = _load(args.params).storage.root
    print("\n".join(pipeline_report(args.records, root)))
    return 0


# --------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import signal
    import threading

    from mambastyle.serve.studio import ServeError, Studio

    params = _load(args.params)
    overrides = {
        k: v for k, v in (("host", args.host), ("port", args.port), ("replicas", args.replicas)) if v
    }
    params = dataclasses.replace(params, serve=dataclasses.replace(params.serve, **overrides))
    sp = params.serve
    try:  # everything the replicas will load, checked here first: a clear error, not a failing replica
        studio = Studio.from_params(params, args.table)
    except ServeError as exc:
        raise CliError(str(exc)) from None
    table = studio.info["table"]
    del studio
    from mambastyle.runtime import connect_ray

    ray = connect_ray(params.ray.address, params.ray.num_cpus, params.ray.num_gpus)
    from ray import serve

    from mambastyle.serve.app import build

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": sp.host, "port": sp.port})
        serve.run(build(params, table), name="mambastyle", route_prefix="/")
        url = f"http://{sp.host}:{sp.port}/"
        print(json.dumps({"url": url, "table": table, "replicas": sp.replicas}), flush=True)
        print(f"serving on {url} (Ctrl-C stops)", file=sys.stderr, flush=True)
        stop.wait()
    except RuntimeError as exc:  # the application did not come up (Serve wraps replica errors)
        raise CliError(f"the service did not start: {str(exc).splitlines()[0]}") from None
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


# --------------------------------------------------------------------------- parser


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")


def _config_commands(nouns) -> None:
    config = nouns.add_parser("config", help="inspect and validate params.yaml")
    verbs = config.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser("show", help="print the validated parameters")
    _add_params(p)
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.set_defaults(func=cmd_config_show)
    p = verbs.add_parser("validate", help="check params.yaml; the error names the offending key")
    _add_params(p)
    p.set_defaults(func=cmd_config_validate)


def _generator_commands(nouns) -> None:
    gen = nouns.add_parser("generator", help="the StyleGAN2 generator")
    verbs = gen.add_subparsers(dest="verb", metavar="VERB", required=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_params(common)
    common.add_argument(
        "--checkpoint",
        help="rosinality-format .pt (default: generator.checkpoint from params, or random init)",
    )
    common.add_argument("--resolution", type=int, help="require this resolution (default: from params)")
    common.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")

    p = verbs.add_parser("info", parents=[common], help="architecture, parameter counts, latent_avg source")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_generator_info)

    p = verbs.add_parser("sample", parents=[common], help="render a grid of samples to a PNG")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--seed", type=int, help="z seed (default: generator.sample.seed)")
    p.add_argument("--num", type=int, help="number of samples (default: generator.sample.num)")
    p.add_argument("--truncation", type=float, help="psi in [0, 1] (default: generator.sample.truncation)")
    p.add_argument(
        "--noise-mode", choices=["const", "random", "none"], help="default: generator.sample.noise_mode"
    )
    p.set_defaults(func=cmd_generator_sample)


def _data_commands(nouns) -> None:
    data = nouns.add_parser("data", help="prepare and check datasets of aligned faces")
    verbs = data.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser("prepare", help="align faces from photos into WebDataset shards")
    _add_params(p)
    p.add_argument("--input", help="demo, a folder or s3://bucket/prefix (default: prepare.source)")
    p.add_argument("--output", help="root for shards/ (default: storage.root)")
    p.add_argument("--size", type=int, help="aligned crop side (default: prepare.output_size)")
    p.add_argument("--multi-face", choices=["largest", "each", "reject"], help="default: prepare.multi_face")
    p.add_argument("--workers", type=int, help="local processes (default: prepare.workers)")
    p.add_argument("--mode", choices=["sync", "extend"],
                   help="over existing shards, only new inputs are processed; removed ones leave the "
                        "shards and ones rewritten in place are processed again (sync), or both stay as "
                        "they were (extend) (default: prepare.mode)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the run's statistics as one JSON object")
    p.set_defaults(func=cmd_data_prepare)
    p = verbs.add_parser("verify", help="re-hash shards against their manifest")
    _add_params(p)
    p.add_argument("uri", help="the root that holds shards/ (local or s3://)")
    p.set_defaults(func=cmd_data_verify)


def _encoder_commands(nouns) -> None:
    enc = nouns.add_parser("encoder", help="image -> W+ encoders")
    verbs = enc.add_subparsers(dest="verb", metavar="VERB", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--resolution",
        type=int,
        default=1024,
        help="generator resolution, sets n_styles (default: %(default)s)",
    )
    common.add_argument("--style-dim", type=int, default=512,
                        help="the generator's style width (default: %(default)s, StyleGAN2's)")  # fmt: skip
    common.add_argument("--format", choices=["text", "json"], default="text")
    p = verbs.add_parser("list", parents=[common], help="registered encoders with parameter counts")
    p.set_defaults(func=cmd_encoder_list)
    p = verbs.add_parser("info", parents=[common], help="one encoder: sizes, parameters, scan backend here")
    p.add_argument("name", help="registered encoder name (see `mambastyle encoder list`)")
    p.set_defaults(func=cmd_encoder_info)


def _latents_commands(nouns) -> None:
    lat = nouns.add_parser("latents", help="query latent tables (the invert stage's Parquet datasets)")
    verbs = lat.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser("info", help="schema, metadata and counts of a latent table")
    _add_params(p)
    p.add_argument("uri", help="the table's prefix (local or s3://)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_latents_info)
    p = verbs.add_parser("invert", help="invert the shards under a root into a new latent table (Ray Data)")
    _add_params(p)
    p.add_argument("--root", help="storage root holding shards/ (default: storage.root)")
    p.add_argument("--encoder", help="encoder checkpoint (default: invert.encoder, else the train stage's)")
    p.add_argument("--batch-size", type=int, help="default: invert.batch_size")
    p.add_argument("--actors", type=int, help="default: invert.num_actors")
    p.add_argument("--no-metrics", action="store_true", help="codes only, no reconstructions")
    p.add_argument("--json", action="store_true", help="print the run's statistics as one JSON object")
    p.set_defaults(func=cmd_latents_invert)
    p = verbs.add_parser("query", help="SQL over a latent table (`latents`) or an edits table (`edits`)")
    _add_params(p)
    p.add_argument("uri", help="the table's prefix (local or s3://)")
    p.add_argument("sql", help="e.g. \"SELECT key, yaw FROM latents WHERE split = 'test' AND yaw > 20\"")
    p.add_argument("--output", help="write all rows to a .parquet or .csv file instead of printing")
    p.add_argument("--limit", type=int, default=20, help="rows to print (default: %(default)s)")
    p.set_defaults(func=cmd_latents_query)


def _edit_commands(nouns) -> None:
    ed = nouns.add_parser("edit", help="fit edit directions and apply edits in bulk (Ray Data)")
    verbs = ed.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser("fit-direction", help="fit a direction in W/W+ to a numeric or boolean column")
    _add_params(p)
    p.add_argument("uri", help="the latent table's prefix (local or s3://)")
    p.add_argument("--column", required=True, help="numeric or boolean column, e.g. yaw")
    p.add_argument("--labels", help="a .csv/.parquet with `key` and COLUMN, joined to the table by key")
    p.add_argument("--where", default="true", help="SQL condition: the rows fitted on (default: all)")
    p.add_argument("--space", choices=["W", "W+"], default="W")
    p.add_argument("--out", required=True, help="output .npy (a .json record is written beside it)")
    p.set_defaults(func=cmd_edit_fit_direction)
    p = verbs.add_parser(
        "apply",
        help="edit selected rows of a latent table and render them",
        description="Directions come from params.yaml (edit.edits) or are defined here by name; "
        "each --direction applies one at the given strengths, e.g. --load smile=smile.pt "
        "--direction smile:-3,0,3 --direction yaw:-2,2:0-6.",
    )
    _add_params(p)
    p.add_argument("--table", help="latent table URI (default: edit.table, else the invert stage's)")
    p.add_argument("--where", help="SQL condition choosing the rows (default: edit.where)")
    p.add_argument(
        "--direction",
        action="append",
        metavar="NAME:STRENGTHS[:START-STOP]",
        help="apply NAME at comma-separated strengths, optionally to styles [START, STOP)",
    )
    p.add_argument("--load", action="append", metavar="NAME=FILE", help="an InterFaceGAN .npy/.pt direction")
    p.add_argument(
        "--ganspace", action="append", metavar="NAME=FILE#K", help="component K of a GANSpace file"
    )
    p.add_argument("--fit", action="append", metavar="NAME=COLUMN", help="a direction fitted to a column")
    p.add_argument("--fit-where", default="true", help="SQL condition: rows --fit uses (default: all)")
    p.add_argument("--labels", help="a .csv/.parquet with `key` and the --fit columns, joined by key")
    p.add_argument("--space", choices=["W", "W+"], default="W", help="space of --fit directions")
    p.add_argument("--output", choices=["shards", "folder"], help="default: edit.output")
    p.add_argument("--mode", choices=["w_plus", "fuser"],
                   help="fuser: re-encode each face from its shard and render with the table's fuser "
                        "(default: edit.mode)")  # fmt: skip
    p.add_argument("--batch-size", type=int, help="default: edit.batch_size")
    p.add_argument("--actors", type=int, help="default: edit.num_actors")
    p.add_argument("--root", help="storage root for edits/ (default: storage.root)")
    p.add_argument("--grids", help="also write one grid PNG per edit into this folder")
    p.add_argument("--invert-out", default="data/invert", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the run's statistics as one JSON object")
    p.set_defaults(func=cmd_edit_apply)


def _report_commands(nouns) -> None:
    p = nouns.add_parser("report", help="where the pipeline's results are: tables, metrics, pictures")
    _add_params(p)
    p.add_argument(
        "--records", default="data", help="folder of the stages' DVC records (default: %(default)s)"
    )
    p.set_defaults(func=cmd_report)


def _serve_commands(nouns) -> None:
    p = nouns.add_parser(
        "serve",
        help="an HTTP API and a web page for single inversions and edits (Ray Serve)",
        description="Serves the latent table's encoder (and fuser), the configured generator and "
        "directions (params.yaml `serve` section) until interrupted: GET / is the page, "
        "POST /v1/invert and /v1/edit the API, GET /v1/directions and /healthz.",
    )
    _add_params(p)
    p.add_argument(
        "--table", help="latent table URI (default: serve.table, edit.table, else the invert stage's)"
    )
    p.add_argument("--host", help="default: serve.host")
    p.add_argument("--port", type=int, help="default: serve.port")
    p.add_argument("--replicas", type=int, help="default: serve.replicas")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambastyle",
        description="Dataset-scale StyleGAN2 inversion (MambaStyle encoder) and bulk latent editing.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    nouns = parser.add_subparsers(dest="noun", metavar="COMMAND", required=True)

    _config_commands(nouns)
    _generator_commands(nouns)
    _data_commands(nouns)
    _encoder_commands(nouns)
    _latents_commands(nouns)
    _edit_commands(nouns)
    _report_commands(nouns)
    _serve_commands(nouns)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except InvalidConfig as exc:  # includes ConfigError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CheckpointError, CliError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = None
        return 0
    except RootLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # storage: a missing file, no permission, an unreachable S3 endpoint
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
