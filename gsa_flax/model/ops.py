"""The attention math of GSA-Net as pure functions of arrays (no parameters).

Shapes use one vocabulary everywhere, written as einsum subscripts:
``b`` batch, ``x`` height (rows of the image), ``y`` width (columns), ``n`` heads,
``d`` key/query channels per head, ``e`` value channels per head, ``z`` the key position
along the attended axis, ``l`` a relative offset.

The method as implemented is specified in ``docs/method.md`` (Shen et al. 2020, "Global
Self-Attention Networks for Image Recognition", arXiv 2010.03019, Sec. 3). Neither op ever
builds an array with ``(height*width)**2`` elements: content attention is linear in the
number of pixels and positional attention is axial (``O(N * (H + W))``).

Besides the attention itself, this module holds the weights one query pixel gives every
key (:func:`content_weights`, :func:`positional_weights`), which attention maps draw: the
same math, read out per query instead of summed against the values.

The einsum functions here are the reference and the CPU path. Like
:func:`jax.nn.dot_product_attention`, :func:`positional_attention` and
:func:`gsa_attention` take an ``implementation``: ``None`` picks, for the device the
program is compiled for, the fused Pallas kernels of :mod:`gsa_flax.model.kernels` (Mosaic on
TPU v5 and later, Triton on NVIDIA GPUs of compute capability 8.0 and later) or these
einsums elsewhere (CPU, TPU v2-v4, T4/V100/P100, ROCm); ``'xla'`` forces the einsums;
``'pallas'`` forces the kernels (in the Pallas interpreter on CPU) and refuses devices
they do not support; :mod:`gsa_flax.model.dispatch` makes that choice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gsa_flax.model import dispatch
from gsa_flax.model.kernels import gsa as gsa_kernels
from gsa_flax.model.kernels import positional as positional_kernels

Array = jax.Array

HEIGHT_AXIS = 1
WIDTH_AXIS = 2


def _at_least_f32(a: Array) -> Array:
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _key_softmax(k: Array) -> Array:
  """Keys softmaxed over all ``height*width`` positions, per channel, in at least float32."""
  return jax.nn.softmax(_at_least_f32(k), axis=(HEIGHT_AXIS, WIDTH_AXIS))


def _query_softmax(q: Array) -> Array:
  """Each query softmaxed over its channels (efficient attention's form), at least float32."""
  return jax.nn.softmax(_at_least_f32(q), axis=-1)


def content_attention(q: Array, k: Array, v: Array, *, normalize_queries: bool = False) -> Array:
  """Global content attention, ``Q (softmax_N(K)^T V)`` per head (method, "Content").

  Keys are softmaxed over all ``height*width`` positions, separately for each key channel;
  the result is a ``[d, e]`` context per head, so cost is linear in the number of pixels.
  There is no ``1/sqrt(d)`` scaling and, by default, no normalisation of the queries: the
  paper's change to "efficient attention" (Shen et al. 2021).

  Args:
    q: queries ``[batch, height, width, heads, d]``.
    k: keys ``[batch, height, width, heads, d]``.
    v: values ``[batch, height, width, heads, e]``.
    normalize_queries: if True, softmax each query over its ``d`` channels (efficient
      attention's original form).

  Returns:
    ``[batch, height, width, heads, e]`` in the dtype of ``v``.
  """
  dtype = v.dtype
  # The softmax runs in (at least) float32 under bfloat16 compute: it sums over every pixel.
  k = _key_softmax(k).astype(dtype)
  if normalize_queries:
    q = _query_softmax(q).astype(dtype)
  context = jnp.einsum('bxynd,bxyne->bnde', k, v)
  return jnp.einsum('bxynd,bnde->bxyne', q.astype(dtype), context)


def relative_table(rel: Array, length: int) -> tuple[Array, Array]:
  """Expands relative embeddings into a table indexed by (query, key) position.

  Entry ``[i, j]`` is ``rel[j - i + (L - 1) // 2]`` (offset = key minus query), for every
  pair within the neighbourhood ``|j - i| <= (L - 1) / 2``; pairs outside it are masked.
  The table is ``[length, length, heads, d]``: per pair of positions on one axis, never
  per pixel.

  Args:
    rel: relative embeddings ``[L, heads, d]`` with ``L`` odd; ``rel[(L - 1) // 2]`` is
      offset 0.
    length: number of positions along the attended axis.

  Returns:
    ``(table, valid)``: ``table`` ``[length, length, heads, d]`` (zero where invalid) and
    ``valid`` ``[length, length]`` booleans.
  """
  num_rel = rel.shape[0]
  if num_rel % 2 != 1:
    raise ValueError(f'relative embeddings need an odd length L, got L={num_rel}.')
  center = (num_rel - 1) // 2
  pos = jnp.arange(length)
  index = pos[None, :] - pos[:, None] + center  # [query, key]
  valid = (index >= 0) & (index < num_rel)
  table = jnp.take(rel, jnp.clip(index, 0, num_rel - 1), axis=0)
  table = jnp.where(valid[:, :, None, None], table, jnp.zeros((), rel.dtype))
  return table, valid


def axial_attention(
  q: Array,
  v: Array,
  table: Array,
  valid: Array | None = None,
  *,
  axis: int,
  softmax: bool = False,
  order: str = 'auto',
) -> Array:
  """Attention along one image axis with position embeddings as the only keys.

  ``out[.., i, ..] = sum_j w[i, j] * v[.., j, ..]`` where ``w[i, j] = q[.., i, ..] . table[i, j]``
  and ``i, j`` run along ``axis`` (the other spatial axis is a batch axis).

  Args:
    q: queries ``[batch, height, width, heads, d]``.
    v: values ``[batch, height, width, heads, e]``.
    table: key embeddings per (query position, key position) along ``axis``:
      ``[n, n, heads, d]`` with ``n`` the size of that axis.
    valid: optional ``[n, n]`` mask of the pairs that may attend (neighbourhood).
    axis: ``1`` attends along the height (a column step), ``2`` along the width (a row
      step).
    softmax: if True, the weights of each query are softmaxed over its valid keys (an
      ablation knob; the paper uses none).
    order: contraction order, the same result either way. ``'logits'`` forms the weights
      ``w`` (``[batch, height, width, heads, n]``) and then sums the values;
      ``'values'`` first sums the values under the table (``[.., heads, d, e]`` per
      pixel, one GEMM per head over the key axis) and then contracts with ``q``, which
      never forms ``w``. ``'auto'`` picks ``'values'`` when it is cheaper (see
      :func:`_values_first`); a softmax needs the weights, so it always uses ``'logits'``.

  Returns:
    ``[batch, height, width, heads, e]``.
  """
  if axis not in (HEIGHT_AXIS, WIDTH_AXIS):
    raise ValueError(f'axis must be {HEIGHT_AXIS} (height) or {WIDTH_AXIS} (width), got {axis}.')
  _check_order(order, softmax)
  if order == 'auto':
    order = 'logits' if softmax else ('values' if _values_first(q, v, axis) else 'logits')
  if order == 'values':
    # Associativity: sum_z (q . T[x, z]) v[z] = q . (sum_z T[x, z] v[z]^T). The inner sum is
    # a dense [n*d, n] x [n, batch*other*e] GEMM per head, which XLA runs near the matmul
    # rate, while the weights have a contraction of only d (4-8) and cost memory traffic.
    table = table.astype(v.dtype)
    if axis == HEIGHT_AXIS:
      context = jnp.einsum('xznd,bzyne->bxynde', table, v)
    else:
      context = jnp.einsum('yznd,bxzne->bxynde', table, v)
    return jnp.einsum('bxynd,bxynde->bxyne', q.astype(v.dtype), context)
  if axis == WIDTH_AXIS:
    # The row step is the column step of the transposed image (copies of q and v only).
    out = _logits_first_columns(q.swapaxes(1, 2), v.swapaxes(1, 2), table, valid, softmax)
    return out.swapaxes(1, 2)
  return _logits_first_columns(q, v, table, valid, softmax)


def _check_order(order: str, softmax: bool) -> None:
  if order not in ('auto', 'logits', 'values'):
    raise ValueError(f"order must be 'auto', 'logits' or 'values', got {order!r}.")
  if softmax and order == 'values':
    raise ValueError("order='values' never forms the weights, so it cannot softmax them.")


def _logits_first_columns(
  q: Array, v: Array, table: Array, valid: Array | None, softmax: bool
) -> Array:
  """Logits-first attention along the height, in the layouts XLA's batched dots want.

  The first dot batches over (query row ``x``, head), the second over (batch, column,
  head); each is written with its batch dimensions leading and its contraction last, so
  the ``[.., x, z]`` weights are transposed exactly once between them (and their gradient
  once in the backward pass) instead of XLA adding layout copies around both dots.
  """
  b, x, y, n, d = q.shape
  z = table.shape[1]
  # (b, y) merged into one free dimension: with it, XLA's transposed dots in the backward
  # pass read the weights' gradient in the layout it is produced in (one copy fewer).
  qx = q.transpose(1, 3, 0, 2, 4).reshape(x, n, b * y, d)
  tx = table.astype(q.dtype).transpose(0, 2, 3, 1)  # x n d z
  logits = jax.lax.dot_general(qx, tx, (((3,), (2,)), ((0, 1), (0, 1))))  # x n (b y) z
  logits = logits.reshape(x, n, b, y, z).transpose(2, 3, 1, 0, 4)  # b y n x z
  if softmax:
    mask = None if valid is None else valid[None, None, None]  # [query x, key z]
    logits = jax.nn.softmax(_at_least_f32(logits), axis=-1, where=mask)
    if mask is not None:
      logits = jnp.where(mask, logits, 0.0)
    logits = logits.astype(v.dtype)
  vy = v.transpose(0, 2, 3, 1, 4)  # b y n z e
  out = jnp.einsum('bynxz,bynze->bynxe', logits, vy)
  return out.transpose(0, 3, 1, 2, 4)  # b x y n e


def _values_first(q: Array, v: Array, axis: int) -> bool:
  """Whether the values-first order of :func:`axial_attention` is the faster one.

  Per pixel and head, logits-first keeps ``n`` weights (``n`` the length of the attended
  axis) and does ``n * (d + e)`` multiply-adds in batched dots whose contraction is only
  ``d``, plus transposes of the weights: it is bound by memory traffic, which grows worse
  once the weights leave the caches. Values-first keeps ``d * e`` sums and does
  ``n * d * e`` multiply-adds, in GEMMs that run near the matmul rate. Measured on CPU
  (BENCHMARKS.md, "Speed work: contraction order"), values-first wins when
  ``d * e <= 0.6 * n``:
  GSA-ResNet-50's first stage at 224 (``d * e = 32``, ``n = 56``), and ``d = e = 8`` at
  112x112; never the deeper stages, whose ``d * e`` grows 4x per stage while ``n`` halves.
  """
  return q.shape[-1] * v.shape[-1] <= 0.6 * q.shape[axis]


def positional_attention(
  q: Array,
  v: Array,
  rel: Array,
  *,
  axis: int,
  softmax: bool = False,
  order: str = 'auto',
  implementation: str | None = None,
) -> Array:
  """One axial step of GSA positional attention with relative position embeddings.

  For ``axis=1`` (the column step, along the height; method, "Positional"):
  ``out[b,x,y,h] = sum over x' with |x'-x| <= (L-1)/2 of
  (q[b,x,y,h] . rel[x'-x+(L-1)/2, h]) * v[b,x',y,h]``; ``axis=2`` is the same along the
  width (the row step). Any odd ``L`` works: smaller than ``2n-1`` is a local
  neighbourhood, ``2n-1`` is global, larger ones never use their outer entries.

  Args:
    q: queries ``[batch, height, width, heads, d]``.
    v: values ``[batch, height, width, heads, e]``.
    rel: relative embeddings ``[L, heads, d]``, ``L`` odd, ``rel[(L-1)//2]`` = offset 0.
    axis: ``1`` for the column step, ``2`` for the row step.
    softmax: softmax the weights over the neighbourhood (ablation; default off).
    order: contraction order of the einsum path (``'auto'``, ``'logits'``, ``'values'``);
      see :func:`axial_attention`. The kernels never form the weights in HBM.
    implementation: ``None``, ``'xla'`` or ``'pallas'`` (module docstring): the kernel is
      :func:`gsa_flax.model.kernels.positional.positional_attention`.

  Returns:
    ``[batch, height, width, heads, e]``.
  """
  dispatch.check_implementation(implementation)
  if axis not in (HEIGHT_AXIS, WIDTH_AXIS):
    raise ValueError(f'axis must be {HEIGHT_AXIS} (height) or {WIDTH_AXIS} (width), got {axis}.')
  if rel.shape[0] % 2 != 1:
    raise ValueError(f'relative embeddings need an odd length L, got L={rel.shape[0]}.')

  def reference(q, v, rel):
    table, valid = relative_table(rel, q.shape[axis])
    return axial_attention(q, v, table, valid, axis=axis, softmax=softmax, order=order)

  _check_order(order, softmax)
  kernel = functools.partial(positional_kernels.positional_attention, axis=axis, softmax=softmax)
  return dispatch.dispatch(implementation, reference, kernel, q, v, rel)


def gsa_attention(
  qkv: Array,
  col_embedding: Array,
  row_embedding: Array,
  bn_scale: Array,
  bn_bias: Array,
  bn_mean: Array,
  bn_var: Array,
  *,
  num_heads: int,
  key_features: int,
  train: bool,
  bn_epsilon: float = 1e-5,
  content: bool = True,
  position_embedding: str = 'relative',
  normalize_queries: bool = False,
  softmax: bool = False,
  order: str = 'auto',
  implementation: str | None = None,
) -> tuple[Array, Array, Array]:
  """The attention of a GSA module with the axial positional branch (method, "The GSA module").

  ``out = content(q, k, v) + row(q, BN(column(q, v)))``: content attention (if
  ``content``), the column step, a BatchNorm over the channels of its output and the row
  step, the same queries in both steps. With relative embeddings the kernel path
  (:func:`gsa_flax.model.kernels.gsa.gsa_attention`) runs all of it in four Pallas passes;
  absolute embeddings always take the einsum path (``'pallas'`` refuses them).

  Args:
    qkv: ``[batch, height, width, 2*key_features + d_out]``, queries, keys and values
      concatenated along channels (the module's fused projection).
    col_embedding: relative embeddings ``[L, heads, d]`` of the column step, or absolute
      ones ``[height, heads, d]`` (one per key row).
    row_embedding: as ``col_embedding`` for the row step (``[L or width, heads, d]``).
    bn_scale: BatchNorm scale ``[d_out]``.
    bn_bias: BatchNorm bias ``[d_out]``.
    bn_mean: BatchNorm running mean ``[d_out]``, used when not ``train``.
    bn_var: BatchNorm running variance ``[d_out]``, used when not ``train``.
    num_heads: heads ``n``; must divide ``key_features`` and ``d_out``.
    key_features: query/key channels ``d_k``.
    train: normalise with the batch statistics of the column output (else the running
      ones), as ``flax.linen.BatchNorm`` does.
    bn_epsilon: BatchNorm epsilon.
    content: add the content branch.
    position_embedding: ``'relative'`` or ``'absolute'``.
    normalize_queries: see :func:`content_attention`.
    softmax: softmax the positional weights over each neighbourhood.
    order: contraction order of the einsum path; see :func:`axial_attention`.
    implementation: ``None``, ``'xla'`` or ``'pallas'`` (module docstring).

  Returns:
    ``(out, mean, var)``: ``out [batch, height, width, d_out]`` in the dtype of ``qkv``,
    and the float32 statistics ``[d_out]`` the BatchNorm used (the batch statistics when
    ``train``), without gradient: what a layer feeds its running averages.
  """
  dispatch.check_implementation(implementation)
  _check_order(order, softmax)
  batch, height, width, channels = qkv.shape
  values = channels - 2 * key_features
  if values <= 0 or key_features % num_heads or values % num_heads:
    raise ValueError(
      f'qkv has {channels} channels: it must hold 2*key_features={2 * key_features} query '
      f'and key channels and value channels, both divisible by num_heads={num_heads}.'
    )
  if position_embedding not in ('relative', 'absolute'):
    raise ValueError(f'position_embedding={position_embedding!r}; valid: relative, absolute.')
  relative = position_embedding == 'relative'
  if relative and (col_embedding.shape[0] % 2 != 1 or row_embedding.shape[0] % 2 != 1):
    raise ValueError(
      'relative embeddings need an odd length L, got '
      f'L={col_embedding.shape[0]} (column) and L={row_embedding.shape[0]} (row).'
    )
  if not relative and implementation == 'pallas':
    raise ValueError(
      "implementation='pallas' has no kernel for absolute position embeddings; use "
      "implementation=None (einsum ops for them) or 'xla'."
    )
  dk, dv = key_features // num_heads, values // num_heads

  def reference(qkv, col_embedding, row_embedding, bn_scale, bn_bias, bn_mean, bn_var):
    q, k, v = jnp.split(qkv, [key_features, 2 * key_features], axis=-1)
    q = q.reshape(batch, height, width, num_heads, dk)
    k = k.reshape(batch, height, width, num_heads, dk)
    v = v.reshape(batch, height, width, num_heads, dv)

    def step(values, embedding, axis):
      if relative:
        return positional_attention(
          q, values, embedding, axis=axis, softmax=softmax, order=order, implementation='xla'
        )
      size = embedding.shape[0]
      table = jnp.broadcast_to(embedding[None], (size, *embedding.shape))
      return axial_attention(q, values, table, axis=axis, softmax=softmax, order=order)

    # The content branch is traced first: in the other order the XLA GPU compiler (jaxlib
    # 0.10.2) lays out the gradient of qkv channel-major and fails to tile the projection's
    # backward GEMM for the H100.
    out = jnp.zeros_like(v)
    if content:
      out = out + content_attention(q, k, v, normalize_queries=normalize_queries)
    y = step(v, col_embedding, HEIGHT_AXIS).reshape(batch, height, width, values)
    if train:
      y32 = y.astype(jnp.promote_types(y.dtype, jnp.float32))
      mean = jnp.mean(y32, axis=(0, 1, 2))
      var = jnp.maximum(jnp.mean(jnp.square(y32), axis=(0, 1, 2)) - jnp.square(mean), 0.0)
    else:
      mean, var = bn_mean.astype(jnp.float32), bn_var.astype(jnp.float32)
    # As flax.linen.BatchNorm: in (at least) float32, cast back to the computation dtype.
    normed = (y - mean) * (jax.lax.rsqrt(var + bn_epsilon) * bn_scale) + bn_bias
    normed = normed.astype(y.dtype).reshape(v.shape)
    out = out + step(normed, row_embedding, WIDTH_AXIS)
    out = out.reshape(batch, height, width, values)
    return out, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)

  args = (qkv, col_embedding, row_embedding, bn_scale, bn_bias, bn_mean, bn_var)
  if not relative:
    return reference(*args)

  def kernel(*args, backend, interpret=False):
    config = gsa_kernels.Config(
      num_heads,
      key_features,
      train,
      bn_epsilon,
      content,
      normalize_queries,
      softmax,
      backend,
      interpret,
    )
    return gsa_kernels.gsa_attention(*args, config)

  return dispatch.dispatch(implementation, reference, kernel, *args)


# ----------------------------------------------------------------------------- per-query weights


def content_weights(
  q: Array, k: Array, query: tuple[int, int], *, normalize_queries: bool = False
) -> Array:
  """Content-attention weights of one query pixel over every pixel, per head.

  Content attention's output at ``p`` is ``q_p (softmax_N(K)^T V) = sum_j a_pj v_j`` with
  ``a_pj = q_p . softmax_N(K)_j``: this returns ``a_p``. Queries are not normalized unless
  ``normalize_queries``, so weights can be negative and need not sum to one.

  Args:
    q: queries ``[batch, height, width, heads, d]``.
    k: keys ``[batch, height, width, heads, d]``.
    query: ``(x, y)``, row and column of the query pixel.
    normalize_queries: as in :func:`content_attention`.

  Returns:
    ``[batch, heads, height, width]`` float32: ``content_attention(q, k, v)`` at ``query``
    is ``sum_xy a[.., x, y] * v[:, x, y]``.
  """
  qp = _at_least_f32(q[:, query[0], query[1]])  # [batch, heads, d]
  if normalize_queries:
    qp = _query_softmax(qp)
  return jnp.einsum('bnd,bxynd->bnxy', qp, _key_softmax(k).astype(qp.dtype))


def positional_weights(
  q: Array,
  table: Array,
  valid: Array | None,
  query: tuple[int, int],
  *,
  axis: int,
  softmax: bool = False,
) -> tuple[Array, Array]:
  """Weights of one query pixel over the keys of its column (``axis=1``) or row (``axis=2``).

  The per-query reading of :func:`axial_attention`: ``axial_attention(q, v, table, valid,
  axis=axis)`` at ``query`` is ``sum_z w[.., z] * v`` over the keys ``z`` of that column or
  row.

  Args:
    q: queries ``[batch, height, width, heads, d]``.
    table: key embeddings ``[n, n, heads, d]`` along ``axis`` (from :func:`relative_table`,
      or an absolute embedding broadcast over queries).
    valid: optional ``[n, n]`` neighbourhood mask, as for :func:`axial_attention`.
    query: ``(x, y)``, row and column of the query pixel.
    axis: ``1`` column step (weights over rows), ``2`` row step (over columns).
    softmax: softmax the weights over the valid keys (the ``positional_softmax`` knob).

  Returns:
    ``(weights [batch, heads, n], valid [n])``; weights are zero where ``valid`` is False.
  """
  if axis not in (HEIGHT_AXIS, WIDTH_AXIS):
    raise ValueError(f'axis must be {HEIGHT_AXIS} (height) or {WIDTH_AXIS} (width), got {axis}.')
  position = query[axis - 1]
  qp = _at_least_f32(q[:, query[0], query[1]])  # [batch, heads, d]
  keys = table[position].astype(qp.dtype)  # [n, heads, d]
  row_valid = jnp.ones(keys.shape[:1], bool) if valid is None else valid[position]
  weights = jnp.einsum('bnd,znd->bnz', qp, keys)
  if softmax:
    weights = jax.nn.softmax(weights, axis=-1, where=row_valid)
  return jnp.where(row_valid, weights, 0.0), row_valid
