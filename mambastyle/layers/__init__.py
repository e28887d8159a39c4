"""Pure-PyTorch building blocks shared by the models (no I/O, no optional kernels at import)."""

from mambastyle.layers.bias_act import fused_leaky_relu, leaky_relu_ref
from mambastyle.layers.upfirdn2d import make_kernel, upfirdn2d, upfirdn2d_ref

__all__ = ["fused_leaky_relu", "leaky_relu_ref", "make_kernel", "upfirdn2d", "upfirdn2d_ref"]
