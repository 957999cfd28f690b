"""Pallas kernels for GSA attention: Mosaic for TPU, Triton for NVIDIA GPUs.

One module per kernel family: :mod:`~gsa_flax.model.kernels.positional` (one axial step of
positional attention with relative embeddings, the fused form of
:func:`gsa_flax.model.ops.positional_attention`) and :mod:`~gsa_flax.model.kernels.gsa` (a GSA
module's whole attention: content, column step, BatchNorm and row step in four passes).
Both run on the per-backend step kernels of :mod:`~gsa_flax.model.kernels.axial_tpu` and
:mod:`~gsa_flax.model.kernels.axial_gpu`, with the shared geometry of
:mod:`~gsa_flax.model.kernels.layout`. Kernels know nothing of :mod:`gsa_flax.model.ops`, which
dispatches to them.
"""
