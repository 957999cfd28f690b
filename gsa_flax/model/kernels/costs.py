"""What the kernels cost, for a cost model that reads a compiled program.

XLA sees a Pallas kernel as one custom call and cannot look inside it. Each kernel call
is named after everything static about it (:class:`~gsa_flax.model.kernels.layout.KernelCall`),
so a compiled program's custom calls can be priced from their names and their operand and
result shapes: the HBM bytes its programs copy in and out (the grid and the blocks, as
:func:`gsa_flax.model.kernels.layout.grid_traffic` counts them) and the FLOPs it executes.
:func:`custom_call_costs` gives those prices in the form
:func:`gsa_flax.tools.sizing.aot.analyze` takes; each ``pallas_call`` also carries the same
numbers as its ``pl.CostEstimate``, which libtpu's own cost analysis counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jax.experimental import pallas as pl

from gsa_flax.model.kernels import axial_gpu, axial_tpu, layout

# Bytes per element of the HLO element types the kernels use.
_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4}
_ITEMSIZE.update({'s32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8})

# Memory spaces of an HLO layout that are HBM: the default and host memory (``S(5)``);
# a TPU's VMEM (``S(1)``) is on chip.
_OFF_CHIP = (0, 5)

# The kernels' names, one prefix per step and direction (see layout.KernelCall.name).
KERNELS = tuple(f'gsa_axial{axis}_{d}' for axis in (1, 2) for d in ('fwd', 'bwd'))


def _array(a: Any) -> tuple[tuple[int, ...], int, bool]:
  """``(shape, itemsize, in HBM)`` of an HLO array (``dims``, ``dtype`` string,
  ``memory_space``) or of anything with ``shape`` and a numpy ``dtype``."""
  if hasattr(a, 'dims'):
    return tuple(a.dims), _ITEMSIZE[a.dtype], getattr(a, 'memory_space', 0) in _OFF_CHIP
  return tuple(a.shape), np.dtype(a.dtype).itemsize, True


def price(call: Any) -> pl.CostEstimate:
  """HBM bytes and FLOPs of one execution of a kernel call found in a compiled program.

  Args:
    call: has ``name`` and ``op_name`` (one of them naming the kernel call, as
      :class:`gsa_flax.tools.sizing.hlo.CustomCall` does), ``target`` (``'tpu_custom_call'``
      for Mosaic, else a GPU call) and ``operands`` / ``results`` (arrays with ``dims``,
      an HLO ``dtype`` and a ``memory_space``).

  Returns:
    The cost: bytes of every block of an array in HBM (blocks of arrays the compiler
    keeps in on-chip memory move no HBM bytes), FLOPs and transcendentals as the
    backend's ``compute_cost`` counts them.

  Raises:
    ValueError: neither name spells a kernel call.
  """
  kernel = layout.KernelCall.parse(call.name) or layout.KernelCall.parse(call.op_name)
  if kernel is None:
    raise ValueError(f'{call.name!r} ({call.op_name!r}) names no GSA kernel call.')
  operands = [_array(a) for a in call.operands]
  results = [_array(a) for a in call.results]
  sizes = [(shape, itemsize) for shape, itemsize, _ in operands + results]
  batch = results[0][0][0]
  if call.target == 'tpu_custom_call':
    moved = axial_tpu.block_traffic(sizes[: len(operands)], sizes[len(operands) :])
    width = operands[1][0][1]  # the relative rows [n*d, P]
    flops, exps = axial_tpu.compute_cost(kernel, batch, width)
  else:
    moved = axial_gpu.block_traffic(kernel, sizes[: len(operands)], sizes[len(operands) :])
    flops, exps = axial_gpu.compute_cost(kernel, batch)
  in_hbm = [hbm for _, _, hbm in operands + results]
  hbm_bytes = sum(b for b, hbm in zip(moved, in_hbm, strict=True) if hbm)
  return pl.CostEstimate(flops=flops, transcendentals=exps, bytes_accessed=hbm_bytes)


def custom_call_costs() -> Mapping[str, Callable[[Any], pl.CostEstimate]]:
  """Prices of the kernels' custom calls by kernel name, for
  :func:`gsa_flax.tools.sizing.aot.analyze` (each a function of the call: :func:`price`)."""
  return dict.fromkeys(KERNELS, price)
