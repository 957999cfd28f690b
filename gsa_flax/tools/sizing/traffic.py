"""What a compiled program costs, counted from its optimized HLO text
(:mod:`gsa_flax.tools.sizing.hlo` parses it).

:func:`hlo_costs` totals a program's estimated HBM traffic and its dot/convolution FLOPs;
:func:`traffic_by_instruction` gives the terms of that total (what dominates a program);
:func:`custom_calls` lists the custom calls (kernels, library calls) with their shapes.
:mod:`gsa_flax.tools.sizing.aot` builds on it for whole-chip analyses.

The HBM traffic is an estimate, not a measurement: every top-level instruction of the
program (a fusion, a library call, a copy, a collective; while bodies times their trip
count) is taken to read each of its operands once and write its results once, in the bytes
of their layout (a TPU's tile padding included). What a fusion keeps in registers, and
buffers a TPU places in on-chip memory (VMEM, ``S(1)`` in the layout), cost nothing; an
asynchronous pair (``*-start``/``*-done``) reads at the start and writes at the done; a
slice reads only what it keeps. A fusion that reads only part of an operand (a
dynamic slice inside it, an in-place update) is still charged the whole operand, so the
estimate errs high there. libtpu's own "bytes accessed" counts on-chip traffic too and is
reported beside it.

A custom call (a Pallas kernel) hides its inside from both compilers: its operands and
results say nothing of what its programs copy. The project's kernels are priced from
their grid and block specs (every program's input and output blocks, in HBM's tiled layout
on TPU; blocks of a buffer the compiler keeps on chip excluded, as for any instruction) by
:func:`gsa_flax.model.kernels.costs.custom_call_costs`, which :func:`analyze` applies unless told
otherwise; other custom calls can be priced by the caller, and any left unpriced is named.

FLOPs are libtpu's count on TPU (a Pallas kernel's own ``CostEstimate`` included). The GPU
compiler has no cost analysis: there the FLOPs are counted from the HLO, dots and
convolutions only (2 x multiply-adds, fusion bodies and cuBLAS/cuDNN calls included;
elementwise work is not counted), plus the priced kernels' FLOPs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from gsa_flax.tools.sizing.hlo import (
  CUBLAS,
  CUDNN_CONV,
  ArrayShape,
  CustomCall,
  CustomCallCosts,
  Instruction,
  library_call,
  parse_module,
  with_kernel_costs,
)

# ----------------------------------------------------------------------------- counting


class _Totals(NamedTuple):
  hbm_bytes: float = 0.0
  onchip_bytes: float = 0.0
  custom_flops: float = 0.0  # of custom calls priced by the caller
  # What the priced kernels execute, whether or not the compiler counted it already, and
  # how it falls on the chip's units (see gsa_flax.model.kernels.costs.KernelCost).
  kernel_flops: float = 0.0
  kernel_vector_flops: float = 0.0
  kernel_padded_128: float = 0.0
  kernel_padded_256: float = 0.0

  def plus(self, other: _Totals, times: float = 1.0) -> _Totals:
    return _Totals(*(a + times * b for a, b in zip(self, other, strict=True)))


_NO_TRAFFIC = frozenset(
  {
    'parameter',
    'constant',
    'tuple',
    'get-tuple-element',
    'bitcast',
    'after-all',
    'add-dependency',
    'opt-barrier',
    'partition-id',
    'replica-id',
    'domain',
    'get-dimension-size',
  }
)
# Slices read only what they keep; TPUs also slice asynchronously (slice-start/-done).
_SLICES = frozenset({'slice', 'dynamic-slice', 'slice-start', 'dynamic-slice-start'})
# Annotations that move no data (ConcatBitcast: a TPU's view of slices laid out contiguously).
_NO_OP_CUSTOM_CALLS = frozenset(
  {
    'AssumeGatherIndicesInBound',
    'ConcatBitcast',
    'Sharding',
    'SPMDFullToShardShape',
    'SPMDShardToFullShape',
    'LayoutConstraint',
    'AllocateBuffer',
  }
)
_COLLECTIVES = frozenset(
  {
    'all-reduce',
    'all-gather',
    'reduce-scatter',
    'all-to-all',
    'ragged-all-to-all',
    'collective-permute',
    'collective-broadcast',
  }
)


_HBM, _HOST = 0, 5  # memory spaces; a TPU's VMEM is 1, its scalar memory 2
_MOSAIC = 'tpu_custom_call'  # a Pallas kernel compiled for TPU


def _moved(shapes: Sequence[ArrayShape]) -> _Totals:
  """Bytes of ``shapes`` in HBM, and in on-chip memory."""
  return _Totals(
    sum(s.nbytes for s in shapes if s.memory_space == _HBM),
    sum(s.nbytes for s in shapes if s.memory_space not in (_HBM, _HOST)),
  )


def _ints(text: str | None) -> list[int]:
  return [int(t) for t in re.findall(r'\d+', text or '')]


def _window(text: str | None, rank: int) -> dict[str, list[int]]:
  """Per spatial dimension: stride, low padding, lhs (base) and rhs (window) dilation."""
  fields = dict(re.findall(r'(\w+)=([\dx_\-]+)', text or ''))

  def per_dim(key: str, default: int) -> list[int]:
    return [int(v) for v in fields[key].split('x')] if key in fields else [default] * rank

  pad_low = (
    [int(p.split('_')[0]) for p in fields['pad'].split('x')] if 'pad' in fields else [0] * rank
  )
  return {
    'stride': per_dim('stride', 1),
    'pad_low': pad_low,
    'lhs_dilate': per_dim('lhs_dilate', 1),
    'rhs_dilate': per_dim('rhs_dilate', 1),
  }


def _valid_taps(size: int, out: int, window: int, stride: int, pad_low: int, lhs: int, rhs: int):
  """Sum over output positions of the window taps that land on an input element (not on
  padding or between the elements of a base-dilated input)."""
  position = np.arange(out)[:, None] * stride + np.arange(window)[None, :] * rhs - pad_low
  valid = (position >= 0) & (position <= (size - 1) * lhs) & (position % lhs == 0)
  return int(valid.sum())


def _conv_flops(
  lhs: ArrayShape, kernel: ArrayShape, out: ArrayShape, dim_labels: str, window: str | None
) -> float:
  """2 x multiply-adds of a convolution, counting only the taps that meet input elements.

  Per output element the contraction is the kernel's input features (input features /
  feature_group_count; all of them when batch_group_count > 1, the output batch then being
  the input batch / batch_group_count) times the window taps on real input. Without padding
  or dilation this is the dense count 2 x output elements x kernel spatial size x kernel
  input features.
  """
  lhs_labels, rest = dim_labels.split('_', 1)
  kernel_labels, out_labels = rest.split('->')
  spatial = sorted(c for c in out_labels if c.isdigit())
  w = _window(window, len(spatial))
  taps = 1
  for i, d in enumerate(spatial):
    taps *= _valid_taps(
      lhs.dims[lhs_labels.index(d)],
      out.dims[out_labels.index(d)],
      kernel.dims[kernel_labels.index(d)],
      w['stride'][i],
      w['pad_low'][i],
      w['lhs_dilate'][i],
      w['rhs_dilate'][i],
    )
  per_position = out.dims[out_labels.index('b')] * out.dims[out_labels.index('f')]
  return 2.0 * per_position * kernel.dims[kernel_labels.index('i')] * taps


class _Counter:
  """Walks a parsed module once per computation (memoised)."""

  def __init__(self, computations: dict[str, list[Instruction]], costs: CustomCallCosts | None):
    self.computations = computations
    self.costs = dict(costs or {})
    self.shapes = {i.name: i.shape for insts in computations.values() for i in insts}
    self.unpriced: list[str] = []
    self.unknown_trip_counts = 0
    self._flops_memo: dict[str, float] = {}
    self._top_memo: dict[str, _Totals] = {}
    self._traffic_memo: dict[str, _Totals] = {}

  def operand_shapes(self, instruction: Instruction) -> list[tuple[ArrayShape, ...]]:
    return [self.shapes.get(o, ()) for o in instruction.operands]

  def trip_count(self, instruction: Instruction) -> int:
    n = instruction.attr(r'"known_trip_count":\{"n":"(\d+)"\}')
    if n is None:
      self.unknown_trip_counts += 1
      return 1
    return int(n)

  @staticmethod
  def conv_attrs(instruction: Instruction) -> tuple[str, str | None]:
    labels = instruction.attr(r'dim_labels=([\w>\-]+)')
    if labels is None:
      raise ValueError(f'convolution {instruction.name} has no dim_labels')
    return labels, instruction.attr(r'window=\{([^}]*)\}')

  # -- FLOPs of dots and convolutions, fusion bodies included.
  def instruction_flops(self, instruction: Instruction) -> float:
    op = instruction.opcode
    if op == 'dot':
      lhs = self.operand_shapes(instruction)[0][0]
      contracting = _ints(instruction.attr(r'lhs_contracting_dims=\{([^}]*)\}'))
      return 2.0 * instruction.shape[0].size * math.prod(lhs.dims[i] for i in contracting)
    if op == 'convolution':
      lhs, kernel = (shapes[0] for shapes in self.operand_shapes(instruction)[:2])
      return _conv_flops(lhs, kernel, instruction.shape[0], *self.conv_attrs(instruction))
    if op == 'custom-call':
      target = instruction.attr(r'custom_call_target="([^"]*)"') or ''
      operands = self.operand_shapes(instruction)
      if target.startswith(CUBLAS):
        lhs = operands[0][0]
        contracting = _ints(instruction.attr(r'"lhs_contracting_dimensions":\[([^\]]*)\]'))
        return 2.0 * instruction.shape[0].size * math.prod(lhs.dims[i] for i in contracting)
      if target.startswith(CUDNN_CONV):
        # The attributes describe the forward convolution: x (lhs) * kernel -> y.
        result = instruction.shape[0]
        if 'BackwardInput' in target:  # operands: dy, kernel; result: dx
          lhs, kernel, out = result, operands[1][0], operands[0][0]
        elif 'BackwardFilter' in target:  # operands: x, dy; result: dkernel
          lhs, kernel, out = operands[0][0], result, operands[1][0]
        else:  # Forward, BiasActivationForward, ...: operands x, kernel, ...; result y
          lhs, kernel, out = operands[0][0], operands[1][0], result
        return _conv_flops(lhs, kernel, out, *self.conv_attrs(instruction))
    return 0.0

  def computation_flops(self, name: str) -> float:
    if name not in self._flops_memo:
      self._flops_memo[name] = 0.0  # a cycle would be a malformed module; count it once
      total = 0.0
      for instruction in self.computations.get(name, []):
        total += self.instruction_flops(instruction)
        called = instruction.called()
        if instruction.opcode == 'conditional':
          total += max((self.computation_flops(c) for c in called), default=0.0)
        else:
          repeat = 1
          if instruction.opcode == 'while':
            repeat = int(instruction.attr(r'"known_trip_count":\{"n":"(\d+)"\}') or 1)
          total += repeat * sum(self.computation_flops(c) for c in called)
      self._flops_memo[name] = total
    return self._flops_memo[name]

  # -- HBM traffic of the computations that run at top level.
  def custom_call(self, instruction: Instruction) -> CustomCall:
    return CustomCall(
      name=instruction.name,
      target=instruction.attr(r'custom_call_target="([^"]*)"') or '',
      op_name=instruction.attr(r'op_name="([^"]*)"') or '',
      operands=tuple(s for shapes in self.operand_shapes(instruction) for s in shapes),
      results=instruction.shape,
    )

  def custom_call_cost(self, instruction: Instruction) -> _Totals | None:
    call = self.custom_call(instruction)
    target, op_name = call.target, call.op_name
    for key, cost in self.costs.items():
      if key == target or key in instruction.name or key in op_name:
        if callable(cost):
          cost = cost(call)
        flops = float(cost.flops)
        executed = flops
        if target == _MOSAIC and '"cost_estimate"' in instruction.attrs:
          flops = 0.0  # the kernel's own CostEstimate: libtpu's FLOPs include it already
        padded = getattr(cost, 'padded_flops', None) or {}
        return _Totals(
          hbm_bytes=float(cost.bytes_accessed),
          custom_flops=flops,
          kernel_flops=executed,
          kernel_vector_flops=float(getattr(cost, 'vector_flops', 0.0)),
          kernel_padded_128=float(padded.get(128, executed)),
          kernel_padded_256=float(padded.get(256, executed)),
        )
    return None

  def instruction_traffic(self, instruction: Instruction) -> _Totals:
    if instruction.name not in self._traffic_memo:
      self._traffic_memo[instruction.name] = self._instruction_traffic(instruction)
    return self._traffic_memo[instruction.name]

  def _instruction_traffic(self, instruction: Instruction) -> _Totals:
    op = instruction.opcode
    if op in _NO_TRAFFIC or op.endswith('-update'):
      return _Totals()
    operands = [s for shapes in self.operand_shapes(instruction) for s in shapes]
    if op in _SLICES:  # reads only the slice (the async form's result: (operand), slice, ctx)
      piece = instruction.shape[1 if op.endswith('-start') else 0]
      read = piece._replace(memory_space=operands[0].memory_space if operands else _HBM)
      return _moved([read] if op.endswith('-start') else [read, piece])
    if op == 'dynamic-update-slice':  # in place: reads the update, writes its region
      update = self.operand_shapes(instruction)[1]
      region = [u._replace(memory_space=operands[0].memory_space) for u in update]
      return _moved([*update, *region])
    if op.endswith('-start'):  # async pair: the start reads, the done writes
      return _moved(operands)
    if op.endswith('-done'):
      return _moved(instruction.shape)
    results = instruction.shape
    if op == 'custom-call':
      target = instruction.attr(r'custom_call_target="([^"]*)"') or ''
      if target in _NO_OP_CUSTOM_CALLS:
        return _Totals()
      priced = self.custom_call_cost(instruction)
      if priced is not None:
        return priced
      if library_call(target):
        results = results[:1]
      else:
        self.unpriced.append(f'{instruction.name} ({target})')
    return _moved([*operands, *results])

  def top_level(self, name: str) -> _Totals:
    """Traffic (and custom-call FLOPs) of a computation whose instructions are kernels."""
    if name not in self._top_memo:
      self._top_memo[name] = _Totals()
      total = _Totals()
      for instruction in self.computations.get(name, []):
        if instruction.opcode not in ('while', 'conditional', 'call'):
          total = total.plus(self.instruction_traffic(instruction))
          continue
        called = [self.top_level(c) for c in instruction.called()]
        if instruction.opcode == 'while':  # body and condition, trip count times
          n = self.trip_count(instruction)
          for sub in called:
            total = total.plus(sub, n)
        elif instruction.opcode == 'conditional':
          total = total.plus(max(called, key=lambda t: t.hbm_bytes, default=_Totals()))
        else:
          for sub in called:
            total = total.plus(sub)
      self._top_memo[name] = total
    return self._top_memo[name]

  def entries(self, name: str, times: float = 1.0) -> list[tuple[Instruction, float, _Totals]]:
    """``(instruction, executions, its traffic per execution)`` of every top-level kernel."""
    out = []
    for instruction in self.computations.get(name, []):
      if instruction.opcode not in ('while', 'conditional', 'call'):
        out.append((instruction, times, self.instruction_traffic(instruction)))
        continue
      called = instruction.called()
      if instruction.opcode == 'while':
        n = self.trip_count(instruction)
        for c in called:
          out += self.entries(c, times * n)
      elif instruction.opcode == 'conditional':
        costliest = max(called, key=lambda c: self.top_level(c).hbm_bytes, default=None)
        if costliest is not None:
          out += self.entries(costliest, times)
      else:
        for c in called:
          out += self.entries(c, times)
    return out


def hlo_costs(hlo_text: str, custom_call_costs: CustomCallCosts | None = None) -> dict[str, Any]:
  """HBM traffic and matmul/convolution FLOPs of one device's optimized HLO.

  Args:
    hlo_text: ``compiled.as_text()``.
    custom_call_costs: costs of custom calls (see :data:`CustomCallCosts`).

  Returns:
    ``hbm_bytes`` (operand + result bytes in HBM of every top-level instruction, while
    bodies times their known trip count, the costlier branch of a conditional),
    ``onchip_bytes`` (the same for buffers the compiler placed in on-chip memory, a TPU's
    VMEM: traffic kept out of HBM), ``matmul_flops``
    (2 x output elements x contraction size of every dot and convolution, fusion bodies
    included: elementwise work is not counted), ``custom_call_flops`` (from the costs given,
    less those the compiler counted already: a TPU kernel's own ``CostEstimate``),
    ``kernel_flops`` (every priced custom call's FLOPs), ``kernel_vector_flops`` (the part
    of them on a GPU's CUDA cores), ``kernel_padded_flops`` (``{MXU width: FLOPs}``, what a
    TPU's MXU does for them with its tiles padded; the FLOPs themselves where a price
    gives no padding),
    ``unpriced_custom_calls`` (custom calls with no cost given: their operands and results
    are counted, what they do inside is not), ``unknown_trip_counts`` (while loops counted
    once), ``collectives`` (``{opcode: count}`` of the collectives in the program).
  """
  entry, computations = parse_module(hlo_text)
  counter = _Counter(computations, with_kernel_costs(custom_call_costs))
  top = counter.top_level(entry)
  collectives: dict[str, int] = {}
  for instructions in computations.values():
    for instruction in instructions:
      base = instruction.opcode.removesuffix('-start')
      if base in _COLLECTIVES:
        collectives[base] = collectives.get(base, 0) + 1
  return {
    'hbm_bytes': top.hbm_bytes,
    'onchip_bytes': top.onchip_bytes,
    'matmul_flops': counter.computation_flops(entry),
    'custom_call_flops': top.custom_flops,
    'kernel_flops': top.kernel_flops,
    'kernel_vector_flops': top.kernel_vector_flops,
    'kernel_padded_flops': {128: top.kernel_padded_128, 256: top.kernel_padded_256},
    'unpriced_custom_calls': tuple(counter.unpriced),
    'unknown_trip_counts': counter.unknown_trip_counts,
    'collectives': dict(sorted(collectives.items())),
  }


class InstructionTraffic(NamedTuple):
  """The estimated HBM traffic of one top-level instruction (see :func:`traffic_by_instruction`).

  Attributes:
    name: the HLO instruction's name.
    opcode: its opcode (``fusion``, ``custom-call``, ``copy``, ...).
    op_name: the JAX op path it comes from (``metadata={op_name=...}``), '' if none.
    executions: how many times it runs per program (a while body's trip count).
    hbm_bytes: its HBM traffic over all executions.
  """

  name: str
  opcode: str
  op_name: str
  executions: float
  hbm_bytes: float


def traffic_by_instruction(
  hlo_text: str, custom_call_costs: CustomCallCosts | None = None
) -> list[InstructionTraffic]:
  """The terms of :func:`hlo_costs`'s ``hbm_bytes``, one per top-level instruction, largest
  first: what dominates a program's estimated HBM traffic.

  Args:
    hlo_text: ``compiled.as_text()``.
    custom_call_costs: costs of custom calls (see :data:`CustomCallCosts`).
  """
  entry, computations = parse_module(hlo_text)
  counter = _Counter(computations, with_kernel_costs(custom_call_costs))
  rows = [
    InstructionTraffic(
      instruction.name,
      instruction.opcode,
      instruction.attr(r'op_name="([^"]*)"') or '',
      times,
      times * traffic.hbm_bytes,
    )
    for instruction, times, traffic in counter.entries(entry)
    if traffic.hbm_bytes
  ]
  return sorted(rows, key=lambda r: -r.hbm_bytes)


def custom_calls(hlo_text: str) -> tuple[CustomCall, ...]:
  """The custom calls of a compiled program that do work (kernels and library calls, not
  annotations such as ``Sharding``), in program order, with their shapes.

  Args:
    hlo_text: ``compiled.as_text()``.
  """
  _, computations = parse_module(hlo_text)
  counter = _Counter(computations, {})
  return tuple(
    counter.custom_call(instruction)
    for instructions in computations.values()
    for instruction in instructions
    if instruction.opcode == 'custom-call'
    and instruction.attr(r'custom_call_target="([^"]*)"') not in _NO_OP_CUSTOM_CALLS
  )
