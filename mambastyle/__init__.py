"""mambastyle: StyleGAN2 inversion with a MambaStyle encoder, and bulk latent editing, at dataset scale.

Importing the package is cheap and safe on any machine: it pulls in no GPU-only
dependency (mamba-ssm, causal-conv1d, triton), no Ray and no cloud SDK. Submodules
import what they need.
"""

__version__ = "0.1.0"
