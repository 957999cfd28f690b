# Frozen copy of gsa_flax/ops.py at commit 86b29d8, before the speed work: the 'before' rows
# of BENCHMARKS.md (benchmarks/gsa_vs_peer.py, impl ours-before). Not used by the package.
"""The attention math of GSA-Net as pure functions of arrays (no parameters).

Shapes use one vocabulary everywhere, written as einsum subscripts:
``b`` batch, ``x`` height (rows of the image), ``y`` width (columns), ``n`` heads,
``d`` key/query channels per head, ``e`` value channels per head, ``z`` the key position
along the attended axis, ``l`` a relative offset.

The specification is ``shared/GSA_METHOD.md`` (Shen et al. 2020, "Global Self-Attention
Networks for Image Recognition", arXiv 2010.03019, Sec. 3). Neither op ever builds an
array with ``(height*width)**2`` elements: content attention is linear in the number of
pixels and positional attention is axial (``O(N * (H + W))``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

HEIGHT_AXIS = 1
WIDTH_AXIS = 2


def _at_least_f32(a: Array) -> Array:
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def content_attention(q: Array, k: Array, v: Array, *, normalize_queries: bool = False) -> Array:
  """Global content attention, ``Q (softmax_N(K)^T V)`` per head (GSA_METHOD, "Content").

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
  k = jax.nn.softmax(_at_least_f32(k), axis=(HEIGHT_AXIS, WIDTH_AXIS)).astype(dtype)
  if normalize_queries:
    q = jax.nn.softmax(_at_least_f32(q), axis=-1).astype(dtype)
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

  Returns:
    ``[batch, height, width, heads, e]``.
  """
  if axis == HEIGHT_AXIS:
    logits = jnp.einsum('bxynd,xznd->bxynz', q, table.astype(q.dtype))
  elif axis == WIDTH_AXIS:
    logits = jnp.einsum('bxynd,yznd->bxynz', q, table.astype(q.dtype))
  else:
    raise ValueError(f'axis must be {HEIGHT_AXIS} (height) or {WIDTH_AXIS} (width), got {axis}.')
  if softmax:
    # mask [query, key] -> broadcast over [b, x, y, n, z] with the query on `axis`.
    mask = None if valid is None else (valid[:, None, None, :] if axis == 1 else valid[:, None, :])
    logits = jax.nn.softmax(_at_least_f32(logits), axis=-1, where=mask)
    if mask is not None:
      logits = jnp.where(mask, logits, 0.0)
    logits = logits.astype(v.dtype)
  if axis == HEIGHT_AXIS:
    return jnp.einsum('bxynz,bzyne->bxyne', logits, v)
  return jnp.einsum('bxynz,bxzne->bxyne', logits, v)


def positional_attention(
  q: Array, v: Array, rel: Array, *, axis: int, softmax: bool = False
) -> Array:
  """One axial step of GSA positional attention with relative position embeddings.

  For ``axis=1`` (the column step, along the height; GSA_METHOD "Positional"):
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

  Returns:
    ``[batch, height, width, heads, e]``.
  """
  table, valid = relative_table(rel, q.shape[axis])
  return axial_attention(q, v, table, valid, axis=axis, softmax=softmax)
