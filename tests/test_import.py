"""`import mambastyle` works with no GPU and without the optional CUDA packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_without_gpu_or_cuda_extras():
    code = textwrap.dedent(
        """
        import sys
        # Make the optional GPU packages unimportable, whatever is installed.
        for name in ("mamba_ssm", "causal_conv1d", "triton", "selective_scan_cuda"):
            sys.modules[name] = None
        import mambastyle, mambastyle.models, mambastyle.layers, mambastyle.checkpoints
        import mambastyle.config, mambastyle.cli, mambastyle.generate, mambastyle.models.encoders
        import torch
        assert not torch.cuda.is_available()
        from mambastyle.models import GeneratorConfig, build_generator
        g = build_generator(GeneratorConfig(resolution=16, style_dim=8, n_mlp=1, channel_max=4))
        g.synthesis(torch.randn(1, g.n_styles, 8))
        heavy = sorted(m for m in ("ray", "boto3", "pyarrow", "dvc", "lpips", "numba") if m in sys.modules)
        assert not heavy, heavy
        # the encoder runs too (its scan picks a CPU backend at call time)
        from mambastyle.models.encoders import build_encoder
        enc = build_encoder("mambastyle_tiny", 32, input_size=32).eval()
        with torch.no_grad():
            assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 8, 512)
        heavy = sorted(m for m in ("ray", "boto3", "pyarrow", "dvc", "lpips") if m in sys.modules)
        assert not heavy, heavy
        print("ok", mambastyle.__version__)
        """
    )
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")


# The layers of ARCHITECTURE.md, bottom to top: a module imports only its own layer and the
# ones below; a stage core imports no other core. Every module must be placed here.
LAYERS: list[tuple[str, dict[str, tuple[str, ...]]]] = [
    ("base", {"": ("mambastyle", "mambastyle.errors", "mambastyle.codegraph")}),
    ("layers", {"": ("mambastyle.layers*",)}),
    ("models", {"": ("mambastyle.models*",)}),
    (
        "formats",
        {
            "": (
                "mambastyle.storage",
                "mambastyle.locks",
                "mambastyle.runstats",
                "mambastyle.visual",
                "mambastyle.config",
                "mambastyle.checkpoints",
                "mambastyle.latents",
                "mambastyle.directions",
                "mambastyle.pretrained",
                "mambastyle.runs",
                "mambastyle.generate",
                "mambastyle.identity",
                "mambastyle.data",
                "mambastyle.data.shards",
                "mambastyle.data.images",
                "mambastyle.data._png",
                "mambastyle.data.inputs",
                "mambastyle.data.demo",
                "mambastyle.data.align",
                "mambastyle.data._resample",
            )
        },
    ),  # fmt: skip
    ("runtime", {"": ("mambastyle.runtime",)}),
    (
        "cores",
        {
            "prepare": ("mambastyle.data.prepare", "mambastyle.data.faces", "mambastyle.data.executors"),
            "train": ("mambastyle.train*",),
            "invert": ("mambastyle.invert*",),
            "edit": ("mambastyle.edit*",),
            "evaluate": ("mambastyle.evaluate",),
        },
    ),  # fmt: skip
    (
        "top",
        {"": ("mambastyle.stage", "mambastyle.cli", "mambastyle.report", "mambastyle.serve*", "pipelines*")},
    ),
]


def _place(module: str) -> tuple[int, str]:
    """(layer index, core group) of a module; the most specific pattern wins."""
    best = None
    for index, (_layer, groups) in enumerate(LAYERS):
        for group, patterns in groups.items():
            for pattern in patterns:
                base = pattern.rstrip("*")
                hit = module == base or (pattern.endswith("*") and module.startswith(base + "."))
                if hit and (best is None or len(base) > best[0]):
                    best = (len(base), index, group)
    assert best is not None, f"{module} is in no layer: place it in LAYERS and ARCHITECTURE.md"
    return best[1], best[2]


def test_no_import_cycles_lazy_imports_included():
    from mambastyle import codegraph

    assert codegraph.cycles(codegraph.graph()) == []


def test_modules_import_only_their_layer_and_below():
    from mambastyle import codegraph

    bad = []
    for module, deps in codegraph.graph().items():
        layer, group = _place(module)
        for dep in deps:
            dep_layer, dep_group = _place(dep)
            across_cores = LAYERS[layer][0] == "cores" == LAYERS[dep_layer][0] and dep_group != group
            if dep_layer > layer or across_cores:
                bad.append(f"{module} ({LAYERS[layer][0]} {group}) imports {dep} ({LAYERS[dep_layer][0]})")
    assert not bad, "\n".join(sorted(bad))


def test_nothing_below_the_runtime_knows_ray_and_models_do_no_io():
    from mambastyle import codegraph

    runtime = [name for name, _ in LAYERS].index("runtime")
    models = [name for name, _ in LAYERS].index("models")
    for module in codegraph.graph():
        layer, _ = _place(module)
        ext = codegraph.external(module)
        if layer < runtime:
            stage_only = ext & {"ray", "dvc", "dvclive"}
            assert not stage_only, f"{module} imports {sorted(stage_only)}"
        if layer <= models:
            io = ext & {"pyarrow", "boto3", "fsspec", "requests", "urllib", "PIL", "webdataset"}
            assert not io, f"{module} (no I/O below formats) imports {sorted(io)}"


def test_config_and_the_result_stages_stay_off_the_layers_they_must_not_touch():
    from mambastyle import codegraph

    results = (
        "mambastyle.invert.pipeline",
        "mambastyle.evaluate",
        "mambastyle.edit.stage",
        "pipelines.evaluate",
    )
    for core in results:
        assert not [m for m in codegraph.closure(core) if m.startswith("mambastyle.train")], core
    above = tuple(f"mambastyle.{m}" for m in ("data", "train", "invert", "edit", "evaluate"))
    reached = codegraph.closure("mambastyle.config")
    assert not [m for m in reached if m.startswith(above)], reached
