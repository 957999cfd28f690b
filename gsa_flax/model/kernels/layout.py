"""How the axial kernels see their arrays: line geometry, relative tables, partial results.

Both backends (Mosaic on TPU, Triton on NVIDIA GPUs) compute one axial step as a set of
independent *lines*: the columns of the image for the column step (attending along the
height, ``axis=1``) or its rows for the row step (``axis=2``). A line has ``length``
positions; on the pixels of one image flattened to ``height * width`` rows, position ``i``
of line ``j`` is row ``j * line_stride + i * pos_stride``, so both steps read the arrays in
their ``[batch, height, width, channels]`` layout and nothing is transposed in HBM.

Relative embeddings ``rel [L, heads, d]`` enter the kernels as ``rel_t [heads * d, width]``:
only the ``used`` offsets that can occur on a line of this length (``|offset| < length``)
are kept, transposed so that channels are rows and offsets are lanes, and zero-padded to
``width``. Offset ``o`` (key minus query position) is column ``center + o``.

Programs return per-program partial sums (BatchNorm statistics, the content context, the
embedding gradient) that the wrappers merge with a few small XLA ops.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

HEIGHT_AXIS = 1
WIDTH_AXIS = 2


@dataclasses.dataclass(frozen=True)
class AxialStep:
  """Static description of one axial step on ``[batch, height, width, heads, .]`` arrays.

  Attributes:
    axis: ``1`` (column step, along the height) or ``2`` (row step, along the width).
    height: image height ``H``.
    width: image width ``W``.
    heads: number of heads ``n``.
    key_dim: query channels per pixel, ``heads * d``.
    value_dim: value channels per pixel, ``heads * e``.
    rel_length: length ``L`` (odd) of the relative embeddings.
    softmax: softmax the weights of each query over its neighbourhood.
  """

  axis: int
  height: int
  width: int
  heads: int
  key_dim: int
  value_dim: int
  rel_length: int
  softmax: bool = False

  def __post_init__(self):
    if self.axis not in (HEIGHT_AXIS, WIDTH_AXIS):
      raise ValueError(f'axis must be {HEIGHT_AXIS} or {WIDTH_AXIS}, got {self.axis}.')
    if self.rel_length % 2 != 1:
      raise ValueError(f'relative embeddings need an odd length L, got L={self.rel_length}.')
    if self.key_dim % self.heads or self.value_dim % self.heads:
      raise ValueError(
        f'{self.heads} heads must divide key_dim={self.key_dim} and value_dim={self.value_dim}.'
      )

  @property
  def d(self) -> int:
    return self.key_dim // self.heads

  @property
  def e(self) -> int:
    return self.value_dim // self.heads

  @property
  def length(self) -> int:
    """Positions per line (the size of the attended axis)."""
    return self.height if self.axis == HEIGHT_AXIS else self.width

  @property
  def lines(self) -> int:
    """Lines per image (the size of the other spatial axis)."""
    return self.width if self.axis == HEIGHT_AXIS else self.height

  @property
  def line_stride(self) -> int:
    return 1 if self.axis == HEIGHT_AXIS else self.width

  @property
  def pos_stride(self) -> int:
    return self.width if self.axis == HEIGHT_AXIS else 1

  @property
  def lo(self) -> int:
    """First embedding index that can occur on a line (offset ``-(length - 1)`` or lower)."""
    return max(0, (self.rel_length - 1) // 2 - (self.length - 1))

  @property
  def used(self) -> int:
    """Number of embedding entries that can occur on a line (at most ``2 * length - 1``)."""
    return min(self.rel_length, (self.rel_length - 1) // 2 + self.length) - self.lo

  @property
  def center(self) -> int:
    """Column of offset 0 in the cropped table."""
    return (self.rel_length - 1) // 2 - self.lo


# The optional inputs and outputs of the axial kernels (keyword arguments of ``forward`` and
# ``backward`` in both backends), by the short name a kernel's name gives them.
EXTRAS = {
  'vals': 'vals',
  'affine': 'aff',
  'context': 'ctx',
  'normalize_queries': 'nq',
  'stats': 'st',
  'grad_affine': 'gaff',
  'grad_y': 'gy',
  'key_stats': 'ks',
  'dcontext': 'dctx',
  'dq_in': 'dqin',
  'bn_sums': 'bns',
  'packed': 'pk',
  'recompute_grad_y': 'ry',
  'pack_grads': 'pg',
  'grad_packed': 'gp',
}
_EXTRA_OF = {short: name for name, short in EXTRAS.items()}
_NAME = re.compile(
  r'gsa_axial(?P<axis>[12])_(?P<direction>fwd|bwd)_(?P<height>\d+)x(?P<width>\d+)_n(?P<heads>\d+)'
  r'_dk(?P<dk>\d+)_dv(?P<dv>\d+)_L(?P<length>\d+)(?P<rest>(?:_[a-z]+\d*)*)'
)


@dataclasses.dataclass(frozen=True)
class KernelCall:
  """Everything static about one call of an axial kernel, spelled out in its name.

  The name (``pallas_call(name=...)``) is what a compiled program keeps of the call: the
  TPU custom call is named after it, a GPU one carries it in its op name. A cost model
  reads the call back from it (:meth:`parse`) and, with the call's operand and result
  shapes, counts what the kernel's programs copy and compute
  (:func:`gsa_flax.model.kernels.costs.custom_call_costs`).

  Attributes:
    step: the step's geometry.
    backward: the gradient kernel (else the forward one).
    q_off, k_off, v_off: first query, key and value channel in ``src`` (None: not given).
    extras: the optional arguments given (keys of :data:`EXTRAS`).
    column_length: a row step's backward that recomputes the column step's output (its
      values) on chip: that step's ``L`` (it shares the rest of the geometry).
  """

  step: AxialStep
  backward: bool
  q_off: int
  k_off: int | None = None
  v_off: int | None = None
  extras: frozenset[str] = frozenset()
  column_length: int | None = None

  def __post_init__(self):
    unknown = set(self.extras) - set(EXTRAS)
    if unknown:
      raise ValueError(f'unknown kernel extras {sorted(unknown)}; valid: {", ".join(EXTRAS)}.')

  @classmethod
  def of(
    cls,
    step: AxialStep,
    backward: bool,
    q_off: int,
    k_off: int | None = None,
    v_off: int | None = None,
    column_length: int | None = None,
    **extras,
  ) -> KernelCall:
    """The call made with these keyword arguments: an extra counts as given unless it is
    None or False."""
    given = frozenset(k for k, v in extras.items() if v is not None and v is not False)
    return cls(step, backward, q_off, k_off, v_off, given, column_length)

  @property
  def column(self) -> AxialStep | None:
    """The column step whose output a row step's backward recomputes (``column_length``)."""
    if self.column_length is None:
      return None
    return dataclasses.replace(self.step, axis=HEIGHT_AXIS, rel_length=self.column_length)

  @property
  def name(self) -> str:
    """E.g. ``gsa_axial1_fwd_56x56_n8_dk32_dv64_L111_q0_k32_v64_st``."""
    s = self.step
    parts = [
      f'gsa_axial{s.axis}_{"bwd" if self.backward else "fwd"}',
      f'{s.height}x{s.width}',
      f'n{s.heads}',
      f'dk{s.key_dim}',
      f'dv{s.value_dim}',
      f'L{s.rel_length}',
    ]
    if s.softmax:
      parts.append('sm')
    parts.append(f'q{self.q_off}')
    parts += [f'{c}{o}' for c, o in (('k', self.k_off), ('v', self.v_off)) if o is not None]
    if self.column_length is not None:
      parts.append(f'c{self.column_length}')
    parts += sorted(EXTRAS[e] for e in self.extras)
    return '_'.join(parts)

  @classmethod
  def parse(cls, text: str) -> KernelCall | None:
    """The call named in ``text`` (a name, an HLO instruction name or op name), or None."""
    match = _NAME.search(text)
    if match is None:
      return None
    g = match.groupdict()
    softmax, offsets, extras = False, {}, set()
    for token in filter(None, g['rest'].split('_')):
      offset = re.fullmatch(r'([qkvc])(\d+)', token)
      if token == 'sm':
        softmax = True
      elif offset:
        offsets[offset.group(1)] = int(offset.group(2))
      elif token in _EXTRA_OF:
        extras.add(_EXTRA_OF[token])
      else:
        return None
    step = AxialStep(
      int(g['axis']),
      int(g['height']),
      int(g['width']),
      int(g['heads']),
      int(g['dk']),
      int(g['dv']),
      int(g['length']),
      softmax,
    )
    return cls(
      step,
      g['direction'] == 'bwd',
      offsets.get('q', 0),
      offsets.get('k'),
      offsets.get('v'),
      frozenset(extras),
      offsets.get('c'),
    )


def relative_rows(rel: jax.Array, step: AxialStep, width: int, dtype) -> jax.Array:
  """``rel [L, heads, d]`` as ``[heads * d, width]``: cropped to the used offsets, padded."""
  used = rel[step.lo : step.lo + step.used].reshape(step.used, step.key_dim)
  return jnp.pad(used.T.astype(dtype), ((0, 0), (0, width - step.used)))


def relative_grad(rows_grad: jax.Array, step: AxialStep, dtype) -> jax.Array:
  """The gradient of :func:`relative_rows`: ``[heads * d, >= used]`` back to ``[L, heads, d]``."""
  used = rows_grad[:, : step.used].T.reshape(step.used, step.heads, step.d)
  after = step.rel_length - step.lo - step.used
  return jnp.pad(used, ((step.lo, after), (0, 0), (0, 0))).astype(dtype)


def head_mask(key_dim: int, value_dim: int, heads: int) -> jax.Array:
  """``[key_dim, value_dim]`` booleans: query channel and value channel of the same head."""
  kh = jnp.arange(key_dim) // (key_dim // heads)
  vh = jnp.arange(value_dim) // (value_dim // heads)
  return kh[:, None] == vh[None, :]


def merge_context(m: jax.Array, s: jax.Array, ctx: jax.Array) -> tuple[jax.Array, ...]:
  """Merges per-program key-softmax partials into the context of each image.

  Args:
    m: ``[batch, programs, key_dim]`` running maxima of the keys.
    s: ``[batch, programs, key_dim]`` sums of ``exp(k - m)``.
    ctx: ``[batch, programs, key_dim, value_dim]`` sums of ``exp(k - m) v``.

  Returns:
    ``(m, s, context)`` per image: ``[batch, key_dim]``, ``[batch, key_dim]`` and the
    normalised ``[batch, key_dim, value_dim]`` context ``softmax_N(K)^T V``.
  """
  top = jnp.max(m, axis=1)
  rescale = jnp.exp(m - top[:, None])
  total = jnp.sum(s * rescale, axis=1)
  context = jnp.sum(ctx * rescale[..., None], axis=1) / total[..., None]
  return top, total, context


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


TPU_LANES = 128  # a TPU's HBM arrays are stored in tiles of 8 rows x 128 lanes
TPU_SUBLANES = 8


def tpu_tiled_bytes(shape: Sequence[int], itemsize: int) -> int:
  """HBM bytes a block of ``shape`` occupies in a TPU's tiled layout.

  The last dimension is padded to 128 lanes and the one before to a multiple of 8 rows
  (rows fewer than 8 take a smaller tile, unpadded), as XLA lays out TPU arrays: a
  ``bf16[3136, 64]`` block moves 3136 x 128 elements.
  """
  *lead, rows, cols = (1,) * max(0, 2 - len(shape)) + tuple(shape)
  if rows >= TPU_SUBLANES:
    rows = round_up(rows, TPU_SUBLANES)
  return int(np.prod(lead, dtype=np.int64)) * rows * round_up(cols, TPU_LANES) * itemsize


def call_traffic(jaxpr) -> list[tuple[str, str, int]]:
  """HBM bytes each Pallas kernel call of a jaxpr copies in and out.

  A custom call's traffic is invisible to XLA's cost analysis, so it is counted from the
  kernel's grid and block specs: every program instance copies each of its input and
  output blocks once (a block that several programs read counts once per program). On
  TPU (Mosaic, and the Mosaic kernels in the interpreter) a block moves in HBM's tiled
  layout (:func:`tpu_tiled_bytes`); on GPUs (Triton) as its elements. Nested jaxprs
  (``cond`` branches of :func:`jax.lax.platform_dependent`, ``custom_vjp`` rules, loops)
  are walked.

  Args:
    jaxpr: a (closed) jaxpr, e.g. from :func:`jax.make_jaxpr`.

  Returns:
    ``(kernel name, backend, bytes)`` per ``pallas_call`` in program order; the backend
    is ``'mosaic'`` (TPU), ``'triton'`` (NVIDIA GPUs) or ``'interpret'``.
  """
  calls = []

  def visit(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == 'pallas_call':
        gm = eqn.params['grid_mapping']
        programs = 1
        for size in gm.grid:
          programs *= int(size)
        triton = 'triton' in type(eqn.params['compiler_params']).__module__
        kind = 'interpret' if eqn.params['interpret'] else 'triton' if triton else 'mosaic'
        per_program = 0
        for bm in gm.block_mappings:
          shape = [int(s) for s in bm.block_aval.shape]
          itemsize = jnp.dtype(bm.block_aval.dtype).itemsize
          if triton:
            per_program += int(np.prod(shape, dtype=np.int64)) * itemsize
          else:
            per_program += tpu_tiled_bytes(shape, itemsize)
        calls.append((eqn.params['name'], kind, programs * per_program))
      for param in eqn.params.values():
        for sub in param if isinstance(param, tuple | list) else (param,):
          inner = getattr(sub, 'jaxpr', sub)
          if hasattr(inner, 'eqns'):
            visit(inner)

  visit(getattr(jaxpr, 'jaxpr', jaxpr))
  return calls


def grid_traffic(jaxpr) -> dict[str, int]:
  """HBM bytes the Pallas kernels of a jaxpr copy in and out, per backend.

  Args:
    jaxpr: a (closed) jaxpr, e.g. from :func:`jax.make_jaxpr`.

  Returns:
    ``{'mosaic': bytes, 'triton': bytes, 'interpret': bytes}`` summed over the
    ``pallas_call`` equations for TPU, for NVIDIA GPUs and in interpret mode
    (:func:`call_traffic`).
  """
  totals = {'mosaic': 0, 'triton': 0, 'interpret': 0}
  for _, kind, moved in call_traffic(jaxpr):
    totals[kind] += moved
  return totals


def batch_partitioned(
  fn: Callable, in_ranks: Sequence[int], batched: Sequence[bool], out_ranks: Sequence[int]
) -> Callable:
  """``fn`` (a kernel call) run per device on its share of the batch under SPMD.

  XLA's partitioner cannot split a custom call (Mosaic refuses to be partitioned at all).
  Arguments with a leading batch dimension (``batched``) keep the batch's sharding and
  are whole along their other dimensions, the others are replicated; every output is
  batch-leading and sharded like the batch. Whenever the trace knows a mesh (the
  arguments' shardings name one, or one is set with ``jax.set_mesh``), this is a
  :func:`jax.shard_map` over it: with the batch's mesh axes when the types say them
  (axes of type Explicit, as ``jax.make_mesh`` makes them), else (axes of type Auto, as
  ``jax.sharding.Mesh(devices, names)`` makes them, whose placement XLA decides after
  tracing) over the Auto axes that divide the batch (:func:`_auto_batch_axes`), so that
  a data-parallel mesh needs no communication. Only without any mesh in the trace does a
  ``custom_partitioning`` rule let the partitioner place the call (on one device, or
  through the GPU plugin); libtpu has no emitter for such a rule on more than one chip.

  Args:
    fn: ``fn(*arrays) -> sequence of arrays``, built from its arguments' shapes (so that it
      runs on a device's share of the batch).
    in_ranks: rank of each argument.
    batched: per argument, whether its leading dimension is the batch.
    out_ranks: rank of each output (all batch-leading).

  Returns:
    A function with ``fn``'s signature.
  """
  batched = tuple(batched)
  partitioned = _custom_partitioned(fn, in_ranks, batched, out_ranks)

  def call(*arrays):
    mesh, axes = _traced_batch_sharding(arrays, batched)
    if axes is None:
      return partitioned(*arrays)
    if all(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
      return tuple(fn(*arrays))  # inside a shard_map: this is already one device's share
    in_specs = tuple(P(axes) if flag else P() for flag in batched)
    mapped = jax.shard_map(
      lambda *a: tuple(fn(*a)),
      mesh=mesh,
      in_specs=in_specs,
      out_specs=tuple(P(axes) for _ in out_ranks),
      check_vma=False,
    )
    return mapped(*arrays)

  return call


def _traced_batch_sharding(arrays, batched):
  """``(mesh, batch axes)`` of the first batched argument when the trace knows a mesh,
  else ``(None, None)``; the axes are ``()`` (replicated) when none can split the batch."""
  for array, flag in zip(arrays, batched, strict=True):
    if not flag:
      continue
    sharding = getattr(jax.typeof(array), 'sharding', None)
    spec = tuple(getattr(sharding, 'spec', ()))
    mesh = getattr(sharding, 'mesh', None)
    if mesh is None or mesh.empty:
      mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return None, None
    if spec and spec[0] is not None:
      return mesh, spec[0]
    return mesh, _auto_batch_axes(mesh, array.shape[0])
  return None, None


def _auto_batch_axes(mesh, batch: int) -> tuple[str, ...]:
  """The mesh's Auto axes, in mesh order, whose sizes' product divides ``batch``.

  Their placement is decided by XLA after tracing; a batch sharded over the data axes
  (the common layout) is then split the same way and runs without communication, any
  other layout is resharded by XLA around the kernel call.
  """
  axes, size = [], 1
  for name, axis_size, axis_type in zip(
    mesh.axis_names, mesh.axis_sizes, mesh.axis_types, strict=True
  ):
    if axis_type == jax.sharding.AxisType.Auto and batch % (size * axis_size) == 0:
      axes.append(name)
      size *= axis_size
  return tuple(axes)


def _custom_partitioned(fn, in_ranks, batched, out_ranks):
  """``fn`` with a ``custom_partitioning`` rule: batch-sharded, otherwise whole."""

  def run(*arrays):
    return tuple(fn(*arrays))

  wrapped = custom_partitioning(run)

  def shardings(mesh, axes, ranks, flags):
    return tuple(
      NamedSharding(mesh, P(axes, *(None,) * (rank - 1)) if flag else P())
      for rank, flag in zip(ranks, flags, strict=True)
    )

  def batch_axes(arg_shapes):
    for shape, flag in zip(arg_shapes, batched, strict=True):
      spec = getattr(shape.sharding, 'spec', ())
      if flag and len(spec):
        return spec[0]
    return None

  def infer(mesh, arg_shapes, result_shape):
    return shardings(mesh, batch_axes(arg_shapes), out_ranks, [True] * len(out_ranks))

  def partition(mesh, arg_shapes, result_shape):
    axes = batch_axes(arg_shapes)
    args = shardings(mesh, axes, in_ranks, batched)
    outs = shardings(mesh, axes, out_ranks, [True] * len(out_ranks))
    return mesh, run, outs, args

  # Shardy's rule: the batch is one factor ``b``; every other dimension its own factor,
  # which must stay whole.
  whole = []

  def mapping(rank, flag, name):
    dims = [f'{name}d{i}' for i in range(rank)]
    if flag:
      dims[0] = 'b'
    whole.extend(d for d in dims if d != 'b')
    return ' '.join(dims)

  operands = [
    mapping(r, f, f'i{n}') for n, (r, f) in enumerate(zip(in_ranks, batched, strict=True))
  ]
  results = [mapping(r, True, f'o{n}') for n, r in enumerate(out_ranks)]
  wrapped.def_partition(
    partition,
    infer_sharding_from_operands=infer,
    sharding_rule=', '.join(operands) + ' -> ' + ', '.join(results),
    need_replication_factors=tuple(whole),
  )
  return wrapped
