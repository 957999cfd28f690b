"""One axial step of GSA positional attention with relative embeddings, as Pallas kernels.

The fused counterpart of :func:`gsa_flax.model.ops.positional_attention` (same arguments, same
result): ``out[.., i, ..] = sum_j w[i, j] v[.., j, ..]`` along the height (``axis=1``,
the column step) or the width (``axis=2``, the row step), with
``w[i, j] = q[.., i, ..] . rel[j - i + (L - 1) / 2]`` inside the neighbourhood
``|j - i| <= (L - 1) / 2`` (optionally softmaxed over it). The per-pixel weights stay on
chip (VMEM on TPU, registers on GPU); see :mod:`gsa_flax.model.kernels.axial_tpu` and
:mod:`gsa_flax.model.kernels.axial_gpu` for the blocking. The backward pass is a second kernel
(:func:`jax.custom_vjp`) that recomputes the weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gsa_flax.model.kernels import axial_gpu, axial_tpu, layout

BACKENDS = ('mosaic', 'triton')


def _module(backend: str):
  if backend not in BACKENDS:
    raise ValueError(f'backend={backend!r}; valid: {", ".join(BACKENDS)}.')
  return axial_tpu if backend == 'mosaic' else axial_gpu


def _step(q, v, rel, axis, softmax) -> layout.AxialStep:
  if q.ndim != 5 or v.ndim != 5 or q.shape[:4] != v.shape[:4] or rel.ndim != 3:
    raise ValueError(
      'positional attention needs q [batch, height, width, heads, d], v [batch, height, '
      f'width, heads, e] and rel [L, heads, d]; got {q.shape}, {v.shape}, {rel.shape}.'
    )
  _, height, width, heads, d = q.shape
  return layout.AxialStep(
    axis, height, width, heads, heads * d, heads * v.shape[-1], rel.shape[0], softmax
  )


def _pixels(x, backend):
  """``[b, h, w, n, c]`` in the layout of the backend's kernels (a free reshape)."""
  b, h, w, n, c = x.shape
  return x.reshape(b, h * w, n * c) if backend == 'mosaic' else x.reshape(b, h, w, n * c)


def positional_attention(
  q: jax.Array,
  v: jax.Array,
  rel: jax.Array,
  *,
  axis: int,
  softmax: bool = False,
  backend: str = 'mosaic',
  interpret: bool = False,
) -> jax.Array:
  """Axial positional attention with relative embeddings, fused into one kernel per pass.

  Args:
    q: queries ``[batch, height, width, heads, d]``.
    v: values ``[batch, height, width, heads, e]``.
    rel: relative embeddings ``[L, heads, d]``, ``L`` odd, ``rel[(L-1)//2]`` = offset 0.
    axis: ``1`` for the column step (along the height), ``2`` for the row step.
    softmax: softmax the weights of each query over its neighbourhood.
    backend: ``'mosaic'`` (TPU) or ``'triton'`` (NVIDIA GPU).
    interpret: run the kernels in the Pallas interpreter (any platform; for tests).

  Returns:
    ``[batch, height, width, heads, e]`` in the dtype of ``v``; operands are rounded to the
    common dtype of ``q`` and ``v`` and products accumulate in float32.
  """
  _module(backend)
  _step(q, v, rel, axis, softmax)
  return _attention(q, v, rel, axis, softmax, backend, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, v, rel, axis, softmax, backend, interpret):
  return _forward(q, v, rel, axis, softmax, backend, interpret)[0]


def _forward(q, v, rel, axis, softmax, backend, interpret):
  step = _step(q, v, rel, axis, softmax)
  kernels = _module(backend)
  dtype = jnp.result_type(q.dtype, v.dtype)
  rel_t = layout.relative_rows(rel, step, kernels.offset_lanes(step), dtype)
  src, vals = _pixels(q.astype(dtype), backend), _pixels(v.astype(dtype), backend)
  out = kernels.forward(step, src, rel_t, q_off=0, vals=vals, interpret=interpret)['out']
  return out.reshape(v.shape).astype(v.dtype), (q, v, rel)


def _backward(axis, softmax, backend, interpret, residuals, grad):
  q, v, rel = residuals
  step = _step(q, v, rel, axis, softmax)
  kernels = _module(backend)
  dtype = jnp.result_type(q.dtype, v.dtype)
  rel_t = layout.relative_rows(rel, step, kernels.offset_lanes(step), dtype)
  res = kernels.backward(
    step,
    _pixels(q.astype(dtype), backend),
    rel_t,
    _pixels(grad.astype(dtype), backend),
    q_off=0,
    vals=_pixels(v.astype(dtype), backend),
    interpret=interpret,
  )
  drel = res['drel'].reshape(-1, *res['drel'].shape[-2:]).sum(0)
  return (
    res['dq'].reshape(q.shape).astype(q.dtype),
    res['dvals'].reshape(v.shape).astype(v.dtype),
    layout.relative_grad(drel, step, rel.dtype),
  )


_attention.defvjp(_forward, _backward)


def hbm_bytes(
  q: jax.ShapeDtypeStruct,
  v: jax.ShapeDtypeStruct,
  rel: jax.ShapeDtypeStruct,
  *,
  axis: int,
  softmax: bool = False,
  backend: str = 'mosaic',
) -> dict[str, int]:
  """HBM bytes the kernels copy in and out, from their grid and block specs.

  Args:
    q, v, rel: shapes and dtypes of the arguments of :func:`positional_attention`.
    axis, softmax, backend: as for :func:`positional_attention`.

  Returns:
    ``{'forward': bytes, 'backward': bytes}``: every program's input and output blocks,
    summed over the grid (see :func:`gsa_flax.model.kernels.layout.grid_traffic`).
  """
  fwd = jax.make_jaxpr(lambda q, v, rel: _forward(q, v, rel, axis, softmax, backend, False)[0])(
    q, v, rel
  )
  bwd = jax.make_jaxpr(
    lambda q, v, rel, g: _backward(axis, softmax, backend, False, (q, v, rel), g)
  )(q, v, rel, v)
  return {
    'forward': layout.grid_traffic(fwd)[backend],
    'backward': layout.grid_traffic(bwd)[backend],
  }
