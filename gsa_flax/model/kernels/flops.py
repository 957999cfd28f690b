"""What the kernels multiply: each kernel's dots, read from its traced body or written in
closed form, and the FLOPs they imply on the chip's matrix units.

A kernel's work is listed as :class:`Dot` s, ``[M, K] @ [K, N]`` products with a count
(program instances times loop trips). Three numbers come from such a list:

* **executed** FLOPs, ``2 M K N`` per dot: what the kernel's code asks for, the zeros it
  multiplies included (the TPU kernels' block-diagonal relative tables, padded offset
  lanes; the GPU kernels' power-of-two tiles);
* **padded** FLOPs (TPU, :func:`padded_flops`): what the MXU does for them, each dot's
  operands rounded up to the unit's tiles;
* the part of them on a GPU's CUDA cores (:attr:`Dot.unit` ``'vector'``) rather than its
  tensor cores.

:func:`useful_flops` is the attention's own count, from its definition, the yardstick for
both. :func:`inventory` reads the list from a traced program (``jax.make_jaxpr``), which is
what holds the closed forms of :mod:`~gsa_flax.model.kernels.axial_tpu` and
:mod:`~gsa_flax.model.kernels.axial_gpu` (``kernel_dots``) to the kernels' code.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax.numpy as jnp

from gsa_flax.model.kernels import layout

MATRIX, VECTOR = 'matrix', 'vector'

# A TPU's vector registers hold 8 sublanes of 128 lanes (float32); the MXU is a systolic
# array of ``MXU_WIDTHS`` columns: 128 up to v5 (v5e: four 128x128 MXUs per core), 256
# from v6 (Trillium), as ``jax.experimental.pallas.tpu.TpuInfo.mxu_column_size`` gives.
SUBLANES = 8
MXU_WIDTHS = (128, 256)

# Triton runs a ``tl.dot`` on the tensor cores for 16-bit operands with every dimension
# at least 16; a float32 dot at full precision runs as CUDA-core multiply-adds.
TENSOR_CORE_DTYPES = ('bfloat16', 'float16')
MIN_TENSOR_CORE_DIM = 16


class Dot(NamedTuple):
  """``count`` products ``[m, k] @ [k, n]`` on one kind of unit.

  Attributes:
    m, k, n: the product's rows, contraction and columns.
    count: how many times it runs (program instances x loop trips x batch dims).
    unit: ``'matrix'`` (a TPU's MXU, a GPU's tensor cores) or ``'vector'`` (a GPU's CUDA
      cores: a ``tl.dot`` that the tensor cores cannot take, or multiply-adds written
      elementwise, ``k = 1``).
  """

  m: int
  k: int
  n: int
  count: int
  unit: str = MATRIX

  @property
  def flops(self) -> int:
    return 2 * self.m * self.k * self.n * self.count


def executed_flops(dots: Iterable[Dot], unit: str | None = None) -> int:
  """``2 M K N`` summed over ``dots`` (only those on ``unit`` if given)."""
  return sum(d.flops for d in dots if unit is None or d.unit == unit)


def padded_flops(dots: Iterable[Dot], mxu: int = 128, sublanes: int = SUBLANES) -> int:
  """FLOPs of the matrix-unit dots with their operands rounded up to a TPU's MXU tiles.

  The MXU is weight-stationary: the right operand ``[K, N]`` is pushed into the
  ``mxu x mxu`` array in whole tiles (``K`` and ``N`` padded to ``mxu``), and the left
  operand streams through it in vregs of ``sublanes`` rows (``M`` padded to 8), one
  ``[8, mxu]`` accumulator at a time (``TpuInfo``: accumulators of ``(num_sublanes,
  mxu_column_size)``). A ``[64, 32] @ [32, 8]`` product then costs what a
  ``[64, 128] @ [128, 128]`` one does. Mosaic may pick the other operand as stationary
  for some shapes; this rule is the common case, not a model of its choices.

  Args:
    dots: the kernel's dots (``'vector'`` ones are not counted).
    mxu: the MXU's width: 128 (v2-v5), 256 (v6).
    sublanes: rows of the left operand per push.

  Returns:
    ``2 round(M, 8) round(K, mxu) round(N, mxu)`` summed over the matrix-unit dots.
  """
  up = layout.round_up
  return sum(
    2 * up(d.m, sublanes) * up(d.k, mxu) * up(d.n, mxu) * d.count for d in dots if d.unit == MATRIX
  )


def merged(dots: Iterable[Dot]) -> dict[tuple[int, int, int, str], int]:
  """``{(m, k, n, unit): total count}``: two lists of the same products compare equal."""
  out: dict[tuple[int, int, int, str], int] = collections.Counter()
  for d in dots:
    out[d.m, d.k, d.n, d.unit] += d.count
  return dict(out)


# ------------------------------------------------------------------------------ useful


def neighbour_pairs(length: int, rel_length: int) -> int:
  """(query, key) pairs on a line of ``length`` positions whose offset ``|key - query|``
  is at most ``(rel_length - 1) / 2``: the positions a relative table of ``rel_length``
  reaches (``length**2`` when it covers the line)."""
  r = (rel_length - 1) // 2
  return sum(min(length - 1, x + r) - max(0, x - r) + 1 for x in range(length))


def useful_flops(call: layout.KernelCall, batch: int) -> int:
  """The attention's own FLOPs for one kernel call on ``batch`` images.

  Per line and head, the positional step is logits ``2 d`` and weighted values ``2 e``
  per (query, key) pair that exists (:func:`neighbour_pairs`); its gradient twice that
  (query and embedding gradients; weight and value gradients). Each content product
  (the context ``softmax(K)^T V``, the output ``Q context``) is ``2 N d e`` per head in
  the forward pass and twice that in the backward pass. Not counted: zeros of block-
  diagonal or padded operands, work a kernel repeats (a recomputed column output), the
  softmaxes and other elementwise work.
  """
  step, extras = call.step, call.extras
  pairs = step.lines * neighbour_pairs(step.length, step.rel_length)
  pixels = step.height * step.width
  products = 2 if call.backward else 1
  content = 'context' in extras
  key = call.k_off is not None if not call.backward else 'key_stats' in extras
  positional = 2 * pairs * (step.key_dim + step.value_dim)
  per_head_content = 2 * pixels * step.d * step.e * step.heads
  return batch * products * (positional + per_head_content * (int(content) + int(key)))


# ------------------------------------------------------------------------------ inventory


def inventory(jaxpr) -> list[tuple[str, list[Dot]]]:
  """The dots of every Pallas kernel in a traced program, read from the kernels' bodies.

  Each ``pallas_call``'s body is walked with its loops unrolled by their trip counts and
  every count multiplied by the grid's program instances. A ``dot_general`` is one
  :class:`Dot` (batch dimensions in its count); on a GPU (Triton) it is on the tensor
  cores when its operands are 16-bit floats and every dimension is at least 16, else on
  the CUDA cores. In a Triton kernel a floating-point multiply whose product is added
  or summed (``acc + a * b``, ``sum(a * b)``) is a CUDA-core multiply-add, a ``Dot`` of
  ``k = 1`` over the product's elements (a multiply by a constant is not). A TPU kernel's
  elementwise work runs on its vector unit and is not listed.

  Args:
    jaxpr: a (closed) jaxpr, e.g. from :func:`jax.make_jaxpr`.

  Returns:
    ``(kernel name, dots)`` per ``pallas_call``, in program order.

  Raises:
    ValueError: a kernel has a loop whose trip count the jaxpr does not give.
  """
  calls = []

  def visit(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == 'pallas_call':
        programs = math.prod(int(s) for s in eqn.params['grid_mapping'].grid)
        triton = 'triton' in type(eqn.params['compiler_params']).__module__
        body = []
        _walk(eqn.params['jaxpr'], programs, triton, body)
        calls.append((eqn.params['name'], body))
        continue
      for sub in _subjaxprs(eqn):
        visit(sub)

  visit(getattr(jaxpr, 'jaxpr', jaxpr))
  return calls


def _subjaxprs(eqn):
  for param in eqn.params.values():
    for sub in param if isinstance(param, tuple | list) else (param,):
      inner = getattr(sub, 'jaxpr', sub)
      if hasattr(inner, 'eqns'):
        yield inner


def _walk(jx, times: int, triton: bool, out: list[Dot]) -> None:
  consumers = collections.defaultdict(list)
  for eqn in jx.eqns:
    for v in eqn.invars:
      if not _is_literal(v):
        consumers[v].append(eqn)
  for eqn in jx.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      out.append(_dot(eqn, times, triton))
    elif name == 'mul' and triton and _accumulated(eqn, consumers):
      shape = eqn.outvars[0].aval.shape
      rows = math.prod(shape[:-1]) if shape else 1
      out.append(Dot(rows, 1, shape[-1] if shape else 1, times, VECTOR))
    if name == 'while':
      raise ValueError('a kernel loop without a static trip count; use fori_loop with ints.')
    if name == 'cond':
      branches = []
      for branch in eqn.params['branches']:
        dots: list[Dot] = []
        _walk(branch.jaxpr, times, triton, dots)
        branches.append(dots)
      out.extend(max(branches, key=executed_flops))
      continue
    repeat = times * eqn.params['length'] if name == 'scan' else times
    for sub in _subjaxprs(eqn):
      _walk(sub, repeat, triton, out)


def _is_literal(v) -> bool:
  return type(v).__name__ == 'Literal'


def _accumulated(eqn, consumers) -> bool:
  """A floating-point product of two arrays that is added to or summed."""
  out = eqn.outvars[0]
  if not jnp.issubdtype(out.aval.dtype, jnp.floating):
    return False
  if any(_is_literal(v) for v in eqn.invars):
    return False
  return any(c.primitive.name in ('add', 'reduce_sum') for c in consumers.get(out, ()))


def _dot(eqn, times: int, triton: bool) -> Dot:
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params['dimension_numbers']
  lhs, rhs = (v.aval for v in eqn.invars)
  k = math.prod(lhs.shape[i] for i in lhs_contract)
  m = math.prod(s for i, s in enumerate(lhs.shape) if i not in (*lhs_contract, *lhs_batch))
  n = math.prod(s for i, s in enumerate(rhs.shape) if i not in (*rhs_contract, *rhs_batch))
  count = times * math.prod(lhs.shape[i] for i in lhs_batch)
  unit = MATRIX
  if triton:
    sixteen_bit = all(jnp.dtype(a.dtype).name in TENSOR_CORE_DTYPES for a in (lhs, rhs))
    unit = MATRIX if sixteen_bit and min(m, k, n) >= MIN_TENSOR_CORE_DIM else VECTOR
  return Dot(m, k, n, count, unit)


def scaled(dots: Sequence[Dot], times: int) -> list[Dot]:
  """``dots`` with every count multiplied by ``times`` (e.g. the batch)."""
  return [d._replace(count=d.count * times) for d in dots]
