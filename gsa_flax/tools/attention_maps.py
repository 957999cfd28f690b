r"""Attention maps of a network's GSA layers: what one query pixel attends to.

The maps are computed from intermediates that linen captures (``capture_intermediates``
keeps the output of every GSA module's fused ``qkv`` projection) and from the module's own
parameters (the position embeddings), so the model code is untouched. For a query pixel
``p = (x, y)`` of a GSA layer, per head:

- **Content weights** ``a_pj = q_p . softmax_N(K)_j`` over every pixel ``j``
  (:func:`gsa_flax.model.ops.content_weights`): content attention's output at ``p`` is
  ``sum_j a_pj v_j``. Queries are not normalized, so weights can be negative and need not
  sum to one.
- **Positional weights** along p's column, ``q_p . R_col[x' - x + c]``, and along its row,
  ``q_p . R_row[y' - y + c]`` (:func:`gsa_flax.model.ops.positional_weights`); the row step's
  values are the BatchNormed outputs of the column step. Zero outside the neighbourhood.

``tests/tools/test_attention_maps.py`` rebuilds each GSA module's output from these
weights, so they are the weights the model uses.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gsa_flax.data import input_pipeline
from gsa_flax.model import ops
from gsa_flax.model.layers import GSA
from gsa_flax.tools import plots
from gsa_flax.train import evaluators

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GSALayer:
  """A GSA module of a network and the feature map it attends over.

  Attributes:
    path: module path in the variables, e.g. ``'BottleneckBlock_0/GSA_0'`` (``''`` for a
      bare GSA module).
    height, width: size of the feature map.
    module: the module itself (its knobs: ``content``, ``positional``, ...).
  """

  path: str
  height: int
  width: int
  module: GSA


@dataclasses.dataclass(frozen=True)
class GSACapture:
  """Queries, keys and values of one GSA layer for a batch, and its parameters.

  Attributes:
    layer: the layer.
    q, k: ``[batch, height, width, heads, d]``.
    v: ``[batch, height, width, heads, e]``.
    params: the module's parameters (``qkv``, ``rel_col``/``rel_row`` or
      ``abs_col``/``abs_row``, ``bn_col``).
  """

  layer: GSALayer
  q: Array
  k: Array
  v: Array
  params: Mapping[str, Any]


def _is_qkv(module: nn.Module, method_name: str) -> bool:
  return method_name == '__call__' and module.name == 'qkv' and isinstance(module.parent, GSA)


def _subtree(tree: Mapping[str, Any], path: str) -> Any:
  for name in filter(None, path.split('/')):
    tree = tree[name]
  return tree


@functools.lru_cache(maxsize=16)
def find_gsa_layers(model: nn.Module, image_shape: tuple[int, ...]) -> tuple[GSALayer, ...]:
  """The GSA modules of ``model`` in call order (empty for a convolutional network).

  Traces ``model.init`` abstractly (``jax.eval_shape``: nothing is computed), recording
  every GSA module the filter of ``capture_intermediates`` sees.

  Args:
    model: an unbound linen module (a network or a bare :class:`GSA`); hashable.
    image_shape: ``(height, width, channels)`` of its input.
  """
  found: dict[str, GSA] = {}

  def record(module: nn.Module, method_name: str) -> bool:
    if isinstance(module, GSA) and method_name == '__call__':
      found['/'.join(module.scope.path)] = module
      return True
    return False

  x = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), x, train=False, capture_intermediates=record)
  )
  layers = []
  for path, module in found.items():
    out = _subtree(variables['intermediates'], path)['__call__'][0]
    layers.append(GSALayer(path, out.shape[1], out.shape[2], module.clone(parent=None)))
  return tuple(layers)


@functools.lru_cache(maxsize=16)
def _capture_fn(model: nn.Module):
  """One jitted eval-mode apply that returns the ``qkv`` outputs of every GSA module."""

  def run(variables, images):
    _, state = model.apply(
      variables, images, train=False, capture_intermediates=_is_qkv, mutable=['intermediates']
    )
    return state['intermediates']

  return jax.jit(run)


def capture(
  model: nn.Module, variables: Mapping[str, Any], images: Array | np.ndarray
) -> list[GSACapture]:
  """Runs ``model`` in eval mode on ``images`` and returns every GSA layer's q, k, v.

  Args:
    model: an unbound linen module containing GSA modules (or a bare GSA).
    variables: its ``{'params': ..., 'batch_stats': ...}``.
    images: ``[batch, height, width, channels]``, preprocessed like eval.

  Returns:
    One :class:`GSACapture` per GSA layer, in call order; empty for a network without GSA.
  """
  layers = find_gsa_layers(model, tuple(images.shape[1:]))
  if not layers:
    return []
  intermediates = _capture_fn(model)(variables, images)
  captures = []
  for layer in layers:
    qkv = _subtree(intermediates, layer.path)['qkv']['__call__'][0]
    batch, height, width, channels = qkv.shape
    features, heads = layer.module.features, layer.module.num_heads
    key_features = (channels - features) // 2  # the projection is [q (d_k), k (d_k), v]
    q, k, v = jnp.split(qkv, [key_features, 2 * key_features], axis=-1)
    captures.append(
      GSACapture(
        layer=layer,
        q=q.reshape(batch, height, width, heads, key_features // heads),
        k=k.reshape(batch, height, width, heads, key_features // heads),
        v=v.reshape(batch, height, width, heads, features // heads),
        params=_subtree(variables['params'], layer.path),
      )
    )
  return captures


@dataclasses.dataclass(frozen=True)
class AttentionMaps:
  """The weights one query pixel of one GSA layer gives, for one image, per head.

  Attributes:
    layer: the layer.
    query: ``(x, y)`` in the layer's feature map.
    content: ``[heads, height, width]``, or None without a content branch.
    column, column_valid: ``[heads, height]`` and ``[height]``, or None without positional
      attention.
    row, row_valid: ``[heads, width]`` and ``[width]``, or None unless axial.
  """

  layer: GSALayer
  query: tuple[int, int]
  content: np.ndarray | None
  column: np.ndarray | None
  column_valid: np.ndarray | None
  row: np.ndarray | None
  row_valid: np.ndarray | None


def step_table(params: Mapping[str, Any], module: GSA, step: str, length: int):
  """The key embeddings ``(table [n, n, heads, d], valid [n, n] | None)`` of one axial step.

  Args:
    params: the GSA module's parameters.
    module: the module (its ``position_embedding``).
    step: ``'col'`` or ``'row'``.
    length: the size of the attended axis.
  """
  if module.position_embedding == 'relative':
    return ops.relative_table(params[f'rel_{step}'], length)
  emb = params[f'abs_{step}']  # one embedding per key position, shared by every query
  return jnp.broadcast_to(emb[None], (length, *emb.shape)), None


def attention_maps(
  cap: GSACapture, query: tuple[int, int] | None = None, index: int = 0
) -> AttentionMaps:
  """The content and positional weights of ``query`` in image ``index`` of a capture.

  Args:
    cap: from :func:`capture`.
    query: ``(x, y)`` in the layer's feature map; None is the center pixel.
    index: which image of the captured batch.

  Raises:
    ValueError: ``query`` outside the layer's feature map.
  """
  layer, module = cap.layer, cap.layer.module
  if query is None:
    query = (layer.height // 2, layer.width // 2)
  x, y = query
  if not (0 <= x < layer.height and 0 <= y < layer.width):
    raise ValueError(
      f'query {query} is outside the {layer.height}x{layer.width} map of {layer.path or "GSA"}.'
    )
  q = cap.q[index : index + 1]
  content = column = column_valid = row = row_valid = None
  if module.content:
    weights = ops.content_weights(
      q, cap.k[index : index + 1], query, normalize_queries=module.normalize_queries
    )
    content = np.asarray(weights[0])
  steps = {'col': (layer.height, ops.HEIGHT_AXIS), 'row': (layer.width, ops.WIDTH_AXIS)}
  found = {}
  for step in {'axial': ('col', 'row'), 'column': ('col',), 'none': ()}[module.positional]:
    length, axis = steps[step]
    table, valid = step_table(cap.params, module, step, length)
    weights, row_ok = ops.positional_weights(
      q, table, valid, query, axis=axis, softmax=module.positional_softmax
    )
    found[step] = np.asarray(weights[0]), np.asarray(row_ok)
  if 'col' in found:
    column, column_valid = found['col']
  if 'row' in found:
    row, row_valid = found['row']
  return AttentionMaps(layer, (int(x), int(y)), content, column, column_valid, row, row_valid)


def pick_layer(captures: Sequence[GSACapture], layer: int | str) -> GSACapture:
  """A capture by index in call order (``-1``: the last) or by module path.

  Raises:
    ValueError: no such layer (the message lists the network's GSA layers).
  """
  paths = [c.layer.path for c in captures]
  if isinstance(layer, int) or layer.lstrip('-').isdigit():
    index = int(layer)
    if -len(captures) <= index < len(captures):
      return captures[index]
  elif layer in paths:
    return captures[paths.index(layer)]
  raise ValueError(
    f'no GSA layer {layer!r}; the network has {len(paths)}: {", ".join(paths)} '
    '(pass an index or a path).'
  )


def select(
  captures: Sequence[GSACapture], layers: Sequence[int | str], head: int | None = None
) -> list[GSACapture]:
  """The captures of ``layers`` (indices or paths), each once, in the order given.

  Raises:
    ValueError: no GSA layer at all, no such layer, or ``head`` out of range for one.
  """
  if not captures:
    raise ValueError('the model has no GSA layer (a convolutional ResNet): nothing to draw.')
  chosen = {}
  for cap in (pick_layer(captures, layer) for layer in layers):
    chosen.setdefault(cap.layer.path, cap)
  chosen = list(chosen.values())
  for cap in chosen:
    heads = cap.layer.module.num_heads
    if head is not None and not 0 <= head < heads:
      raise ValueError(f'head={head}, but {cap.layer.path} has {heads} heads.')
  return chosen


def _local(tree: Any) -> Any:
  """This process's copy of replicated arrays: applying it needs no other process."""
  return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


class AttentionMapEvaluator:
  """Renders attention maps of the first eval images at every evaluation (TensorBoard).

  The first and last GSA layers, center query pixel, mean over heads, one figure per
  image, as ``attention_maps`` images. One jitted eval-mode apply on ``count`` images, on
  process 0 only; a network without GSA layers gives nothing.
  """

  def __init__(self, context: evaluators.Context, count: int = 3):
    self.context = context
    self.count = count

  def run(self, variables: Mapping[str, Any]) -> dict[str, Any]:
    spec, image_size = self.context.spec, self.context.image_size
    shape = (image_size, image_size, 3)
    if jax.process_index() > 0 or not find_gsa_layers(self.context.model, shape):
      return {}
    images, _ = input_pipeline.eval_images(
      self.context.builder, spec=spec, image_size=image_size, count=self.count
    )
    captures = capture(self.context.model, _local(dict(variables)), images)
    chosen = select(captures, (0, -1))
    rendered = []
    for i in range(len(images)):
      fig = plots.attention_figure(
        plots.display_image(images[i], spec), [attention_maps(c, index=i) for c in chosen]
      )
      rendered.append(plots.figure_to_array(fig))
    return {'attention_maps': np.stack(rendered)}
