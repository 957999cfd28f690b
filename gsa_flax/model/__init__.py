"""The model: pure JAX, no TensorFlow, no training loop.

Imports run down this list: :mod:`~gsa_flax.model.transfer` (weights between
resolutions and class counts) and :mod:`~gsa_flax.model.pretrained` (a network from a
weights file) -> :mod:`~gsa_flax.model.networks` (ResNet, GSA-ResNet) ->
:mod:`~gsa_flax.model.layers` (the GSA linen module) -> :mod:`~gsa_flax.model.ops` (the
attention math over ``jnp.einsum``) -> :mod:`~gsa_flax.model.dispatch` (kernels or
einsums, for the compile target) -> :mod:`~gsa_flax.model.kernels` (fused Pallas
kernels); :mod:`~gsa_flax.model.weights` (the portable weights file) is at the bottom;
:mod:`~gsa_flax.model.selfcheck` compares the kernels with the einsums for a network.
"""
