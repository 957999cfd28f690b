"""Mosaic (TPU) kernels for one axial step of GSA positional attention, forward and backward.

One program per image (``grid=(batch,)``): every input block is a whole image,
``[height * width, channels]`` with pixels on sublanes and channels on lanes, so each
input is read from HBM once per step. The blocks are staged in float32 VMEM scratch;
the kernel then walks the lines of the step (columns or rows, see
:class:`~gsa_flax.model.kernels.layout.AxialStep`) with strided sublane loads and stores. Per
line and head, on the MXU:

1. logits against every relative offset, ``q [A, n*d] @ R [n*d, n*P]`` (``R`` block
   diagonal over heads, ``P`` lanes of offsets per head);
2. the relative-to-absolute skew on chip: ``pltpu.roll`` with a stride rotates row ``i``
   of the ``[A, P]`` logits by ``i - center`` lanes, so lane ``z`` holds key position ``z``;
   the neighbourhood mask (and the optional softmax) applies there;
3. ``weights [A, P] @ values [P, n*e]``, keeping the lanes of the head.

The per-pixel weights never leave VMEM. The backward pass recomputes them, forms the
weight gradient ``g v^T`` in absolute positions and skews it back to offsets (row ``i`` by
``center - i`` lanes: the same roll between two row reversals, exact permutations on the
MXU), where the query and embedding gradients are GEMMs against ``R`` and ``q``.

Optional extras fuse the rest of the GSA module into the same passes (see
:mod:`gsa_flax.model.kernels.gsa`): a per-channel affine map of the values on load (the
BatchNorm between the steps), BatchNorm statistics of the output, the content
attention's key softmax and context, and their gradients.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gsa_flax.model.kernels import flops, layout
from gsa_flax.model.kernels.layout import AxialStep

LANES = 128

# The strided lane rotations of the skew (``pltpu.roll`` with a stride) exist from TPU v5 on;
# on older chips (v2-v4) the einsum ops run instead (:func:`supports`).
MIN_GENERATION = 5
_GENERATION = re.compile(r'TPU v(\d+)', re.IGNORECASE)


def supports(device_kind: str) -> bool:
  """Whether these kernels compile for a device of this kind (``jax.Device.device_kind``,
  e.g. ``'TPU v5 lite'``); True for kinds that name no TPU generation."""
  match = _GENERATION.search(device_kind)
  return match is None or int(match.group(1)) >= MIN_GENERATION


F32 = jnp.float32


def offset_lanes(step: AxialStep) -> int:
  """Lanes ``P`` given to the offsets of one head: room for every offset and key position."""
  return layout.round_up(max(step.used, step.length), LANES)


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, contract, dtype):
  """``dot_general`` on MXU operands of ``dtype`` with float32 accumulation."""
  return jax.lax.dot_general(
    a.astype(dtype),
    b.astype(dtype),
    (contract, ((), ())),
    precision=_precision(dtype),
    preferred_element_type=F32,
  )


def _iota(shape, dim):
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _group(shape, dim, size):
  """Index of the group of ``size`` consecutive entries along ``dim`` (the head)."""
  return jax.lax.div(_iota(shape, dim), jnp.int32(size))


def _line_rows(step: AxialStep, line):
  return pl.ds(line * step.line_stride, step.length, stride=step.pos_stride)


def _block_rel(rel_t, step: AxialStep):
  """``[n*d, P]`` offsets per query channel -> block-diagonal ``[n*d, n*P]``."""
  head = _group(rel_t.shape, 0, step.d)
  return jnp.concatenate([jnp.where(head == h, rel_t, 0.0) for h in range(step.heads)], axis=1)


def _valid(step: AxialStep, width: int):
  """``[A, P]``: key lane ``z`` is a position of the line inside the query's neighbourhood."""
  x = _iota((step.length, width), 0)
  z = _iota((step.length, width), 1)
  offset = z - x + step.center
  return (z < step.length) & (offset >= 0) & (offset < step.used)


def _weights(logits_rel, valid, step: AxialStep, width: int):
  """Relative logits ``[A, P]`` of one head -> absolute weights ``[A, P]`` (float32)."""
  logits = _rotate_rows(logits_rel, (width - step.center) % width)
  if not step.softmax:
    return jnp.where(valid, logits, 0.0)
  logits = jnp.where(valid, logits, -jnp.inf)
  top = jnp.max(logits, axis=1, keepdims=True)
  w = jnp.exp(logits - top)
  return w / jnp.sum(w, axis=1, keepdims=True)


def _rotate_rows(x, shift: int):
  """Rotates row ``i`` of ``x [rows, lanes]`` by ``shift + i`` lanes (``jnp.roll`` sense).

  The strided roll runs with a zero base shift (Mosaic rotates each vreg's rows by a
  contiguous range of amounts, which must not wrap within the vreg) and a plain roll
  adds ``shift``.
  """
  x = pltpu.roll(x, 0, 1, stride=1, stride_axis=0)
  return pltpu.roll(x, shift, 1) if shift else x


def _unskew(dw, flip, step: AxialStep, width: int, dtype):
  """Absolute ``[A, n*P]`` weight gradients -> relative offsets (the skew's transpose).

  Row ``i`` must rotate by ``center - i`` lanes, a negative stride, which the roll does
  not take: with the rows reversed (``flip``, an exact permutation on the MXU) it is a
  rotation of row ``i`` by ``i - (A - 1 - center)``.
  """
  shift = (width - (step.length - 1 - step.center)) % width
  flipped = _dot(flip, dw, ((1,), (0,)), dtype)
  heads = [_rotate_rows(flipped[:, h * width : (h + 1) * width], shift) for h in range(step.heads)]
  return _dot(flip, jnp.concatenate(heads, axis=1), ((1,), (0,)), dtype)


def _head_softmax(q, heads):
  """Softmax of each query over the channels of its head (``[rows, n*d]``, float32)."""
  head = _group(q.shape, 1, q.shape[1] // heads)
  top = jnp.zeros_like(q)
  for h in range(heads):
    top = jnp.where(head == h, jnp.max(jnp.where(head == h, q, -jnp.inf), 1, keepdims=True), top)
  w = jnp.exp(q - top)
  total = jnp.zeros_like(q)
  for h in range(heads):
    total = jnp.where(head == h, jnp.sum(jnp.where(head == h, w, 0.0), 1, keepdims=True), total)
  return w / total


def _head_sum(x, heads):
  """Sum over the channels of each head, broadcast back to those channels."""
  head = _group(x.shape, 1, x.shape[1] // heads)
  total = jnp.zeros_like(x)
  for h in range(heads):
    total = jnp.where(head == h, jnp.sum(jnp.where(head == h, x, 0.0), 1, keepdims=True), total)
  return total


def _lines_forward(step: AxialStep, rel_t, q_s, v_s, out_s, cdt):
  """The step over every line of the image: ``out_s[line] = w(q_s[line]) @ v_s[line]``.

  ``q_s``, ``v_s`` and ``out_s`` are float32 :class:`_Lanes` scratch of the whole image;
  ``rel_t`` the step's ``[n*d, P]`` relative rows.
  """
  width = rel_t.shape[1]
  dv = step.value_dim
  rbd = _block_rel(rel_t.astype(F32), step).astype(cdt)
  valid = _valid(step, width)
  lane_head = _group((step.length, dv), 1, step.e)
  pad = jnp.zeros((width - step.length, dv), F32)

  def line(j, carry):
    q = q_s[_line_rows(step, j), :]
    vpad = jnp.concatenate([v_s[_line_rows(step, j), :], pad], axis=0)
    logits = _dot(q, rbd, ((1,), (0,)), cdt)
    out = jnp.zeros((step.length, dv), F32)
    for h in range(step.heads):
      w = _weights(logits[:, h * width : (h + 1) * width], valid, step, width)
      out = jnp.where(lane_head == h, _dot(w, vpad, ((1,), (0,)), cdt), out)
    out_s[_line_rows(step, j), :] = out
    return carry

  jax.lax.fori_loop(0, step.lines, line, 0)


def _stage(r, q_off, v_off, dk, dv):
  """Queries and values of the image into float32 scratch, where lines are read with
  strided loads (the values from ``vals``, after ``affine``, or from ``src``)."""
  r['q_s'][...] = r['src'][:, q_off : q_off + dk].astype(F32)
  if 'vals' in r:
    v = r['vals'][...].astype(F32)
  else:
    v = r['src'][:, v_off : v_off + dv].astype(F32)
  if 'affine' in r:
    v = v * r['affine'][0:1, :] + r['affine'][1:2, :]
  r['v_s'][...] = v


def _spec(block):
  """A whole-image block of a ``[batch, ...]`` array, or a block shared by all programs."""
  if block[0] is None:
    return pl.BlockSpec(block, lambda b: (b,) + (0,) * (len(block) - 1))
  return pl.BlockSpec(block, lambda b: (0,) * len(block))


def _vmem_limit(blocks_bytes: int, scratch_bytes: int, rows: int) -> int:
  # Double-buffered blocks, the scratch and a few whole-image float32 temporaries.
  need = 2 * blocks_bytes + scratch_bytes + 8 * rows * LANES * 4
  return int(min(max(need + need // 2, 32 << 20), 100 << 20))


def _padded_bytes(shape, dtype) -> int:
  """VMEM bytes of a block: the minor two dims padded to (8, 128) tiles."""
  *lead, rows, cols = (1,) * max(0, 2 - len(shape)) + tuple(shape)
  n = 1
  for s in lead:
    n *= s
  return n * layout.round_up(rows, 16) * layout.round_up(cols, LANES) * jnp.dtype(dtype).itemsize


# ------------------------------------------------------------------------------------ costs


def block_traffic(
  operands: Sequence[tuple[Sequence[int], int]], results: Sequence[tuple[Sequence[int], int]]
) -> list[int]:
  """HBM bytes each operand and result of a call moves, from the grid and the blocks.

  One program per image (``grid=(batch,)``): a ``[batch, ...]`` array (rank 3) moves one
  image's block per program, i.e. once; a shared array (rank 2: relative rows, affine
  coefficients) is copied by every program. Blocks move in HBM's tiled layout
  (:func:`layout.tpu_tiled_bytes`).

  Args:
    operands, results: ``(shape, itemsize)`` of each, as the call sees them (one device's
      share of the batch).

  Returns:
    Bytes per operand, then per result.
  """
  batch = results[0][0][0]
  out = []
  for shape, itemsize in [*operands, *results]:
    block = shape if len(shape) == 2 else shape[1:]
    out.append(batch * layout.tpu_tiled_bytes(block, itemsize))
  return out


def kernel_dots(call: layout.KernelCall, batch: int, width: int) -> list[flops.Dot]:
  """The MXU products of a call on ``batch`` images, as the kernel's code writes them.

  Per line of ``A`` positions, with ``P = width`` offset lanes per head (padding included)
  and the relative table block-diagonal over the ``n`` heads (zeros included: the MXU
  multiplies them): the forward pass's logits ``[A, d_k] @ [d_k, n P]`` and, per head,
  weighted values ``[A, P] @ [P, d_v]``; the backward pass's logits again and, per head,
  the weight gradient ``[A, d_v] @ [d_v, P]`` and the value gradient
  ``[P, A] @ [A, d_v]``, the two row reversals of the skew's transpose
  ``[A, A] @ [A, n P]``, the query gradient ``[A, n P] @ [n P, d_k]`` and the embedding
  gradient ``[d_k, A] @ [A, n P]``; a column step's forward for each column output it
  recomputes; each fused content product once over the image's ``N`` pixels
  (``[N, d_k] @ [d_k, d_v]`` or its transposes).
  """
  step, extras = call.step, call.extras
  pixels = step.height * step.width
  dk, dv, n = step.key_dim, step.value_dim, step.heads
  a, lines, grid = step.length, step.lines, n * width
  Dot = flops.Dot
  content = 'context' in extras
  key = call.k_off is not None if not call.backward else 'key_stats' in extras
  if call.backward:
    dots = [
      Dot(a, dk, grid, lines),
      Dot(a, dv, width, lines * n),
      Dot(width, a, dv, lines * n),
      Dot(a, a, grid, 2 * lines),
      Dot(a, grid, dk, lines),
      Dot(dk, a, grid, lines),
    ]
    if content:  # dctx = q^T g, the query gradient g context^T
      dots += [Dot(dk, pixels, dv, 1), Dot(pixels, dv, dk, 1)]
    if key:  # through the key softmax: v dcontext^T, and p dcontext into the values
      dots += [Dot(pixels, dv, dk, 1), Dot(pixels, dk, dv, 1)]
  else:
    dots = [Dot(a, dk, grid, lines), Dot(a, width, dv, lines * n)]
    if content:  # q context
      dots.append(Dot(pixels, dk, dv, 1))
    if key:  # the context softmax(k)^T v
      dots.append(Dot(dk, pixels, dv, 1))
  recomputed = [call.column] if call.column is not None else []
  recomputed += [step] if 'recompute_grad_y' in extras else []
  for y in recomputed:
    y_width = offset_lanes(y)
    dots += [Dot(y.length, dk, n * y_width, y.lines), Dot(y.length, y_width, dv, y.lines * n)]
  return flops.scaled(dots, batch)


def compute_cost(call: layout.KernelCall, batch: int, width: int) -> tuple[int, int]:
  """``(flops, transcendentals)`` of a call on ``batch`` images, as the kernel executes them.

  FLOPs: ``2 M K N`` of each of :func:`kernel_dots`; elementwise work is not counted.
  Transcendentals: one exponential per weight with the positional softmax, per key
  channel and pixel for the key softmax, per query channel and pixel when queries are
  normalised.
  """
  step, extras = call.step, call.extras
  pixels = step.height * step.width
  dk = step.key_dim
  grid = step.heads * width
  content = 'context' in extras
  key = call.k_off is not None if not call.backward else 'key_stats' in extras
  exps = pixels * grid * int(step.softmax) + pixels * dk * int(key)
  exps += pixels * dk * int(content and 'normalize_queries' in extras)
  recomputed = [call.column] if call.column is not None else []
  recomputed += [step] if 'recompute_grad_y' in extras else []
  for y_step in recomputed:
    exps += pixels * step.heads * offset_lanes(y_step) * int(y_step.softmax)
  return flops.executed_flops(kernel_dots(call, batch, width)), batch * exps


def _call(kernel, inputs, outputs, scratch, interpret, call: layout.KernelCall):
  """``pallas_call`` over ``grid=(batch,)``; ``inputs``/``outputs``: ``(array, block)``.

  Blocks with a leading ``None`` are per image; under a sharded ``jax.jit`` each device
  runs the kernel on its images (:func:`layout.batch_partitioned`). The call is named
  after ``call`` and carries its cost (:func:`block_traffic`, :func:`compute_cost`),
  which libtpu's cost analysis counts.
  """
  block_bytes = sum(_padded_bytes([s for s in blk if s], a.dtype) for a, blk in inputs + outputs)
  scratch_bytes = sum(_padded_bytes(s.shape, s.dtype) for s in scratch)
  params = pltpu.CompilerParams(
    dimension_semantics=('parallel',),
    vmem_limit_bytes=_vmem_limit(block_bytes, scratch_bytes, inputs[0][0].shape[1]),
  )

  def run(*arrays):
    batch = arrays[0].shape[0]
    shapes = [a.shape for a in arrays] + [(batch, *a.shape[1:]) for a, _ in outputs]
    dtypes = [a.dtype for a in arrays] + [a.dtype for a, _ in outputs]
    sizes = [
      (shape, jnp.dtype(dtype).itemsize) for shape, dtype in zip(shapes, dtypes, strict=True)
    ]
    flops, exps = compute_cost(call, batch, inputs[1][0].shape[1])
    cost = pl.CostEstimate(
      flops=flops,
      transcendentals=exps,
      bytes_accessed=sum(block_traffic(sizes[: len(arrays)], sizes[len(arrays) :])),
    )
    return pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype) for a, _ in outputs],
      grid=(batch,),
      in_specs=[_spec(blk) for _, blk in inputs],
      out_specs=[_spec(blk) for _, blk in outputs],
      scratch_shapes=[pltpu.VMEM(s.shape, s.dtype) for s in scratch],
      compiler_params=params,
      interpret=interpret,
      name=call.name,
      cost_estimate=cost,
    )(*arrays)

  arrays = [a for a, _ in inputs]
  return layout.batch_partitioned(
    run,
    [a.ndim for a in arrays],
    [blk[0] is None for _, blk in inputs],
    [a.ndim for a, _ in outputs],
  )(*arrays)


def _bound(names, refs, lane_scratch=()):
  """Refs by name; the scratch arrays of ``lane_scratch`` as :class:`_Lanes`."""
  r = dict(zip(names, refs, strict=True))
  for name in lane_scratch:
    chunks = sorted(k for k in r if k.startswith(name + '#'))
    r[name] = _Lanes([r.pop(k) for k in chunks])
  return r


class _Lanes:
  """A float32 ``[rows, channels]`` VMEM array kept as chunks of at most 128 lanes.

  Strided sublane loads and stores (the lines of a step) need a memref whose last
  dimension fits one vreg; indexing with ``[rows, :]`` or ``[...]`` gathers the chunks.
  """

  def __init__(self, refs):
    self.refs = refs

  def __getitem__(self, index):
    rows = slice(None) if index is Ellipsis else index[0]
    parts = [ref[rows, :] for ref in self.refs]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

  def __setitem__(self, index, value):
    rows = slice(None) if index is Ellipsis else index[0]
    start = 0
    for ref in self.refs:
      width = ref.shape[1]
      ref[rows, :] = value if len(self.refs) == 1 else value[:, start : start + width]
      start += width


def _lane_scratch(rows: int, channels: dict[str, int]):
  """Scratch shapes and names for :class:`_Lanes` arrays ``{name: channels}``."""
  shapes, names = [], []
  for name, c in channels.items():
    for i, start in enumerate(range(0, c, LANES)):
      shapes.append(jax.ShapeDtypeStruct((rows, min(LANES, c - start)), F32))
      names.append(f'{name}#{i:03d}')
  return shapes, names


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
  """One axial step forward on whole images, with optional fused extras.

  Args:
    step: the step's geometry.
    src: ``[batch, height*width, channels]``; queries are ``src[..., q_off:q_off+n*d]``.
    rel_t: ``[n*d, P]`` relative rows (:func:`layout.relative_rows`, ``P`` =
      :func:`offset_lanes`).
    q_off: first query channel in ``src``.
    v_off: first value channel in ``src`` (when ``vals`` is None).
    vals: ``[batch, height*width, n*e]`` values, if not in ``src``.
    affine: ``[2, n*e]`` float32 scale and shift applied to ``vals`` on load.
    k_off: first key channel in ``src``: also return the content attention's key-softmax
      partials (``m``, ``s``) and unnormalised context ``ctx`` of each image.
    context: ``[batch, n*d, n*e]`` block-diagonal content context: add the content
      output ``q @ context`` (queries softmaxed per head if ``normalize_queries``).
    normalize_queries: see ``context``.
    stats: also return ``stats [batch, 2, n*e]``, the sum and sum of squares of the
      output (as rounded to the output dtype) over the image.
    compute_dtype: MXU operand dtype (default: the dtype of ``src``).
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    ``{'out': [batch, height*width, n*e]}`` in the values' dtype, plus the requested
    extras (``'stats'``; ``'m'``, ``'s'`` ``[batch, 1, n*d]`` and ``'ctx'``).
  """
  batch, rows, src_ch = src.shape
  dk, dv = step.key_dim, step.value_dim
  cdt = compute_dtype or src.dtype
  out_dtype = (vals if vals is not None else src).dtype
  inputs = [(src, (None, rows, src_ch)), (rel_t, rel_t.shape)]
  names = ['src', 'rel_t']
  if vals is not None:
    inputs.append((vals, (None, rows, dv)))
    names.append('vals')
  if affine is not None:
    inputs.append((affine, affine.shape))
    names.append('affine')
  if context is not None:
    inputs.append((context, (None, dk, dv)))
    names.append('context')
  outputs = [(jax.ShapeDtypeStruct((batch, rows, dv), out_dtype), (None, rows, dv))]
  out_names = ['out']
  if stats:
    outputs.append((jax.ShapeDtypeStruct((batch, 2, dv), F32), (None, 2, dv)))
    out_names.append('stats')
  if k_off is not None:
    for name, shape in (('m', (1, dk)), ('s', (1, dk)), ('ctx', (dk, dv))):
      outputs.append((jax.ShapeDtypeStruct((batch, *shape), F32), (None, *shape)))
      out_names.append(name)
  lanes = {'q_s': dk, 'v_s': dv, 'out_s': dv}
  scratch, scratch_names = _lane_scratch(rows, lanes)

  def kernel(*refs):
    r = _bound(names + out_names + scratch_names, refs, lanes)
    _stage(r, q_off, v_off, dk, dv)
    _lines_forward(step, r['rel_t'][...], r['q_s'], r['v_s'], r['out_s'], cdt)
    out = r['out_s'][...]
    if context is not None:
      q_all = r['q_s'][...]
      if normalize_queries:
        q_all = _head_softmax(q_all, step.heads)
      out = out + _dot(q_all, r['context'][...], ((1,), (0,)), cdt)
    out = out.astype(out_dtype)
    r['out'][...] = out
    if stats:
      rounded = out.astype(F32)
      r['stats'][...] = jnp.concatenate(
        [jnp.sum(rounded, 0, keepdims=True), jnp.sum(rounded * rounded, 0, keepdims=True)], 0
      )
    if k_off is not None:
      k_all = r['src'][:, k_off : k_off + dk].astype(F32)
      top = jnp.max(k_all, axis=0, keepdims=True)
      p = jnp.exp(k_all - top)
      v_all = r['v_s'][...]
      r['m'][...] = top
      r['s'][...] = jnp.sum(p, axis=0, keepdims=True)
      r['ctx'][...] = _dot(p, v_all, ((0,), (0,)), cdt)

  call = layout.KernelCall.of(
    step, False, q_off, k_off, v_off,
    vals=vals, affine=affine, context=context, normalize_queries=normalize_queries, stats=stats,
  )  # fmt: skip
  results = _call(kernel, inputs, outputs, scratch, interpret, call)
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
  pack_grads: bool = False,
  grad_packed: bool = False,
  column: AxialStep | None = None,
  column_rel_t: jax.Array | None = None,
  recompute_grad_y: bool = False,
  compute_dtype=None,
  interpret: bool = False,
) -> dict[str, jax.Array]:
  """The gradient of :func:`forward` (one axial step), with optional fused extras.

  Args:
    step, src, rel_t, q_off, v_off, vals, affine, normalize_queries, compute_dtype,
      interpret: as for :func:`forward`.
    grad: ``[batch, height*width, n*e]`` gradient of the step's output.
    k_off: first key channel in ``src`` (content backward, with ``key_stats``).
    grad_affine: ``[3, n*e]`` float32 ``(a, b, c)``: the step's output gradient is
      ``a * grad + b * grad_y + c`` (a BatchNorm backward folded into the load).
    grad_y: ``[batch, height*width, n*e]``, see ``grad_affine``.
    context: ``[batch, n*d, n*e]`` content context that :func:`forward` added: return its
      partial gradient ``dctx`` and add the content term to the query gradient.
    key_stats: ``[batch, 3, n*d]`` float32: key-softmax max and sum, and
      ``sum_e dcontext * context`` per key channel, for the content backward through the
      keys and values (with ``dcontext [batch, n*d, n*e]``, block diagonal).
    dcontext: see ``key_stats``.
    dq_in: ``[batch, height*width, n*d]`` added to the query gradient.
    bn_sums: also return ``sums [batch, 2, n*e]``: per channel, the sums of the values'
      gradient and of that gradient times the values before ``affine``.
    packed: return the gradient of ``src`` (``'dsrc'``, queries, keys and values in
      their lanes) instead of ``'dq'`` and ``'dvals'``.
    pack_grads: return ``'dqv' [batch, height*width, n*d + n*e]``, the query gradient in
      its first ``n*d`` lanes and the values' gradient after them, instead of ``'dq'`` and
      ``'dvals'``: one array in HBM's 128-lane tiles where two narrow ones would each be
      padded (32 query and 64 value channels fill one tile).
    grad_packed: ``grad`` is such a ``'dqv'`` array: the step's output gradient is its
      lanes ``n*d:`` and its first ``n*d`` lanes are added to the query gradient (as
      ``dq_in``).
    column: instead of reading ``vals``, recompute them on chip as the output ``y`` of
      this column step (rounded to the dtype of ``src``, as :func:`forward` stores it)
      from ``src``'s queries and values (at ``v_off``) and ``column_rel_t``, its relative
      rows; ``affine`` then applies to ``y`` and ``bn_sums`` use ``y``. (The row step of a
      GSA module needs the column output; this way it is not kept for the backward pass.)
    column_rel_t: see ``column``.
    recompute_grad_y: ``grad_y`` is this step's own output, recomputed on chip from
      ``src`` (rounded to its dtype) instead of read.

  Returns:
    ``'drel' [batch, n*d, P]`` float32, ``'dq'`` and ``'dvals'`` (or ``'dsrc'``), and the
    requested extras (``'sums'``, ``'dctx'``).
  """
  if column is not None and (column_rel_t is None or vals is not None or v_off is None):
    raise ValueError('column needs column_rel_t and v_off, and replaces vals.')
  if recompute_grad_y and (grad_y is not None or grad_affine is None or vals is not None):
    raise ValueError('recompute_grad_y replaces grad_y, needs grad_affine and no vals.')
  batch, rows, src_ch = src.shape
  dk, dv = step.key_dim, step.value_dim
  width = rel_t.shape[1]
  cdt = compute_dtype or src.dtype
  vals_dtype = (vals if vals is not None else src).dtype
  grad_off = dk if grad_packed else 0
  if grad.shape[-1] != grad_off + dv:
    raise ValueError(f'grad has {grad.shape[-1]} channels, expected {grad_off + dv}.')
  inputs = [(src, (None, rows, src_ch)), (rel_t, rel_t.shape), (grad, (None, rows, grad_off + dv))]
  names = ['src', 'rel_t', 'grad']
  optional = [
    ('vals', vals, (None, rows, dv)),
    ('affine', affine, None),
    ('grad_affine', grad_affine, None),
    ('grad_y', grad_y, (None, rows, dv)),
    ('context', context, (None, dk, dv)),
    ('key_stats', key_stats, (None, 3, dk)),
    ('dcontext', dcontext, (None, dk, dv)),
    ('dq_in', dq_in, (None, rows, dk)),
    ('column_rel_t', column_rel_t, None),
  ]
  for name, array, block in optional:
    if array is not None:
      inputs.append((array, block or array.shape))
      names.append(name)

  def out(shape, dtype):
    return (jax.ShapeDtypeStruct((batch, *shape), dtype), (None, *shape))

  outputs = [out((dk, width), F32)]
  out_names = ['drel']
  if packed:
    outputs.append(out((rows, src_ch), src.dtype))
    out_names.append('dsrc')
  elif pack_grads:
    outputs.append(out((rows, dk + dv), src.dtype))
    out_names.append('dqv')
  else:
    outputs += [out((rows, dk), src.dtype), out((rows, dv), vals_dtype)]
    out_names += ['dq', 'dvals']
  if bn_sums:
    outputs.append(out((2, dv), F32))
    out_names.append('sums')
  if context is not None:
    outputs.append(out((dk, dv), F32))
    out_names.append('dctx')
  lanes = {'q_s': dk, 'v_s': dv, 'grad_s': dv, 'dq_s': dk, 'dv_s': dv}
  if column is not None or recompute_grad_y:
    lanes['y_s'] = dv
  scratch, scratch_names = _lane_scratch(rows, lanes)
  scratch.append(jax.ShapeDtypeStruct((dk, step.heads * width), F32))
  scratch_names.append('drel_s')

  def kernel(*refs):
    r = _bound(names + out_names + scratch_names, refs, lanes)

    def recompute_y(y_step, y_rel_t):
      """The column output y from the staged queries and values, as forward rounds it."""
      _lines_forward(y_step, y_rel_t, r['q_s'], r['v_s'], r['y_s'], cdt)
      y = r['y_s'][...].astype(src.dtype).astype(F32)
      r['y_s'][...] = y
      return y

    if column is not None:
      # Stage the column step's queries and values; the affine applies to its output.
      _stage({k: ref for k, ref in r.items() if k != 'affine'}, q_off, v_off, dk, dv)
      y = recompute_y(column, r['column_rel_t'][...])
      if affine is not None:
        y = y * r['affine'][0:1, :] + r['affine'][1:2, :]
      r['v_s'][...] = y
    else:
      _stage(r, q_off, v_off, dk, dv)
    g_all = r['grad'][:, grad_off : grad_off + dv].astype(F32)
    if grad_affine is not None:
      ga = r['grad_affine']
      if recompute_grad_y:
        y = recompute_y(step, r['rel_t'][...])
      else:
        y = r['grad_y'][...].astype(F32)
      g_all = ga[0:1, :] * g_all + ga[1:2, :] * y + ga[2:3, :]
    r['grad_s'][...] = g_all
    r['drel_s'][...] = jnp.zeros(r['drel_s'].shape, F32)
    rbd = _block_rel(r['rel_t'][...].astype(F32), step).astype(cdt)
    valid = _valid(step, width)
    lane_head = _group((step.length, dv), 1, step.e)
    pad = jnp.zeros((width - step.length, dv), F32)
    flip = (_iota((step.length,) * 2, 0) + _iota((step.length,) * 2, 1) == step.length - 1).astype(
      cdt
    )

    def line(j, carry):
      rows_j = _line_rows(step, j)
      q = r['q_s'][rows_j, :]
      vpad = jnp.concatenate([r['v_s'][rows_j, :], pad], axis=0)
      g = r['grad_s'][rows_j, :]
      logits = _dot(q, rbd, ((1,), (0,)), cdt)
      dvpad = jnp.zeros((width, dv), F32)
      dlogits = []
      for h in range(step.heads):
        w = _weights(logits[:, h * width : (h + 1) * width], valid, step, width)
        gh = jnp.where(lane_head == h, g, 0.0)
        dw = _dot(gh, vpad, ((1,), (1,)), cdt)  # [A, P]: g . v for every key position
        if step.softmax:
          dw = w * (dw - jnp.sum(w * dw, axis=1, keepdims=True))
        dw = jnp.where(valid, dw, 0.0)
        dvpad = dvpad + _dot(w, gh, ((0,), (0,)), cdt)
        dlogits.append(dw)
      dlogits = _unskew(jnp.concatenate(dlogits, axis=1), flip, step, width, cdt)
      r['dq_s'][rows_j, :] = _dot(dlogits, rbd, ((1,), (1,)), cdt)
      r['dv_s'][rows_j, :] = dvpad[: step.length]
      r['drel_s'][...] += _dot(q, dlogits, ((0,), (0,)), cdt)
      return carry

    jax.lax.fori_loop(0, step.lines, line, 0)

    # Compact the block-diagonal embedding gradient to [n*d, P].
    acc = r['drel_s'][...]
    head = _group((dk, width), 0, step.d)
    drel = jnp.zeros((dk, width), F32)
    for h in range(step.heads):
      drel = jnp.where(head == h, acc[:, h * width : (h + 1) * width], drel)
    r['drel'][...] = drel

    dq = r['dq_s'][...]
    dvals = r['dv_s'][...]
    if context is not None:
      q_all = r['q_s'][...]
      if normalize_queries:
        q_all = _head_softmax(q_all, step.heads)
      g_all = r['grad_s'][...]
      dctx = _dot(q_all, g_all, ((0,), (0,)), cdt)
      same_head = _group((dk, dv), 0, step.d) == _group((dk, dv), 1, step.e)
      r['dctx'][...] = jnp.where(same_head, dctx, 0.0)
      dqc = _dot(g_all, r['context'][...], ((1,), (1,)), cdt)
      if normalize_queries:
        dqc = q_all * (dqc - _head_sum(q_all * dqc, step.heads))
      dq = dq + dqc
    if dq_in is not None:
      dq = dq + r['dq_in'][...].astype(F32)
    if grad_packed:
      dq = dq + r['grad'][:, 0:dk].astype(F32)
    if bn_sums:
      raw = r['y_s'][...] if column is not None else r['vals'][...].astype(F32)
      r['sums'][...] = jnp.concatenate(
        [jnp.sum(dvals, 0, keepdims=True), jnp.sum(dvals * raw, 0, keepdims=True)], 0
      )
    if key_stats is not None:
      ks = r['key_stats'][...]
      p = jnp.exp(r['src'][:, k_off : k_off + dk].astype(F32) - ks[0:1, :]) / ks[1:2, :]
      dctx_in = r['dcontext'][...]
      dp = _dot(r['v_s'][...], dctx_in, ((1,), (1,)), cdt)
      dkeys = p * (dp - ks[2:3, :])
      dvals = dvals + _dot(p, dctx_in, ((1,), (0,)), cdt)
    if packed:
      parts = {q_off: dq, v_off: dvals}
      if key_stats is not None:
        parts[k_off] = dkeys
      else:
        r['dsrc'][...] = jnp.zeros(r['dsrc'].shape, src.dtype)
      for off, part in parts.items():
        r['dsrc'][:, off : off + part.shape[1]] = part.astype(src.dtype)
    elif pack_grads:
      r['dqv'][:, 0:dk] = dq.astype(src.dtype)
      r['dqv'][:, dk : dk + dv] = dvals.astype(src.dtype)
    else:
      r['dq'][...] = dq.astype(src.dtype)
      r['dvals'][...] = dvals.astype(vals_dtype)

  call = layout.KernelCall.of(
    step, True, q_off, k_off, v_off,
    column_length=None if column is None else column.rel_length,
    vals=vals, affine=affine, grad_affine=grad_affine, grad_y=grad_y, context=context,
    normalize_queries=normalize_queries, key_stats=key_stats, dcontext=dcontext, dq_in=dq_in,
    bn_sums=bn_sums, packed=packed, recompute_grad_y=recompute_grad_y, pack_grads=pack_grads,
    grad_packed=grad_packed,
  )  # fmt: skip
  results = _call(kernel, inputs, outputs, scratch, interpret, call)
  return dict(zip(out_names, results, strict=True))
