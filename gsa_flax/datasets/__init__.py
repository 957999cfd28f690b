"""TFDS builders that ship inside the package; importing this registers them with TFDS."""

from gsa_flax.datasets import digits as digits

__all__ = ['digits']
