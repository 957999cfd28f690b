"""What the kernels cost, for a cost model that reads a compiled program.

XLA sees a Pallas kernel as one custom call and cannot look inside it. Each kernel call
is named after everything static about it (:class:`~gsa_flax.model.kernels.layout.KernelCall`),
so a compiled program's custom calls can be priced from their names and their operand and
result shapes: the HBM bytes its programs copy in and out (the grid and the blocks, as
:func:`gsa_flax.model.kernels.layout.grid_traffic` counts them), the FLOPs it executes and
how they fall on the chip's units: on TPU what the MXU does for them with its tiles padded,
on a GPU the part on the CUDA cores (:mod:`gsa_flax.model.kernels.flops`).
:func:`custom_call_costs` gives those prices in the form
:func:`gsa_flax.tools.sizing.aot.analyze` takes; each ``pallas_call`` also carries its
bytes and FLOPs as its ``pl.CostEstimate``, which libtpu's own cost analysis counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gsa_flax.model.kernels import axial_gpu, axial_tpu, flops, layout

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


@dataclasses.dataclass(frozen=True)
class KernelCost:
  """One execution of a kernel call: a ``pl.CostEstimate``'s three numbers and where the
  FLOPs run.

  Attributes:
    flops: executed FLOPs (``2 M K N`` of each dot, padded tiles' zeros included).
    transcendentals: exponentials.
    bytes_accessed: HBM bytes of its programs' blocks.
    padded_flops: ``{MXU width: FLOPs}`` on a TPU's MXU with each dot's operands rounded
      up to its tiles (:func:`gsa_flax.model.kernels.flops.padded_flops`); ``{}`` on GPUs.
    vector_flops: the part of ``flops`` on a GPU's CUDA cores (the rest is tensor-core
      dots); 0 on TPU.
  """

  flops: float
  transcendentals: float
  bytes_accessed: float
  padded_flops: Mapping[int, float] = dataclasses.field(default_factory=dict)
  vector_flops: float = 0.0


def price(call: Any) -> KernelCost:
  """HBM bytes and FLOPs of one execution of a kernel call found in a compiled program.

  Args:
    call: has ``name`` and ``op_name`` (one of them naming the kernel call, as
      :class:`gsa_flax.tools.sizing.hlo.CustomCall` does), ``target`` (``'tpu_custom_call'``
      for Mosaic, else a GPU call) and ``operands`` / ``results`` (arrays with ``dims``,
      an HLO ``dtype`` and a ``memory_space``).

  Returns:
    The cost: bytes of every block of an array in HBM (blocks of arrays the compiler
    keeps in on-chip memory move no HBM bytes), FLOPs and transcendentals as the
    backend's ``compute_cost`` counts them, and how the FLOPs fall on the chip's units
    (from the backend's ``kernel_dots``).

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
  padded, vector = {}, 0
  if call.target == 'tpu_custom_call':
    moved = axial_tpu.block_traffic(sizes[: len(operands)], sizes[len(operands) :])
    width = operands[1][0][1]  # the relative rows [n*d, P]
    flop_count, exps = axial_tpu.compute_cost(kernel, batch, width)
    dots = axial_tpu.kernel_dots(kernel, batch, width)
    padded = {mxu: flops.padded_flops(dots, mxu) for mxu in flops.MXU_WIDTHS}
  else:
    moved = axial_gpu.block_traffic(kernel, sizes[: len(operands)], sizes[len(operands) :])
    flop_count, exps = axial_gpu.compute_cost(kernel, batch)
    sixteen_bit = operands[0][1] == 2  # src: its dtype is the dots' operand dtype
    vector = flops.executed_flops(axial_gpu.kernel_dots(kernel, batch, sixteen_bit), flops.VECTOR)
  in_hbm = [hbm for _, _, hbm in operands + results]
  hbm_bytes = sum(b for b, hbm in zip(moved, in_hbm, strict=True) if hbm)
  return KernelCost(flop_count, exps, hbm_bytes, padded, vector)


def custom_call_costs() -> Mapping[str, Callable[[Any], KernelCost]]:
  """Prices of the kernels' custom calls by kernel name, for
  :func:`gsa_flax.tools.sizing.aot.analyze` (each a function of the call: :func:`price`)."""
  return dict.fromkeys(KERNELS, price)
