"""The whole attention of a GSA module (content + axial positional) in four kernel passes.

The fused counterpart of :func:`gsa_flax.model.ops.gsa_attention` for relative embeddings and
the axial positional branch (``docs/method.md``, "The GSA module"): from the fused
projection ``qkv [batch, height, width, 2*d_k + d_out]``,

1. the column step reads ``qkv`` once and writes the column output ``y``, its BatchNorm
   statistics and the content attention's context ``softmax_N(K)^T V`` (an online
   softmax over the pixels of each program, merged per image);
2. the row step reads ``qkv`` and ``y``, applies the BatchNorm to ``y`` on load and adds
   the content output ``Q context``: ``out = content + row(q, BN(y))``.

The backward pass runs the row step's gradient (also the content gradient through the
queries and the context, and the sums the BatchNorm backward needs), then the column
step's gradient, which applies the BatchNorm backward to its incoming gradient on load
and writes the gradient of ``qkv`` (queries, keys through the key softmax, values) in
one pass. Between the passes only per-channel vectors and per-image contexts go through
XLA, so the module's HBM traffic is a few reads of ``qkv`` and ``y``. On TPU, where a
program holds a whole image, the two backward kernels recompute ``y`` on chip from
``qkv`` (the column step once more) instead of reading it: ``y`` is not kept from the
forward to the backward pass, which saves its memory and two reads.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gsa_flax.model.kernels import axial_gpu, axial_tpu, layout

BACKENDS = ('mosaic', 'triton')
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
  """Static configuration of the fused GSA attention.

  Attributes:
    heads: attention heads ``n``.
    key_features: query/key channels ``d_k`` (``heads * d``).
    train: normalise the column output with its batch statistics (else the given
      running statistics).
    epsilon: BatchNorm epsilon.
    content: add the content branch.
    normalize_queries: softmax each query over its head's channels in the content branch.
    softmax: softmax the positional weights over each neighbourhood.
    backend: ``'mosaic'`` (TPU) or ``'triton'`` (NVIDIA GPU).
    interpret: run the kernels in the Pallas interpreter.
  """

  heads: int
  key_features: int
  train: bool
  epsilon: float = 1e-5
  content: bool = True
  normalize_queries: bool = False
  softmax: bool = False
  backend: str = 'mosaic'
  interpret: bool = False

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f'backend={self.backend!r}; valid: {", ".join(BACKENDS)}.')


def gsa_attention(
  qkv: jax.Array,
  rel_col: jax.Array,
  rel_row: jax.Array,
  bn_scale: jax.Array,
  bn_bias: jax.Array,
  bn_mean: jax.Array,
  bn_var: jax.Array,
  config: Config,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Content + column step + BatchNorm + row step of a GSA module, fused.

  Args:
    qkv: ``[batch, height, width, 2*d_k + d_out]``: queries, keys, values.
    rel_col: relative embeddings of the column step ``[L_col, heads, d]``.
    rel_row: relative embeddings of the row step ``[L_row, heads, d]``.
    bn_scale: BatchNorm scale ``[d_out]``.
    bn_bias: BatchNorm bias ``[d_out]``.
    bn_mean: running mean ``[d_out]`` (used when not ``config.train``).
    bn_var: running variance ``[d_out]`` (used when not ``config.train``).
    config: static configuration.

  Returns:
    ``(out, mean, var)``: ``out [batch, height, width, d_out]`` in the dtype of ``qkv``
    and the float32 statistics the BatchNorm used (batch statistics of the column output
    when training), which carry no gradient.
  """
  _check(qkv, rel_col, rel_row, config)
  out, mean, var = _fused(qkv, rel_col, rel_row, bn_scale, bn_bias, bn_mean, bn_var, config)
  return out, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


def _check(qkv, rel_col, rel_row, config):
  dk, heads = config.key_features, config.heads
  if qkv.ndim != 4 or qkv.shape[-1] <= 2 * dk or dk % heads or (qkv.shape[-1] - 2 * dk) % heads:
    raise ValueError(
      f'qkv {qkv.shape} must be [batch, height, width, 2*{dk} + d_out] with {heads} heads '
      'dividing both widths.'
    )
  for name, rel in (('rel_col', rel_col), ('rel_row', rel_row)):
    if rel.ndim != 3 or rel.shape[1:] != (heads, dk // heads) or rel.shape[0] % 2 != 1:
      raise ValueError(f'{name} {rel.shape} must be [L, {heads}, {dk // heads}] with L odd.')


def _steps(qkv, rel_col, rel_row, config):
  _, height, width, channels = qkv.shape
  dk = config.key_features
  dv = channels - 2 * dk

  def step(axis, rel):
    return layout.AxialStep(axis, height, width, config.heads, dk, dv, rel.shape[0], config.softmax)

  return step(layout.HEIGHT_AXIS, rel_col), step(layout.WIDTH_AXIS, rel_row)


def _kernels(config):
  return axial_tpu if config.backend == 'mosaic' else axial_gpu


def _pixels(x, config):
  """``[b, h, w, c]`` in the backend's kernel layout (a free reshape)."""
  b, h, w, c = x.shape
  return x.reshape(b, h * w, c) if config.backend == 'mosaic' else x


def _programs(x, batch):
  """Per-program partials ``[batch, (programs,) r, c]`` -> ``[batch, programs, r, c]``."""
  return x.reshape(batch, -1, *x.shape[-2:])


def _rows(rel, step, config, dtype):
  return layout.relative_rows(rel, step, _kernels(config).offset_lanes(step), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused(qkv, rel_col, rel_row, bn_scale, bn_bias, bn_mean, bn_var, config):
  return _forward(qkv, rel_col, rel_row, bn_scale, bn_bias, bn_mean, bn_var, config)[0]


def _forward(qkv, rel_col, rel_row, bn_scale, bn_bias, bn_mean, bn_var, config):
  batch, height, width, _ = qkv.shape
  col, row = _steps(qkv, rel_col, rel_row, config)
  kernels = _kernels(config)
  dk, dv = col.key_dim, col.value_dim
  src = _pixels(qkv, config)
  first = kernels.forward(
    col,
    src,
    _rows(rel_col, col, config, qkv.dtype),
    q_off=0,
    v_off=2 * dk,
    k_off=dk if config.content else None,
    stats=config.train,
    interpret=config.interpret,
  )
  y = first['out']
  if config.train:
    sums = _programs(first['stats'], batch).sum((0, 1))
    count = batch * height * width
    mean = sums[0] / count
    var = jnp.maximum(sums[1] / count - mean * mean, 0.0)
  else:
    mean, var = bn_mean.astype(F32), bn_var.astype(F32)
  rstd = jax.lax.rsqrt(var + config.epsilon)
  scale = bn_scale.astype(F32) * rstd
  affine = jnp.stack([scale, bn_bias.astype(F32) - mean * scale])
  context = key_stats = None
  if config.content:
    m, s, ctx = layout.merge_context(
      _programs(first['m'], batch)[:, :, 0],
      _programs(first['s'], batch)[:, :, 0],
      _programs(first['ctx'], batch),
    )
    context = jnp.where(layout.head_mask(dk, dv, config.heads), ctx, 0.0)
    key_stats = (m, s)
  out = kernels.forward(
    row,
    src,
    _rows(rel_row, row, config, qkv.dtype),
    q_off=0,
    vals=y,
    affine=affine,
    context=context,
    normalize_queries=config.normalize_queries,
    interpret=config.interpret,
  )['out']
  # On TPU the backward kernels recompute y on chip (a program holds a whole image, so the
  # row step's backward can run the column step first): it is not kept.
  kept_y = None if config.backend == 'mosaic' else y
  residuals = (qkv, kept_y, rel_col, rel_row, bn_scale, mean, var, affine, context, key_stats)
  return (out.reshape(batch, height, width, dv), mean, var), residuals


def _backward(config, residuals, cotangents):
  qkv, y, rel_col, rel_row, bn_scale, mean, var, affine, context, key_stats = residuals
  grad = cotangents[0]  # the statistics are stop_gradient'ed by gsa_attention
  batch, height, width, _ = qkv.shape
  col, row = _steps(qkv, rel_col, rel_row, config)
  kernels = _kernels(config)
  dk = col.key_dim
  src = _pixels(qkv, config)
  col_rows = _rows(rel_col, col, config, qkv.dtype)
  if y is None:  # TPU: y recomputed by the kernels; dq and dy in one array of 128-lane tiles
    values = dict(v_off=2 * dk, column=col, column_rel_t=col_rows, pack_grads=True)
    grad_y = dict(recompute_grad_y=True, grad_packed=True)
  else:
    values, grad_y = dict(vals=y), dict(grad_y=y)
  second = kernels.backward(
    row,
    src,
    _rows(rel_row, row, config, qkv.dtype),
    _pixels(grad.astype(qkv.dtype), config),
    q_off=0,
    **values,
    affine=affine,
    context=context,
    normalize_queries=config.normalize_queries,
    bn_sums=True,
    interpret=config.interpret,
  )
  # BatchNorm backward: dy = a * dybn + b * y + c per channel (b = c = 0 with running stats).
  sums = _programs(second['sums'], batch).sum((0, 1))
  s_g, s_gy = sums[0], sums[1]
  rstd = jax.lax.rsqrt(var + config.epsilon)
  gamma = bn_scale.astype(F32)
  dgamma = rstd * (s_gy - mean * s_g)
  dbeta = s_g
  a = gamma * rstd
  if config.train:
    count = batch * height * width
    b = -a * rstd * dgamma / count
    c = -a * s_g / count - b * mean
    dmean = dvar = jnp.zeros_like(mean)
  else:
    b = c = jnp.zeros_like(a)
    dmean = -a * s_g
    dvar = -0.5 * gamma * rstd**3 * (s_gy - mean * s_g)
  key_stats_in = dcontext = None
  if config.content:
    dcontext = _programs(second['dctx'], batch).sum(1)
    m, s = key_stats
    key_stats_in = jnp.stack([m, s, jnp.sum(dcontext * context, axis=-1)], axis=1)
  if y is None:
    incoming = dict(grad=second['dqv'])
  else:
    incoming = dict(grad=second['dvals'], dq_in=second['dq'])
  first = kernels.backward(
    col,
    src,
    col_rows,
    q_off=0,
    k_off=dk,
    v_off=2 * dk,
    grad_affine=jnp.stack([a, b, c]),
    **grad_y,
    **incoming,
    key_stats=key_stats_in,
    dcontext=dcontext,
    packed=True,
    interpret=config.interpret,
  )

  def drel(res, step, rel):
    partial = res['drel'].reshape(-1, *res['drel'].shape[-2:]).sum(0)
    return layout.relative_grad(partial, step, rel.dtype)

  pdtype = bn_scale.dtype
  return (
    first['dsrc'].reshape(qkv.shape),
    drel(first, col, rel_col),
    drel(second, row, rel_row),
    dgamma.astype(pdtype),
    dbeta.astype(pdtype),
    dmean.astype(pdtype),
    dvar.astype(pdtype),
  )


_fused.defvjp(_forward, _backward)


def hbm_bytes(
  qkv: jax.ShapeDtypeStruct,
  rel_col: jax.ShapeDtypeStruct,
  rel_row: jax.ShapeDtypeStruct,
  config: Config,
) -> dict[str, int]:
  """HBM bytes the four kernels copy in and out, from their grid and block specs.

  Args:
    qkv, rel_col, rel_row: shapes and dtypes of the arguments of :func:`gsa_attention`.
    config: its configuration.

  Returns:
    ``{'forward': bytes, 'backward': bytes}`` summed over every program's blocks (see
    :func:`gsa_flax.model.kernels.layout.grid_traffic`).
  """
  dv = qkv.shape[-1] - 2 * config.key_features
  vec = jax.ShapeDtypeStruct((dv,), F32)
  args = (qkv, rel_col, rel_row, vec, vec, vec, vec)
  fwd = jax.make_jaxpr(lambda *a: _forward(*a, config)[0])(*args)

  def fwd_bwd(*a):
    outs, residuals = _forward(*a, config)
    return _backward(config, residuals, outs)

  both = layout.grid_traffic(jax.make_jaxpr(fwd_bwd)(*args))[config.backend]
  forward = layout.grid_traffic(fwd)[config.backend]
  return {'forward': forward, 'backward': both - forward}
