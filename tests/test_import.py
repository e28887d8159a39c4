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
