"""Pure-PyTorch models (no I/O): the StyleGAN2 generator, and the encoders to come."""

from mambastyle.models.stylegan2 import Generator, GeneratorConfig, build_generator

__all__ = ["Generator", "GeneratorConfig", "build_generator"]
