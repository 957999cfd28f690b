"""A compiled program's optimized HLO text, parsed: array shapes, instructions by
computation, and the custom calls (kernels, library calls).

:mod:`gsa_flax.tools.sizing.traffic` counts a program's HBM traffic and FLOPs from it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from gsa_flax.model.kernels import costs as kernel_costs

# ----------------------------------------------------------------------------- HLO text

# Bits per element of each HLO element type.
_BITS = {
  'pred': 8,
  's1': 1,
  'u1': 1,
  's2': 2,
  'u2': 2,
  's4': 4,
  'u4': 4,
  's8': 8,
  'u8': 8,
  's16': 16,
  'u16': 16,
  'f16': 16,
  'bf16': 16,
  's32': 32,
  'u32': 32,
  'f32': 32,
  's64': 64,
  'u64': 64,
  'f64': 64,
  'c64': 64,
  'c128': 128,
  'token': 0,
  'opaque': 0,
}


def element_bits(dtype: str) -> int:
  if dtype in _BITS:
    return _BITS[dtype]
  match = re.match(r'f(\d+)', dtype)  # f8e4m3fn, f8e5m2, f4e2m1fn, ...
  if match:
    return int(match.group(1))
  raise ValueError(f'unknown HLO element type {dtype!r}')


class ArrayShape(NamedTuple):
  """One array of an HLO shape.

  Attributes:
    dtype: HLO element type (``'bf16'``, ``'f32'``, ...).
    dims: logical dimensions.
    nbytes: bytes the array occupies, padding of the layout's tiling included (a TPU stores
      ``bf16[..., 64]{...:T(8,128)(2,1)}`` padded to 128 in its last dimension).
    memory_space: 0 for HBM; TPUs put small buffers in on-chip memory (``S(1)``, VMEM).
  """

  dtype: str
  dims: tuple[int, ...]
  nbytes: int
  memory_space: int

  @property
  def size(self) -> int:
    """Logical element count."""
    return math.prod(self.dims)


_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([^\]]*)\](?:\{([^}]*)\})?')


def parse_shape(text: str) -> tuple[ArrayShape, ...]:
  """The arrays of an HLO shape string, tuples flattened in order.

  Args:
    text: e.g. ``'bf16[32,56,56,64]{3,2,1,0:T(8,128)(2,1)}'`` or
      ``'(f32[8]{0}, s32[])'``; a missing layout means the default (no tiling).

  Returns:
    One :class:`ArrayShape` per array.
  """
  arrays = []
  for dtype, dims_text, layout in _ARRAY.findall(text):
    dims = tuple(int(d.strip().removeprefix('<=')) for d in dims_text.split(',') if d.strip())
    bits = element_bits(dtype)
    minor_to_major, _, tiling = (layout or '').partition(':')
    physical = list(dims)
    if minor_to_major.strip():
      order = [int(i) for i in minor_to_major.split(',')]
      physical = [dims[i] for i in reversed(order)]  # major to minor
    tile = re.search(r'T\(([^)]*)\)', tiling)
    if tile:
      # The first tile pads the minor-most dimensions to its multiples (leading 1s if the
      # tile has more dimensions than the array); later tiles subdivide it.
      tile_dims = [d.strip() for d in tile.group(1).split(',')]
      physical = [1] * max(0, len(tile_dims) - len(physical)) + physical
      offset = len(physical) - len(tile_dims)
      for i, t in enumerate(tile_dims):
        if t.isdigit() and int(t) > 0:
          physical[offset + i] = -(-physical[offset + i] // int(t)) * int(t)
    element_size = re.search(r'E\((\d+)\)', tiling)
    if element_size:
      bits = int(element_size.group(1))
    space = re.search(r'S\((\d+)\)', tiling)
    arrays.append(
      ArrayShape(
        dtype=dtype,
        dims=dims,
        nbytes=-(-math.prod(physical) * bits // 8),
        memory_space=int(space.group(1)) if space else 0,
      )
    )
  return tuple(arrays)


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  shape: tuple[ArrayShape, ...]
  operands: tuple[str, ...]
  attrs: str

  def attr(self, pattern: str) -> str | None:
    match = re.search(pattern, self.attrs)
    return match.group(1) if match else None

  def called(self) -> list[str]:
    """Names of the computations this instruction calls."""
    names = re.findall(
      r'\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)',
      self.attrs,
    )
    for group in re.findall(
      r'\b(?:branch_computations|called_computations)=\{([^}]*)\}', self.attrs
    ):
      names += re.findall(r'%([\w.\-]+)', group)
    return names


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at ``text[start]``."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in '([{':
      depth += 1
    elif text[i] in ')]}':
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f'unbalanced HLO text: {text[start : start + 80]!r}')


_INSTRUCTION = re.compile(r'^\s+(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$')
_HEADER = re.compile(r'^(ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$')


def _parse_instruction(line: str) -> Instruction | None:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  name, rest = match.groups()
  if rest.startswith('('):
    end = _balanced(rest, 0)
  else:
    end = rest.index(' ')
  shape_text, rest = rest[:end], rest[end:].lstrip()
  opcode_match = re.match(r'([a-z][\w\-]*)\(', rest)
  if not opcode_match:
    return None
  opcode = opcode_match.group(1)
  close = _balanced(rest, opcode_match.end() - 1)
  operands = tuple(dict.fromkeys(re.findall(r'%([\w.\-]+)', rest[opcode_match.end() : close - 1])))
  return Instruction(name, opcode, parse_shape(shape_text), operands, rest[close:])


def parse_module(text: str) -> tuple[str, dict[str, list[Instruction]]]:
  """``(entry name, {computation name: instructions})`` of an HLO module's text."""
  computations: dict[str, list[Instruction]] = {}
  entry = None
  current = None
  for line in text.splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header:
        current = computations.setdefault(header.group(2), [])
        if header.group(1):
          entry = header.group(2)
    elif line.startswith('}'):
      current = None
    else:
      instruction = _parse_instruction(line)
      if instruction is not None:
        current.append(instruction)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text.')
  return entry, computations


# ----------------------------------------------------------------------------- custom calls


@dataclasses.dataclass(frozen=True)
class CustomCallCost:
  """HBM bytes and FLOPs of one execution of a custom call (a Pallas kernel).

  ``pl.CostEstimate`` has the same two attributes and is accepted wherever this is.
  """

  bytes_accessed: float = 0.0
  flops: float = 0.0


@dataclasses.dataclass(frozen=True)
class CustomCall:
  """What a cost function learns about one custom call of the compiled program.

  Attributes:
    name: the HLO instruction's name (a Pallas kernel's ``name=`` on TPU).
    target: ``custom_call_target`` (``'tpu_custom_call'``, ``'mosaic_gpu_v2'``, ...).
    op_name: the JAX op path of the call (``'jit(step)/my_kernel/pallas_call'``).
    operands: the operand arrays.
    results: the result arrays.
  """

  name: str
  target: str
  op_name: str
  operands: tuple[ArrayShape, ...]
  results: tuple[ArrayShape, ...]


CostFn = Callable[[CustomCall], Any]
"""A function of the call's shapes returning its cost (``CustomCallCost``-like)."""

CustomCallCosts = Mapping[str, CustomCallCost | CostFn]
"""Costs of custom calls by key: a key matches a call whose target equals it or whose
instruction name or op_name contains it; the first matching key applies. Where a function
of this module takes them, ``None`` means the project's Pallas kernels
(:func:`gsa_flax.model.kernels.costs.custom_call_costs`) and ``{}`` none."""


def with_kernel_costs(custom_call_costs: CustomCallCosts | None) -> CustomCallCosts:
  if custom_call_costs is None:
    return kernel_costs.custom_call_costs()
  return custom_call_costs


# Library calls whose FLOPs the HLO counter reads from their attributes; their scratch
# buffer (the last result) is not traffic.
CUBLAS = '__cublas$'
CUDNN_CONV = '__cudnn$conv'


def library_call(target: str) -> bool:
  return target.startswith((CUBLAS, CUDNN_CONV))
