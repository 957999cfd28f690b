"""Triton (NVIDIA GPU) kernels for one axial step of GSA positional attention.

The same contract as :mod:`gsa_flax.model.kernels.axial_tpu` (one function per direction, the
same optional fused extras, per-program partial sums), laid out for GPUs: one program per
image and group of ``G`` lines (``grid=(batch, lines // G)``), whose blocks are
``[height, G, channels]`` (column step) or ``[G, width, channels]`` (row step) of the
``[batch, height, width, channels]`` arrays, so every input is read from HBM once. A line
lives in registers as power-of-two tiles (``A`` positions padded to ``AP``, masked).

Per line and head the weights stay in registers: the logits are formed in absolute
coordinates against the relative table gathered from the (cache-resident) embeddings,
``w[x, z] = sum_d q[x, d] rel[z - x + c, d]``, then ``w [AP, AP] @ v [AP, e]`` runs on
the tensor cores. The backward pass forms the weight gradient in relative coordinates
(``g[x] . v[x + l - c]``, the values gathered from cache), where the query and embedding
gradients are plain row and column sums, and the value gradient as ``w^T @ g``. The fused
content attention runs one query/key channel at a time (a row of its block-diagonal
``[n*d, n*e]`` context), so no tile grows with the channel counts.

Pallas' Triton backend is used (``pltriton.CompilerParams``): XLA compiles its kernels
for the GPU it targets, ahead of time too. (Mosaic GPU also compiles for the H100, but
its ``pallas_call`` entry point is deprecated in favour of ``plgpu.kernel``'s
warpgroup-level programming.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from gsa_flax.model.kernels import flops, layout
from gsa_flax.model.kernels.layout import AxialStep

F32 = jnp.float32
NEG = -1e30  # stands for -inf where a fully masked row must not produce NaNs
MIN_DOT = 16  # tensor-core dots need every dimension >= 16

# XLA compiles Triton kernels for NVIDIA GPUs from Ampere on; on older ones (T4, V100,
# P100) the einsum ops run instead (:func:`supports`).
MIN_COMPUTE_CAPABILITY = (8, 0)


def supports(compute_capability: str) -> bool:
  """Whether these kernels compile for a GPU of this compute capability
  (``jax.Device.compute_capability``, e.g. ``'7.5'`` for a T4, ``'9.0'`` for an H100)."""
  major, _, minor = str(compute_capability).partition('.')
  return (int(major), int(minor or 0)) >= MIN_COMPUTE_CAPABILITY


def group_size(step: AxialStep) -> int:
  """Lines per program: the largest divisor of the line count that is at most 16.

  Larger groups read the small shared inputs (embeddings, contexts) and write the
  per-program partial sums fewer times; 56 lines give 4 programs per image.
  """
  return max(g for g in range(1, min(16, step.lines) + 1) if step.lines % g == 0)


def _channel_window(channels: int, used: list[tuple[int, int]]) -> tuple[int, int]:
  """``(first, width)``: the block of channels that covers the ``(offset, width)`` used.

  A program then reads only those channels of the array (the row step reads only the
  queries of ``qkv``); all channels when the used span is not an aligned block.
  """
  lo = min(off for off, _ in used)
  width = max(off + w for off, w in used) - lo
  return (lo, width) if lo % width == 0 else (0, channels)


def offset_lanes(step: AxialStep) -> int:
  """Width of the relative rows given to the kernels (the used offsets, unpadded)."""
  return step.used


def _tile(n: int, floor: int = MIN_DOT) -> int:
  return max(floor, layout.next_pow2(n))


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, dtype, *, ta=False, tb=False):
  """``a @ b`` (optionally transposed) on operands of ``dtype``, float32 result."""
  contract = ((0,) if ta else (1,), (1,) if tb else (0,))
  return jax.lax.dot_general(
    a.astype(dtype),
    b.astype(dtype),
    (contract, ((), ())),
    precision=_precision(dtype),
    preferred_element_type=F32,
  )


def _iota(shape, dim):
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _div(x, n):
  return jax.lax.div(x, jnp.int32(n))


def _load(ref, mask):
  return pltriton.load(ref, mask=mask, other=0.0).astype(F32)


class _Line:
  """Indexing of one line of a block: positions along the attended axis, lanes."""

  def __init__(self, step: AxialStep, j):
    self.step, self.j = step, j

  def at(self, ref, pos, lanes):
    return ref.at[pos, self.j, lanes] if self.step.axis == 1 else ref.at[self.j, pos, lanes]

  def lanes(self, start: int, size: int):
    """Lanes ``[start, start + size)``, which may run past the block's channels.

    The loads and stores that use them are masked to the real channels; a start traced
    from the line index keeps the indexer from rejecting the window for its static bounds.
    """
    return pl.ds(self.j * 0 + start, size)


def _row(ref, row, width, limit):
  """Row ``row`` of a small 2-D ref as ``[1, width]`` (lanes >= limit read as 0)."""
  return _load(ref.at[pl.ds(row, 1), pl.ds(0, width)], _iota((1, width), 1) < limit)


def _lane(x, index):
  """Column ``index`` of a ``[rows, lanes]`` tile as ``[rows, 1]``."""
  return jnp.sum(jnp.where(_iota(x.shape, 1) == index, x, 0.0), axis=1, keepdims=True)


def _ctx_row(ref, ch, dvp, dv):
  """Row ``ch`` (one query/key channel) of a ``[n*d, n*e]`` context block, ``[1, dvp]``."""
  return _load(ref.at[pl.ds(ch, 1), pl.ds(0, dvp)], _iota((1, dvp), 1) < dv)


def _add_ctx_row(ref, ch, row, dvp, dv, scale=1.0):
  """``ref[ch] = ref[ch] * scale + row`` on a ``[n*d, n*e]`` partial-result block."""
  window = ref.at[pl.ds(ch, 1), pl.ds(0, dvp)]
  mask = _iota((1, dvp), 1) < dv
  pltriton.store(window, _load(window, mask) * scale + row, mask=mask)


def _zero_rows(ref, rows, dvp, dv):
  def zero(ch, carry):
    window = ref.at[pl.ds(ch, 1), pl.ds(0, dvp)]
    pltriton.store(window, jnp.zeros((1, dvp), F32), mask=_iota((1, dvp), 1) < dv)
    return carry

  jax.lax.fori_loop(0, rows, zero, 0)


def _head_softmax(q, heads, d):
  head = _div(_iota(q.shape, 1), d)
  top = jnp.zeros_like(q)
  for h in range(heads):
    top = jnp.where(head == h, jnp.max(jnp.where(head == h, q, NEG), 1, keepdims=True), top)
  w = jnp.where(head < heads, jnp.exp(q - top), 0.0)
  total = jnp.ones_like(q)
  for h in range(heads):
    total = jnp.where(head == h, jnp.sum(jnp.where(head == h, w, 0.0), 1, keepdims=True), total)
  return w / total


def _head_sum(x, heads, d):
  head = _div(_iota(x.shape, 1), d)
  total = jnp.zeros_like(x)
  for h in range(heads):
    total = jnp.where(head == h, jnp.sum(jnp.where(head == h, x, 0.0), 1, keepdims=True), total)
  return total


def _block_specs(step: AxialStep, g: int, arrays):
  """BlockSpecs for ``(array, kind)`` pairs.

  Kinds: ``'lines'`` (the program's lines of a ``[batch, height, width, channels]``
  array, all channels), ``('lines', width, block)`` (the same for channel block
  ``block`` of ``width`` channels), ``'image'`` (the image's slice of a per-image array),
  ``'program'`` (the program's slice of a ``[batch, programs, ...]`` partial result) or
  ``'shared'`` (the whole array, for every program).
  """
  specs = []
  for array, kind in arrays:
    nd = array.ndim
    if kind == 'lines' or kind[0] == 'lines':
      _, width, c = kind if kind != 'lines' else (None, array.shape[3], 0)
      block = (None, step.height, g, width)
      if step.axis == 2:
        block = (None, g, step.width, width)
      if step.axis == 1:
        index = lambda b, i, c=c: (b, 0, i, c)  # noqa: E731
      else:
        index = lambda b, i, c=c: (b, i, 0, c)  # noqa: E731
      specs.append(pl.BlockSpec(block, index))
    elif kind == 'image':
      specs.append(
        pl.BlockSpec((None, *array.shape[1:]), lambda b, i, nd=nd: (b,) + (0,) * (nd - 1))
      )
    elif kind == 'program':
      specs.append(
        pl.BlockSpec((None, None, *array.shape[2:]), lambda b, i, nd=nd: (b, i) + (0,) * (nd - 2))
      )
    else:
      specs.append(pl.BlockSpec(array.shape, lambda b, i, nd=nd: (0,) * nd))
  return specs


# ------------------------------------------------------------------------------------ costs


def src_window(call: layout.KernelCall, channels: int) -> tuple[int, int]:
  """``(first, width)``: the channels of ``src`` a call's programs read
  (:func:`_channel_window` of the queries, the keys when the call uses them, the values
  when they are not given separately)."""
  step = call.step
  used = [(call.q_off, step.key_dim)]
  if call.k_off is not None and ('key_stats' in call.extras or not call.backward):
    used.append((call.k_off, step.key_dim))
  if 'vals' not in call.extras:
    used.append((call.v_off, step.value_dim))
  return _channel_window(channels, used)


def block_traffic(
  call: layout.KernelCall,
  operands: Sequence[tuple[Sequence[int], int]],
  results: Sequence[tuple[Sequence[int], int]],
) -> list[int]:
  """HBM bytes each operand and result of a call moves, from the grid and the blocks.

  ``grid=(batch, lines // G)``: a ``[batch, height, width, channels]`` array (rank 4)
  moves once, ``src`` only in the channels the call reads (:func:`src_window`); a
  per-image array (rank 3: contexts, key statistics) is read by each of the image's
  programs; a shared array (rank 2) by every program. Results are written once.

  Args:
    call: the call.
    operands, results: ``(shape, itemsize)`` of each, as the call sees them (one device's
      share of the batch).

  Returns:
    Bytes per operand, then per result.
  """
  batch = results[0][0][0]
  per_image = call.step.lines // group_size(call.step)
  out = []
  for i, (shape, itemsize) in enumerate(operands):
    size = math.prod(shape) * itemsize
    if len(shape) == 4 and i == 0:
      size = size // shape[-1] * src_window(call, shape[-1])[1]
    elif len(shape) == 3:
      size *= per_image
    elif len(shape) == 2:
      size *= batch * per_image
    out.append(size)
  return out + [math.prod(shape) * itemsize for shape, itemsize in results]


def kernel_dots(call: layout.KernelCall, batch: int, tensor_cores: bool = True) -> list[flops.Dot]:
  """The products of a call on ``batch`` images, as the kernel's code writes them.

  Per line of ``A`` positions in tiles of ``AP`` (masked lanes included), with ``d_v``
  padded to ``DVP`` (a power of two) and ``LP`` the used offsets padded, per head: the
  logits as ``d`` CUDA-core multiply-add passes over ``[AP, AP]`` and ``w @ v``,
  ``[AP, AP] @ [AP, DVP]``, on the tensor cores (``tensor_cores``: 16-bit operands, else
  on the CUDA cores too); in the backward pass also the value gradient ``w^T g`` (tensor
  cores), the weight gradient in relative coordinates (``e`` passes over ``[AP, LP]``),
  the query and embedding gradients (``2 d`` passes over ``[AP, LP]``) and, with the
  softmax, the relative logits (``d`` passes) and ``w @ v`` again. Each fused content
  product runs one channel at a time (``d_k`` passes over ``[AP, DVP]``), as do the
  small per-line multiply-adds of the extras (the affine maps on load, the statistics'
  sums of squares, the online key softmax's rescaling). See
  :func:`gsa_flax.model.kernels.flops.inventory` for what counts as a multiply-add.
  """
  step, extras = call.step, call.extras
  ap, lp = _tile(step.length), layout.next_pow2(step.used)
  dk, n, e = step.key_dim, step.heads, step.e
  dkp, dvp = _tile(dk), _tile(step.value_dim)
  vec, tc = flops.VECTOR, flops.MATRIX if tensor_cores else flops.VECTOR
  Dot = flops.Dot
  content = 'context' in extras
  key = call.k_off is not None if not call.backward else 'key_stats' in extras
  affine = 'affine' in extras
  line = [Dot(ap, 1, ap, dk, vec), Dot(ap, ap, dvp, n, tc)]  # logits; w @ v (backward: w^T g)
  if call.backward:
    line.append(Dot(ap, 1, lp, n * e * (1 + int(affine)) + 2 * dk, vec))
    if step.softmax:
      line += [Dot(ap, 1, lp, dk, vec), Dot(ap, ap, dvp, n, tc), Dot(ap, 1, dvp, n, vec)]
    # The affine values of the line are only read by the softmax's w @ v and the key
    # softmax's gradient (the weight gradient gathers its own): without them, dead code.
    used_v = step.softmax or key
    per_line = 2 * int('grad_affine' in extras) + int(affine and used_v)
    per_line += int('bn_sums' in extras)
    per_line += 2 * dk * (int(content) + int(key))
    line.append(Dot(ap, 1, dvp, per_line, vec))
    if content and 'normalize_queries' in extras:
      line.append(Dot(ap, 1, dkp, 1, vec))
  else:
    per_line = int(affine) + int('stats' in extras) + dk * (int(content) + int(key))
    line.append(Dot(ap, 1, dvp, per_line, vec))
    if key:  # the online softmax's running sum and the context rows' rescaling
      line += [Dot(1, 1, dkp, 1, vec), Dot(1, 1, dvp, dk, vec)]
  return flops.scaled([d for d in line if d.count], batch * step.lines)


def compute_cost(call: layout.KernelCall, batch: int) -> tuple[int, int]:
  """``(flops, transcendentals)`` of a call on ``batch`` images, as the kernel executes them.

  FLOPs: ``2 M K N`` of each of :func:`kernel_dots` (tensor-core dots and CUDA-core
  multiply-adds); other elementwise work is not counted. Transcendentals as
  :func:`gsa_flax.model.kernels.axial_tpu.compute_cost`, over the padded tiles.
  """
  step, extras = call.step, call.extras
  ap, lp = _tile(step.length), layout.next_pow2(step.used)
  dk, n = step.key_dim, step.heads
  content = 'context' in extras
  key = call.k_off is not None if not call.backward else 'key_stats' in extras
  exps = n * ap * ap * int(step.softmax) + ap * _tile(dk) * int(key)
  exps += ap * _tile(dk) * int(content and 'normalize_queries' in extras)
  if call.backward and step.softmax:
    exps += n * ap * lp
  return flops.executed_flops(kernel_dots(call, batch)), batch * step.lines * exps


def _call(step, kernel, inputs, outputs, interpret, call: layout.KernelCall):
  """``pallas_call`` over ``grid=(batch, line groups)``; ``inputs``/``outputs``: ``(array,
  kind)``. Under a sharded ``jax.jit`` each device runs the kernel on its images
  (:func:`layout.batch_partitioned`). The call is named after ``call`` and carries its
  cost (:func:`block_traffic`, :func:`compute_cost`)."""
  g = group_size(step)

  def run(*arrays):
    batch = arrays[0].shape[0]
    out_shape = [jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype) for a, _ in outputs]
    sizes = [(a.shape, jnp.dtype(a.dtype).itemsize) for a in [*arrays, *out_shape]]
    flops, exps = compute_cost(call, batch)
    cost = pl.CostEstimate(
      flops=flops,
      transcendentals=exps,
      bytes_accessed=sum(block_traffic(call, sizes[: len(arrays)], sizes[len(arrays) :])),
    )
    return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(batch, step.lines // g),
      in_specs=_block_specs(step, g, inputs),
      out_specs=_block_specs(step, g, outputs),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name=call.name,
      cost_estimate=cost,
    )(*arrays)

  arrays = [a for a, _ in inputs]
  return layout.batch_partitioned(
    run,
    [a.ndim for a in arrays],
    [kind != 'shared' for _, kind in inputs],
    [a.ndim for a, _ in outputs],
  )(*arrays)


class _Geometry:
  """Masks and gather indices of one line, shared by every line of a program."""

  def __init__(self, step: AxialStep):
    a = step.length
    self.ap = _tile(a)
    self.lp = layout.next_pow2(step.used)
    x = _iota((self.ap, self.ap), 0)
    z = _iota((self.ap, self.ap), 1)
    offset = z - x + step.center
    self.rows = _iota((self.ap, 1), 0) < a
    self.valid = (z < a) & (x < a) & (offset >= 0) & (offset < step.used)
    self.offset = jnp.clip(offset, 0, step.used - 1)
    xr = _iota((self.ap, self.lp), 0)
    lr = _iota((self.ap, self.lp), 1)
    key = xr + lr - step.center
    self.valid_rel = (xr < a) & (lr < step.used) & (key >= 0) & (key < a)
    self.key = jnp.clip(key, 0, a - 1)


def _weights(logits, geo: _Geometry, softmax: bool):
  """Absolute logits ``[AP, AP]`` -> weights, and the softmax's row max and sum."""
  if not softmax:
    return jnp.where(geo.valid, logits, 0.0), None, None
  logits = jnp.where(geo.valid, logits, NEG)
  top = jnp.max(logits, axis=1, keepdims=True)
  w = jnp.where(geo.valid, jnp.exp(logits - top), 0.0)
  total = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-30)
  return w / total, top, total


def _qcol(r, line, geo, q_off, ch):
  """Query channel ``ch`` of the line, ``[AP, 1]``."""
  return _load(line.at(r['src'], pl.ds(0, geo.ap), pl.ds(q_off + ch, 1)), geo.rows)


def _head_logits(r, line, step, geo, q_off, h, *, relative=False):
  """Absolute logits of head ``h`` ``[AP, AP]`` (and, if ``relative``, ``[AP, LP]``)."""

  def channel(dd, acc):
    ch = h * step.d + dd
    qc = _qcol(r, line, geo, q_off, ch)
    table = _load(r['rel_t'].at[ch, geo.offset], geo.valid)
    acc = dict(acc, logits=acc['logits'] + qc * table)
    if relative:
      acc['rel'] = acc['rel'] + qc * _row(r['rel_t'], ch, geo.lp, step.used)
    return acc

  init = {'logits': jnp.zeros((geo.ap, geo.ap), F32)}
  if relative:
    init['rel'] = jnp.zeros((geo.ap, geo.lp), F32)
  return jax.lax.fori_loop(0, step.d, channel, init)


# ----------------------------------------------------------------------------------- forward


def forward(
  step: AxialStep,
  src: jax.Array,
  rel_t: jax.Array,
  *,
  q_off: int,
  v_off: int | None = None,
  vals: jax.Array | None = None,
  affine: jax.Array | None = None,
  k_off: int | None = None,
  context: jax.Array | None = None,
  normalize_queries: bool = False,
  stats: bool = False,
  compute_dtype=None,
  interpret: bool = False,
) -> dict[str, jax.Array]:
  """One axial step forward; see :func:`gsa_flax.model.kernels.axial_tpu.forward`.

  Arrays are ``[batch, height, width, channels]`` here (``src``, ``vals`` and the
  output); ``rel_t`` is ``[n*d, used]``; partial results are ``[batch, programs, ...]``.
  """
  batch = src.shape[0]
  dk, dv = step.key_dim, step.value_dim
  g = group_size(step)
  programs = step.lines // g
  cdt = compute_dtype or src.dtype
  out_dtype = (vals if vals is not None else src).dtype
  dkp, dvp = _tile(dk), _tile(dv)
  call = layout.KernelCall.of(
    step, False, q_off, k_off, v_off,
    vals=vals, affine=affine, context=context, normalize_queries=normalize_queries, stats=stats,
  )  # fmt: skip
  first, block_ch = src_window(call, src.shape[3])
  q_off, k_off, v_off = (None if o is None else o - first for o in (q_off, k_off, v_off))
  inputs = [(src, ('lines', block_ch, first // block_ch)), (rel_t, 'shared')]
  names = ['src', 'rel_t']
  for name, array, kind in (
    ('vals', vals, 'lines'),
    ('affine', affine, 'shared'),
    ('context', context, 'image'),
  ):
    if array is not None:
      inputs.append((array, kind))
      names.append(name)
  outputs = [(jax.ShapeDtypeStruct((batch, step.height, step.width, dv), out_dtype), 'lines')]
  out_names = ['out']

  def partial(name, shape):
    outputs.append((jax.ShapeDtypeStruct((batch, programs, *shape), F32), 'program'))
    out_names.append(name)

  if stats:
    partial('stats', (2, dv))
  if k_off is not None:
    partial('m', (1, dk))
    partial('s', (1, dk))
    partial('ctx', (dk, dv))

  def kernel(*refs):
    r = dict(zip(names + out_names, refs, strict=True))
    geo = _Geometry(step)
    vl = _iota((1, dvp), 1)
    kl = _iota((1, dkp), 1)
    lane_head = _div(vl, step.e)
    if affine is not None:
      scale, shift = _row(r['affine'], 0, dvp, dv), _row(r['affine'], 1, dvp, dv)
    v_src, v_base = ('vals', 0) if vals is not None else ('src', v_off)
    mask_v = geo.rows & (vl < dv)
    mask_k = geo.rows & (kl < dk)
    same_head = lambda ch: lane_head == _div(ch, step.d)  # noqa: E731

    def line_fn(j, carry):
      line = _Line(step, j)
      v = _load(line.at(r[v_src], pl.ds(0, geo.ap), line.lanes(v_base, dvp)), mask_v)
      if affine is not None:
        v = jnp.where(mask_v, v * scale + shift, 0.0)

      def head(h, out):
        logits = _head_logits(r, line, step, geo, q_off, h)['logits']
        w, _, _ = _weights(logits, geo, step.softmax)
        return jnp.where(lane_head == h, _dot(w, v, cdt), out)

      out = jax.lax.fori_loop(0, step.heads, head, jnp.zeros((geo.ap, dvp), F32))
      if context is not None:
        q = _load(line.at(r['src'], pl.ds(0, geo.ap), line.lanes(q_off, dkp)), mask_k)
        if normalize_queries:
          q = _head_softmax(q, step.heads, step.d)
        # Content output q @ context, one query channel (a row of the context) at a time.
        out = jax.lax.fori_loop(
          0, dk, lambda ch, o: o + _lane(q, ch) * _ctx_row(r['context'], ch, dvp, dv), out
        )
      out = out.astype(out_dtype)
      pltriton.store(line.at(r['out'], pl.ds(0, geo.ap), pl.ds(0, dvp)), out, mask=mask_v)
      carry = dict(carry)
      if stats:
        rounded = jnp.where(mask_v, out.astype(F32), 0.0)
        carry['s1'] = carry['s1'] + jnp.sum(rounded, 0, keepdims=True)
        carry['s2'] = carry['s2'] + jnp.sum(rounded * rounded, 0, keepdims=True)
      if k_off is not None:
        k = _load(line.at(r['src'], pl.ds(0, geo.ap), line.lanes(k_off, dkp)), mask_k)
        k = jnp.where(mask_k, k, NEG)
        top = jnp.maximum(carry['m'], jnp.max(k, axis=0, keepdims=True))
        alpha = jnp.exp(carry['m'] - top)
        p = jnp.where(mask_k, jnp.exp(k - top), 0.0)
        carry['m'] = top
        carry['s'] = carry['s'] * alpha + jnp.sum(p, 0, keepdims=True)

        def key_channel(ch, c):
          row = jnp.where(same_head(ch), jnp.sum(_lane(p, ch) * v, 0, keepdims=True), 0.0)
          _add_ctx_row(r['ctx'], ch, row, dvp, dv, _lane(alpha, ch))
          return c

        jax.lax.fori_loop(0, dk, key_channel, 0)
      return carry

    init = {}
    if stats:
      init['s1'] = init['s2'] = jnp.zeros((1, dvp), F32)
    if k_off is not None:
      init['m'] = jnp.full((1, dkp), NEG, F32)
      init['s'] = jnp.zeros((1, dkp), F32)
      _zero_rows(r['ctx'], dk, dvp, dv)
    acc = jax.lax.fori_loop(0, g, line_fn, init)
    if stats:
      both = jnp.where(_iota((2, dvp), 0) == 0, acc['s1'], acc['s2'])
      pltriton.store(
        r['stats'].at[pl.ds(0, 2), pl.ds(0, dvp)], both, mask=(_iota((2, 1), 0) < 2) & (vl < dv)
      )
    if k_off is not None:
      pltriton.store(r['m'].at[pl.ds(0, 1), pl.ds(0, dkp)], acc['m'], mask=kl < dk)
      pltriton.store(r['s'].at[pl.ds(0, 1), pl.ds(0, dkp)], acc['s'], mask=kl < dk)

  results = _call(step, kernel, inputs, outputs, interpret, call)
  return dict(zip(out_names, results, strict=True))


# ---------------------------------------------------------------------------------- backward


def backward(
  step: AxialStep,
  src: jax.Array,
  rel_t: jax.Array,
  grad: jax.Array,
  *,
  q_off: int,
  v_off: int | None = None,
  k_off: int | None = None,
  vals: jax.Array | None = None,
  affine: jax.Array | None = None,
  grad_affine: jax.Array | None = None,
  grad_y: jax.Array | None = None,
  context: jax.Array | None = None,
  normalize_queries: bool = False,
  key_stats: jax.Array | None = None,
  dcontext: jax.Array | None = None,
  dq_in: jax.Array | None = None,
  bn_sums: bool = False,
  packed: bool = False,
  compute_dtype=None,
  interpret: bool = False,
) -> dict[str, jax.Array]:
  """The gradient of :func:`forward`; see :func:`gsa_flax.model.kernels.axial_tpu.backward`."""
  batch, height, width, src_ch = src.shape
  dk, dv = step.key_dim, step.value_dim
  g = group_size(step)
  programs = step.lines // g
  cdt = compute_dtype or src.dtype
  vals_dtype = (vals if vals is not None else src).dtype
  dkp, dvp = _tile(dk), _tile(dv)
  call = layout.KernelCall.of(
    step, True, q_off, k_off, v_off,
    vals=vals, affine=affine, grad_affine=grad_affine, grad_y=grad_y, context=context,
    normalize_queries=normalize_queries, key_stats=key_stats, dcontext=dcontext, dq_in=dq_in,
    bn_sums=bn_sums, packed=packed,
  )  # fmt: skip
  first, block_ch = src_window(call, src_ch)
  # Offsets of the channels read, in the program's channel block of src.
  rq, rk, rv = (None if o is None else o - first for o in (q_off, k_off, v_off))
  inputs = [(src, ('lines', block_ch, first // block_ch)), (rel_t, 'shared'), (grad, 'lines')]
  names = ['src', 'rel_t', 'grad']
  for name, array, kind in (
    ('vals', vals, 'lines'),
    ('affine', affine, 'shared'),
    ('grad_affine', grad_affine, 'shared'),
    ('grad_y', grad_y, 'lines'),
    ('context', context, 'image'),
    ('key_stats', key_stats, 'image'),
    ('dcontext', dcontext, 'image'),
    ('dq_in', dq_in, 'lines'),
  ):
    if array is not None:
      inputs.append((array, kind))
      names.append(name)
  outputs, out_names = [], []

  def out(name, shape, dtype, kind):
    outputs.append((jax.ShapeDtypeStruct(shape, dtype), kind))
    out_names.append(name)

  lp = layout.next_pow2(step.used)
  out('drel', (batch, programs, dk, step.used), F32, 'program')
  if packed:
    out('dsrc', src.shape, src.dtype, 'lines')
  else:
    out('dq', (batch, height, width, dk), src.dtype, 'lines')
    out('dvals', (batch, height, width, dv), vals_dtype, 'lines')
  if bn_sums:
    out('sums', (batch, programs, 2, dv), F32, 'program')
  if context is not None:
    out('dctx', (batch, programs, dk, dv), F32, 'program')

  def kernel(*refs):
    r = dict(zip(names + out_names, refs, strict=True))
    geo = _Geometry(step)
    vl = _iota((1, dvp), 1)
    kl = _iota((1, dkp), 1)
    lane_head = _div(vl, step.e)
    mask_v = geo.rows & (vl < dv)
    mask_k = geo.rows & (kl < dk)
    kr = _iota((dkp, 1), 0)
    lr = _iota((1, lp), 1)
    if affine is not None:
      scale, shift = _row(r['affine'], 0, dvp, dv), _row(r['affine'], 1, dvp, dv)
    if grad_affine is not None:
      ga = [_row(r['grad_affine'], i, dvp, dv) for i in range(3)]
    if key_stats is not None:
      ks = [_row(r['key_stats'], i, dkp, dk) for i in range(3)]
    same_head = lambda ch: lane_head == _div(ch, step.d)  # noqa: E731
    v_src, v_base = ('vals', 0) if vals is not None else ('src', rv)

    def line_fn(j, carry):
      line = _Line(step, j)
      pos = pl.ds(0, geo.ap)
      gr = _load(line.at(r['grad'], pos, pl.ds(0, dvp)), mask_v)
      if grad_affine is not None:
        y = _load(line.at(r['grad_y'], pos, pl.ds(0, dvp)), mask_v)
        gr = jnp.where(mask_v, ga[0] * gr + ga[1] * y + ga[2], 0.0)
      raw = _load(line.at(r[v_src], pos, line.lanes(v_base, dvp)), mask_v)
      v = jnp.where(mask_v, raw * scale + shift, 0.0) if affine is not None else raw

      def head(h, acc):
        dq, dvals, drel = acc
        logits = _head_logits(r, line, step, geo, rq, h, relative=step.softmax)
        w, top, total = _weights(logits['logits'], geo, step.softmax)
        gh = jnp.where(lane_head == h, gr, 0.0)
        dvals = dvals + _dot(w, gh, cdt, ta=True)

        # The weights' gradient in relative coordinates: g[x] . v[x + l - c].
        def value_channel(ee, dw):
          ch = h * step.e + ee
          vg = _load(line.at(r[v_src], geo.key, v_base + ch), geo.valid_rel)
          if affine is not None:
            vg = vg * _lane(scale, ch) + _lane(shift, ch)
          return dw + _lane(gr, ch) * vg

        dw = jax.lax.fori_loop(0, step.e, value_channel, jnp.zeros((geo.ap, geo.lp), F32))
        dw = jnp.where(geo.valid_rel, dw, 0.0)
        if step.softmax:
          wrel = jnp.where(geo.valid_rel, jnp.exp(logits['rel'] - top) / total, 0.0)
          out_h = jnp.where(lane_head == h, _dot(w, v, cdt), 0.0)
          dw = wrel * (dw - jnp.sum(gh * out_h, axis=1, keepdims=True))

        def key_channel(dd, acc):
          dq, drel = acc
          ch = h * step.d + dd
          rel_row = _row(r['rel_t'], ch, geo.lp, step.used)
          dq = jnp.where(kl == ch, jnp.sum(dw * rel_row, 1, keepdims=True), dq)
          qc = _qcol(r, line, geo, rq, ch)
          drel = jnp.where(kr == ch, jnp.sum(dw * qc, 0, keepdims=True), 0.0) + drel
          return dq, drel

        dq, drel = jax.lax.fori_loop(0, step.d, key_channel, (dq, drel))
        return dq, dvals, drel

      init = (jnp.zeros((geo.ap, dkp), F32), jnp.zeros((geo.ap, dvp), F32), carry['drel'])
      dq, dvals, drel = jax.lax.fori_loop(0, step.heads, head, init)
      carry = dict(carry, drel=drel)
      if context is not None or key_stats is not None:
        q = _load(line.at(r['src'], pos, line.lanes(rq, dkp)), mask_k)
      if context is not None:
        if normalize_queries:
          q = _head_softmax(q, step.heads, step.d)

        # Per query channel: the context gradient q^T g and the query gradient g . ctx.
        def query_channel(ch, dqc):
          row = jnp.where(same_head(ch), jnp.sum(_lane(q, ch) * gr, 0, keepdims=True), 0.0)
          _add_ctx_row(r['dctx'], ch, row, dvp, dv)
          crow = _ctx_row(r['context'], ch, dvp, dv)
          return jnp.where(kl == ch, jnp.sum(gr * crow, 1, keepdims=True), dqc)

        dqc = jax.lax.fori_loop(0, dk, query_channel, jnp.zeros((geo.ap, dkp), F32))
        if normalize_queries:
          dqc = q * (dqc - _head_sum(q * dqc, step.heads, step.d))
        dq = dq + dqc
      if dq_in is not None:
        dq = dq + _load(line.at(r['dq_in'], pos, pl.ds(0, dkp)), mask_k)
      if bn_sums:
        carry['s1'] = carry['s1'] + jnp.sum(dvals, 0, keepdims=True)
        carry['s2'] = carry['s2'] + jnp.sum(dvals * raw, 0, keepdims=True)
      if key_stats is not None:
        k = _load(line.at(r['src'], pos, line.lanes(rk, dkp)), mask_k)
        p = jnp.where(mask_k, jnp.exp(k - ks[0]) / ks[1], 0.0)

        # Per key channel: through the key softmax, and the values' content gradient.
        def key_channel(ch, acc):
          dkeys, dvals = acc
          drow = _ctx_row(r['dcontext'], ch, dvp, dv)
          pc = _lane(p, ch)
          dp = jnp.sum(v * drow, 1, keepdims=True)
          dkeys = jnp.where(kl == ch, pc * (dp - _lane(ks[2], ch)), dkeys)
          return dkeys, dvals + pc * drow

        dkeys, dvals = jax.lax.fori_loop(0, dk, key_channel, (jnp.zeros_like(p), dvals))
      if packed:
        parts = [(q_off, dq, mask_k), (v_off, dvals, mask_v)]
        if key_stats is not None:
          parts.append((k_off, dkeys, mask_k))
        elif k_off is not None:
          parts.append((k_off, jnp.zeros_like(dq), mask_k))
        for off, part, mask in parts:
          pltriton.store(
            line.at(r['dsrc'], pos, line.lanes(off, part.shape[1])),
            part.astype(src.dtype),
            mask=mask,
          )
      else:
        pltriton.store(line.at(r['dq'], pos, pl.ds(0, dkp)), dq.astype(src.dtype), mask=mask_k)
        pltriton.store(
          line.at(r['dvals'], pos, pl.ds(0, dvp)), dvals.astype(vals_dtype), mask=mask_v
        )
      return carry

    init = {'drel': jnp.zeros((dkp, lp), F32)}
    if bn_sums:
      init['s1'] = init['s2'] = jnp.zeros((1, dvp), F32)
    if context is not None:
      _zero_rows(r['dctx'], dk, dvp, dv)
    acc = jax.lax.fori_loop(0, g, line_fn, init)
    pltriton.store(
      r['drel'].at[pl.ds(0, dkp), pl.ds(0, lp)], acc['drel'], mask=(kr < dk) & (lr < step.used)
    )
    if bn_sums:
      both = jnp.where(_iota((2, dvp), 0) == 0, acc['s1'], acc['s2'])
      pltriton.store(
        r['sums'].at[pl.ds(0, 2), pl.ds(0, dvp)], both, mask=(_iota((2, 1), 0) < 2) & (vl < dv)
      )

  results = _call(step, kernel, inputs, outputs, interpret, call)
  return dict(zip(out_names, results, strict=True))
