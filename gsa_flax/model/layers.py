"""The GSA module (Shen et al. 2020, Fig. 1) as a Flax linen layer.

The layer owns the parameters (the fused 1x1 query/key/value projection, the relative
position embeddings, the BatchNorm between the axial steps and its running statistics)
and calls the pure ops of :mod:`gsa_flax.model.ops`, where the math lives; ``implementation``
chooses between the einsum ops and the fused Pallas kernels, as
:func:`jax.nn.dot_product_attention` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gsa_flax.model import dispatch, ops

POSITIONAL_MODES = ('axial', 'column', 'none')
POSITION_EMBEDDINGS = ('relative', 'absolute')
ORDERS = ('auto', 'logits', 'values')
IMPLEMENTATIONS = dispatch.IMPLEMENTATIONS


def global_rel_length(height: int, width: int) -> int:
  """The relative-embedding length that reaches every pixel of a row and column."""
  return 2 * max(height, width) - 1


def check_gsa_config(
  features: int,
  num_heads: int,
  key_features: int,
  content: bool,
  positional: str,
  position_embedding: str,
  rel_length: int | None,
  order: str = 'auto',
  positional_softmax: bool = False,
  implementation: str | None = None,
) -> None:
  """Raises ValueError, naming the knob, when a GSA configuration cannot be built."""
  if features <= 0 or key_features <= 0:
    raise ValueError(
      f'GSA needs positive widths, got features={features}, key_features={key_features}.'
    )
  if num_heads <= 0 or features % num_heads or key_features % num_heads:
    raise ValueError(
      f'GSA num_heads={num_heads} must divide both the value width features={features} and '
      f'the key width key_features={key_features}; choose heads that divide both.'
    )
  if positional not in POSITIONAL_MODES:
    raise ValueError(f'GSA positional={positional!r}; valid: {", ".join(POSITIONAL_MODES)}.')
  if position_embedding not in POSITION_EMBEDDINGS:
    raise ValueError(
      f'GSA position_embedding={position_embedding!r}; valid: {", ".join(POSITION_EMBEDDINGS)}.'
    )
  if not content and positional == 'none':
    raise ValueError('GSA with content=False and positional="none" computes nothing; enable one.')
  if rel_length is not None and (rel_length <= 0 or rel_length % 2 == 0):
    raise ValueError(f'GSA rel_length must be a positive odd number or None, got {rel_length}.')
  if order not in ORDERS:
    raise ValueError(f'GSA order={order!r}; valid: {", ".join(ORDERS)}.')
  if order == 'values' and positional_softmax:
    raise ValueError(
      "GSA order='values' never forms the positional weights, so it cannot softmax them; "
      "use order='auto' or 'logits' with positional_softmax=True."
    )
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f'GSA implementation={implementation!r}; valid: None (the best for the platform), '
      "'xla' (einsum ops) or 'pallas' (Pallas kernels)."
    )
  if implementation == 'pallas' and (position_embedding == 'absolute' or positional == 'none'):
    raise ValueError(
      "GSA implementation='pallas' has kernels for relative position embeddings only, and "
      f'none for position_embedding={position_embedding!r} with positional={positional!r}; '
      "use implementation=None (einsum ops where no kernel applies) or 'xla'."
    )


class GSA(nn.Module):
  """Global self-attention module: content attention + axial positional attention.

  ``F_out = F_content + F_positional`` with no output projection, residual or
  normalisation around it (``docs/method.md``, "The GSA module"); in a network a BatchNorm and
  ReLU follow, as they followed the 3x3 convolution that the module replaces.

  Attributes:
    features: output (value) channels ``d_out``.
    num_heads: heads; must divide ``features`` and ``key_features``.
    key_features: query/key channels ``d_k``; ``None`` means ``features // 2``.
    rel_length: length ``L`` (odd) of the relative position embeddings; ``None`` means
      global, ``2 * max(H, W) - 1`` sized from the input at ``init``. Inputs larger than
      the ``L`` a model was initialised with attend within the ``(L-1)/2`` neighbourhood.
    content: keep the content branch (ablation: ``False`` is positional-only).
    positional: ``'axial'`` (column step, BatchNorm, row step), ``'column'`` (column step
      only) or ``'none'`` (content-only).
    position_embedding: ``'relative'`` (the paper) or ``'absolute'`` (ablation: one
      learned embedding per key position along each axis, shared by every query).
    normalize_queries: softmax each query over its channels in the content branch.
    positional_softmax: softmax the positional weights over the neighbourhood.
    order: contraction order of the einsum path's positional steps, ``'auto'`` (the
      cheaper for the shape), ``'logits'`` or ``'values'``; the same result either way
      (see :func:`gsa_flax.model.ops.axial_attention`).
    implementation: ``None`` (the Pallas kernels on TPU and NVIDIA GPUs, the einsum ops
      elsewhere and for absolute embeddings), ``'xla'`` (einsum ops) or ``'pallas'`` (the
      kernels; in the Pallas interpreter on other platforms); see :mod:`gsa_flax.model.ops`.
      The parameters are the same for all three.
    bn_momentum: momentum of the BatchNorm between the column and row steps.
    dtype: computation dtype (e.g. ``jnp.bfloat16``).
    param_dtype: parameter dtype.
  """

  features: int
  num_heads: int = 8
  key_features: int | None = None
  rel_length: int | None = None
  content: bool = True
  positional: str = 'axial'
  position_embedding: str = 'relative'
  normalize_queries: bool = False
  positional_softmax: bool = False
  order: str = 'auto'
  implementation: str | None = None
  bn_momentum: float = 0.9
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Applies GSA to ``x`` ``[batch, height, width, channels]``.

    Returns:
      ``[batch, height, width, features]``.
    """
    key_features = self.features // 2 if self.key_features is None else self.key_features
    check_gsa_config(
      self.features,
      self.num_heads,
      key_features,
      self.content,
      self.positional,
      self.position_embedding,
      self.rel_length,
      self.order,
      self.positional_softmax,
      self.implementation,
    )
    batch, height, width, _ = x.shape
    heads = self.num_heads
    dk, dv = key_features // heads, self.features // heads

    # One fused 1x1 projection (no bias: a BatchNorm follows in the network).
    qkv = nn.Dense(
      2 * key_features + self.features,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='qkv',
    )(x)
    init = nn.initializers.normal(stddev=dk**-0.5)
    if self.positional == 'axial':
      col_emb = self._embedding('col', height, width, heads, dk, init)
      row_emb = self._embedding('row', width, height, heads, dk, init)
      bn = _BatchNormVariables(self.features, self.bn_momentum, self.param_dtype, name='bn_col')
      out, mean, var = ops.gsa_attention(
        qkv,
        col_emb,
        row_emb,
        bn.scale,
        bn.bias,
        bn.mean.value,
        bn.var.value,
        num_heads=heads,
        key_features=key_features,
        train=train,
        content=self.content,
        position_embedding=self.position_embedding,
        normalize_queries=self.normalize_queries,
        softmax=self.positional_softmax,
        order=self.order,
        implementation=self.implementation,
      )
      if train:
        bn.update(mean, var)
      return out

    q, k, v = jnp.split(qkv, [key_features, 2 * key_features], axis=-1)
    q = q.reshape(batch, height, width, heads, dk)
    k = k.reshape(batch, height, width, heads, dk)
    v = v.reshape(batch, height, width, heads, dv)
    out = jnp.zeros_like(v)
    if self.content:
      out = out + ops.content_attention(q, k, v, normalize_queries=self.normalize_queries)
    if self.positional == 'column':
      out = out + self._column_step(q, v, self._embedding('col', height, width, heads, dk, init))
    return out.reshape(batch, height, width, self.features)

  def _embedding(self, name, length, other, heads, dk, init):
    """The position embeddings of one axial step: ``rel_{name}`` or ``abs_{name}``."""
    if self.position_embedding == 'absolute':
      return self.param(f'abs_{name}', init, (length, heads, dk), self.param_dtype)
    param_name = f'rel_{name}'
    if self.rel_length is None and self.has_variable('params', param_name):
      # Global length was fixed by the input seen at init; other sizes reuse that table.
      return self.get_variable('params', param_name)
    rel_length = self.rel_length or global_rel_length(length, other)
    return self.param(param_name, init, (rel_length, heads, dk), self.param_dtype)

  def _column_step(self, q, v, emb):
    """The column step alone (``positional='column'``)."""
    if self.position_embedding == 'absolute':
      table = jnp.broadcast_to(emb[None], (emb.shape[0], *emb.shape))
      return ops.axial_attention(
        q, v, table, axis=ops.HEIGHT_AXIS, softmax=self.positional_softmax, order=self.order
      )
    return ops.positional_attention(
      q,
      v,
      emb,
      axis=ops.HEIGHT_AXIS,
      softmax=self.positional_softmax,
      order=self.order,
      implementation=self.implementation,
    )


class _BatchNormVariables(nn.Module):
  """The variables of ``flax.linen.BatchNorm`` over channels (same names, shapes, inits).

  :func:`gsa_flax.model.ops.gsa_attention` applies the BatchNorm between the axial steps inside
  the attention (fused into the kernels); this module holds its scale and bias and keeps
  the running statistics as ``flax.linen.BatchNorm`` would, so parameters and checkpoints
  are the same whichever implementation runs.
  """

  features: int
  momentum: float
  param_dtype: Any = jnp.float32

  def setup(self):
    shape = (self.features,)
    self.scale = self.param('scale', nn.initializers.ones, shape, self.param_dtype)
    self.bias = self.param('bias', nn.initializers.zeros, shape, self.param_dtype)
    self.mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(shape, jnp.float32))
    self.var = self.variable('batch_stats', 'var', lambda: jnp.ones(shape, jnp.float32))

  def update(self, mean: jax.Array, var: jax.Array) -> None:
    """Folds batch statistics into the running averages (not while initialising)."""
    if not self.is_initializing():
      self.mean.value = self.momentum * self.mean.value + (1 - self.momentum) * mean
      self.var.value = self.momentum * self.var.value + (1 - self.momentum) * var


# The knobs of a GSA module besides its widths and dtypes: what a network hands every GSA
# layer it builds (``ResNet.gsa``) and a config's ``gsa`` fields set. Made from GSA's own
# fields, so each knob is declared (and documented) once, on :class:`GSA`.
GSA_KNOBS = (
  'num_heads',
  'rel_length',
  'content',
  'positional',
  'position_embedding',
  'normalize_queries',
  'positional_softmax',
  'order',
  'implementation',
)
GSAOptions = dataclasses.make_dataclass(
  'GSAOptions',
  [
    (field.name, field.type, dataclasses.field(default=field.default))
    for field in dataclasses.fields(GSA)
    if field.name in GSA_KNOBS
  ],
  frozen=True,
)
GSAOptions.__module__ = __name__  # for pickling and repr (make_dataclass's module= is 3.12+)
GSAOptions.__doc__ = (
  'The knobs of :class:`GSA` other than its widths and dtypes, as one frozen, hashable value '
  '(same names, defaults and meaning as its attributes): ``GSA(features, **dataclasses.asdict('
  'options))``.'
)
