r"""Attention maps of GSA layers and learning curves, drawn with matplotlib.

The maps are computed from intermediates that linen captures for us
(``capture_intermediates`` keeps the output of every GSA module's fused ``qkv``
projection) and from the module's own parameters (the position embeddings), so the
model code is untouched. For a query pixel ``p = (x, y)`` of a GSA layer, per head:

- **Content weights.** The content output is ``q_p (softmax_N(K)^T V) = sum_j a_pj v_j``
  with ``a_pj = q_p . softmax_N(K)_j`` (GSA_METHOD "Content attention"): ``a_p`` is a map
  over every pixel ``j``. Queries are not normalized, so weights can be negative and need
  not sum to one (with ``normalize_queries`` the query is softmaxed first).
- **Positional weights.** The column step gives ``w_col(x') = q_p . R_col[x' - x + c]`` to
  the pixels ``(x', y)`` of p's column; the row step gives ``w_row(y') = q_p . R_row[y' - y
  + c]`` to the pixels ``(x, y')`` of p's row, whose values are the BatchNormed outputs of
  the column step (GSA_METHOD "Positional attention"). Zero outside the neighbourhood
  ``|offset| <= c``; softmaxed over it with ``positional_softmax``.

``tests/test_visualize.py`` rebuilds each GSA module's output from these weights, so they
are the weights the model uses. Figures average the maps over heads (each head has its own
values, so the mean is a summary; the positional panel also shows the range over heads).

Attention maps from a checkpoint, for the first eval images or for image files::

  python -m gsa_flax.visualize --workdir=/tmp/gsa --output=attention.png [IMAGE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from gsa_flax import input_pipeline
from gsa_flax.layers import GSA

Array = jax.Array


# ----------------------------------------------------------------------------- the weights


def content_weights(
  q: Array, k: Array, query: tuple[int, int], *, normalize_queries: bool = False
) -> Array:
  """Content-attention weights of one query pixel over every pixel, per head.

  Args:
    q: queries ``[batch, height, width, heads, d]``.
    k: keys ``[batch, height, width, heads, d]``.
    query: ``(x, y)``, row and column of the query pixel.
    normalize_queries: as the GSA knob: softmax the query over its channels first.

  Returns:
    ``a`` ``[batch, heads, height, width]`` (float32) with ``content_out[p] = sum_j
    a[.., j] * v[j]`` for ``p = query``.
  """
  keys = jax.nn.softmax(k.astype(jnp.float32), axis=(1, 2))  # over the N pixels, per channel
  qp = q[:, query[0], query[1]].astype(jnp.float32)  # [batch, heads, d]
  if normalize_queries:
    qp = jax.nn.softmax(qp, axis=-1)
  return jnp.einsum('bnd,bxynd->bnxy', qp, keys)


def positional_weights(
  q: Array,
  embedding: Array,
  query: tuple[int, int],
  *,
  axis: int,
  relative: bool = True,
  softmax: bool = False,
) -> tuple[Array, Array]:
  """Positional weights of one query pixel along its column (``axis=1``) or row (``axis=2``).

  Args:
    q: queries ``[batch, height, width, heads, d]``.
    embedding: the step's embeddings: relative ``[L, heads, d]`` (``L`` odd, entry
      ``(L-1)//2`` is offset 0; offset = key minus query) or, with ``relative=False``,
      absolute ``[length, heads, d]``, one per key position.
    query: ``(x, y)``, row and column of the query pixel.
    axis: ``1`` column step (weights over rows ``x'``), ``2`` row step (over columns ``y'``).
    relative: whether ``embedding`` is relative (the paper) or absolute (ablation).
    softmax: softmax the weights over the neighbourhood (the ``positional_softmax`` knob).

  Returns:
    ``(weights [batch, heads, length], valid [length])``: ``weights`` is zero where
    ``valid`` is False (outside the neighbourhood); ``length`` is the size of ``axis``.
  """
  if axis not in (1, 2):
    raise ValueError(f'axis must be 1 (column step) or 2 (row step), got {axis}.')
  length = q.shape[axis]
  qp = q[:, query[0], query[1]].astype(jnp.float32)  # [batch, heads, d]
  if relative:
    num_rel = embedding.shape[0]
    center = (num_rel - 1) // 2
    offsets = jnp.arange(length) - query[axis - 1]  # key position minus query position
    valid = jnp.abs(offsets) <= center
    keys = embedding[jnp.clip(offsets + center, 0, num_rel - 1)]  # [length, heads, d]
  else:
    valid = jnp.ones((length,), bool)
    keys = embedding
  weights = jnp.einsum('bnd,znd->bnz', qp, keys.astype(jnp.float32))
  if softmax:
    weights = jax.nn.softmax(weights, axis=-1, where=valid)
  return jnp.where(valid, weights, 0.0), valid


# ----------------------------------------------------------------------------- capture


@dataclasses.dataclass(frozen=True)
class GSALayer:
  """Where a GSA module sits in a network and the knobs its maps depend on.

  Attributes:
    path: module path in the variables, e.g. ``'BottleneckBlock_0/GSA_0'`` (``''`` for a
      bare GSA module).
    height, width: size of the feature map it attends over.
    features, key_features, num_heads: its widths.
    content, positional, position_embedding, normalize_queries, positional_softmax: its
      knobs (see :class:`~gsa_flax.layers.GSA`).
  """

  path: str
  height: int
  width: int
  features: int
  key_features: int
  num_heads: int
  content: bool
  positional: str
  position_embedding: str
  normalize_queries: bool
  positional_softmax: bool


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


def _is_gsa_call(module: nn.Module, method_name: str) -> bool:
  return isinstance(module, GSA) and method_name == '__call__'


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
    if _is_gsa_call(module, method_name):
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
    features = module.features
    layers.append(
      GSALayer(
        path=path,
        height=out.shape[1],
        width=out.shape[2],
        features=features,
        key_features=features // 2 if module.key_features is None else module.key_features,
        num_heads=module.num_heads,
        content=module.content,
        positional=module.positional,
        position_embedding=module.position_embedding,
        normalize_queries=module.normalize_queries,
        positional_softmax=module.positional_softmax,
      )
    )
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
    batch, height, width, _ = qkv.shape
    heads, kf = layer.num_heads, layer.key_features
    q, k, v = jnp.split(qkv, [kf, 2 * kf], axis=-1)
    captures.append(
      GSACapture(
        layer=layer,
        q=q.reshape(batch, height, width, heads, kf // heads),
        k=k.reshape(batch, height, width, heads, kf // heads),
        v=v.reshape(batch, height, width, heads, layer.features // heads),
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


def attention_maps(
  cap: GSACapture, query: tuple[int, int] | None = None, index: int = 0
) -> AttentionMaps:
  """The content and positional weights of ``query`` in image ``index`` of a capture.

  Args:
    cap: from :func:`capture`.
    query: ``(x, y)`` in the layer's feature map; None is the center pixel.
    index: which image of the captured batch.
  """
  layer = cap.layer
  if query is None:
    query = (layer.height // 2, layer.width // 2)
  x, y = query
  if not (0 <= x < layer.height and 0 <= y < layer.width):
    raise ValueError(
      f'query {query} is outside the {layer.height}x{layer.width} map of {layer.path or "GSA"}.'
    )
  q = cap.q[index : index + 1]
  content = column = column_valid = row = row_valid = None
  if layer.content:
    weights = content_weights(
      q, cap.k[index : index + 1], query, normalize_queries=layer.normalize_queries
    )
    content = np.asarray(weights[0])
  relative = layer.position_embedding == 'relative'
  prefix = 'rel' if relative else 'abs'
  step = functools.partial(
    positional_weights, q, query=query, relative=relative, softmax=layer.positional_softmax
  )
  if layer.positional != 'none':
    weights, valid = step(cap.params[f'{prefix}_col'], axis=1)
    column, column_valid = np.asarray(weights[0]), np.asarray(valid)
  if layer.positional == 'axial':
    weights, valid = step(cap.params[f'{prefix}_row'], axis=2)
    row, row_valid = np.asarray(weights[0]), np.asarray(valid)
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


# ----------------------------------------------------------------------------- drawing


def display_image(image: np.ndarray, dataset: str) -> np.ndarray:
  """Undoes the eval normalization: ``float [height, width, 3]`` in ``[0, 1]`` for imshow."""
  mean = np.asarray(input_pipeline.MEAN_RGB[dataset], np.float32)
  std = np.asarray(input_pipeline.STDDEV_RGB[dataset], np.float32)
  return np.clip((np.asarray(image, np.float32) * std + mean) / 255.0, 0.0, 1.0)


def _mark_query(ax, maps: AttentionMaps, image_hw: tuple[int, int]) -> None:
  # Layers below the input resolution cover the image with coarser cells.
  cell_h, cell_w = image_hw[0] / maps.layer.height, image_hw[1] / maps.layer.width
  x, y = maps.query
  ax.add_patch(
    Rectangle((y * cell_w, x * cell_h), cell_w, cell_h, fill=False, edgecolor='lime', linewidth=2)
  )


def _draw_layer(axes, image: np.ndarray, maps: AttentionMaps, head: int | None) -> None:
  """One row of a figure: query, content map over the image, positional weights."""
  layer = maps.layer
  select = (lambda a: a.mean(axis=0)) if head is None else (lambda a: a[head])
  heads = 'mean over heads' if head is None else f'head {head}'
  hw = image.shape[:2]
  extent = (0, hw[1], hw[0], 0)
  ax_img, ax_content, ax_pos = axes
  ax_img.imshow(image, extent=extent)
  _mark_query(ax_img, maps, hw)
  ax_img.set_title(
    f'{layer.path or "GSA"} ({layer.height}x{layer.width})\nquery {maps.query}', fontsize='small'
  )

  ax_content.imshow(image.mean(axis=-1), cmap='gray', extent=extent)
  if maps.content is not None:
    content = select(maps.content)
    bound = float(np.abs(content).max()) or 1.0
    shown = ax_content.imshow(
      content, cmap='RdBu_r', vmin=-bound, vmax=bound, alpha=0.75, extent=extent
    )
    ax_content.figure.colorbar(shown, ax=ax_content, fraction=0.046, pad=0.04)
    ax_content.set_title(f'content weights ({heads})', fontsize='small')
  else:
    ax_content.set_title('no content branch', fontsize='small')
  _mark_query(ax_content, maps, hw)

  for name, weights, valid, at, color in (
    ('column (over rows)', maps.column, maps.column_valid, maps.query[0], 'tab:blue'),
    ('row (over columns)', maps.row, maps.row_valid, maps.query[1], 'tab:orange'),
  ):
    if weights is None:
      continue
    positions = np.arange(weights.shape[-1])
    shown = np.where(valid, select(weights), np.nan)  # gaps outside the neighbourhood
    ax_pos.plot(positions, shown, color=color, marker='.', label=name)
    if head is None and weights.shape[0] > 1:
      ax_pos.fill_between(
        positions,
        np.where(valid, weights.min(axis=0), np.nan),
        np.where(valid, weights.max(axis=0), np.nan),
        color=color,
        alpha=0.2,
      )
    ax_pos.axvline(at, color=color, linestyle=':')
  if maps.column is None:
    ax_pos.set_title('no positional branch', fontsize='small')
  else:
    ax_pos.axhline(0.0, color='gray', linewidth=0.5)
    band = '; band: range over heads' if head is None else ''
    ax_pos.set_title(f'positional weights ({heads}{band})', fontsize='small')
    ax_pos.set_xlabel('key position (dotted: query)', fontsize='small')
    ax_pos.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_pos.legend(fontsize='small')
  for ax in (ax_img, ax_content):
    ax.set_xticks([])
    ax.set_yticks([])


def attention_figure(
  image: np.ndarray, maps: Sequence[AttentionMaps], *, head: int | None = None
) -> Figure:
  """A figure with one row per layer: the query, its content map and positional weights.

  Args:
    image: ``float [height, width, 3]`` in ``[0, 1]`` (see :func:`display_image`).
    maps: from :func:`attention_maps`, one per layer to draw (all for the same image).
    head: a head to draw; None averages the weights over heads.

  Returns:
    A matplotlib Figure, not registered with pyplot: ``fig.savefig(path)`` or
    :func:`figure_to_array`.
  """
  fig = Figure(figsize=(11, 3.4 * len(maps)), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(maps), 3, squeeze=False, gridspec_kw={'width_ratios': (1, 1.2, 1.4)})
  for row, layer_maps in zip(axes, maps, strict=True):
    _draw_layer(row, image, layer_maps, head)
  return fig


def figure_to_array(fig: Figure, dpi: int = 60) -> np.ndarray:
  """Renders a figure to ``uint8 [height, width, 3]`` (for TensorBoard)."""
  canvas = FigureCanvasAgg(fig)
  fig.set_dpi(dpi)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_attention_map(
  path: str,
  model: nn.Module,
  variables: Mapping[str, Any],
  images: np.ndarray,
  *,
  dataset: str,
  layers: Sequence[int | str] = (0, -1),
  query: tuple[int, int] | None = None,
  head: int | None = None,
  dpi: int = 80,
) -> str:
  """Saves the attention maps of ``layers`` for ``images`` as one PNG (a row per layer).

  Args:
    path: the PNG to write.
    model: the network; ``variables``: its params and batch_stats.
    images: ``[batch, height, width, 3]`` preprocessed like eval.
    dataset: the dataset the images were normalized for (to draw them).
    layers: GSA layers by index (``0`` first, ``-1`` last) or module path.
    query: ``(x, y)`` in each layer's map; None: each layer's center pixel.
    head: one head, or None for the mean over heads.
    dpi: resolution of the PNG.

  Returns:
    ``path``.

  Raises:
    ValueError: ``model`` has no GSA layer, or no such layer or head.
  """
  captures = capture(model, variables, images)
  if not captures:
    raise ValueError('the model has no GSA layer (a convolutional ResNet): nothing to draw.')
  chosen = _unique([pick_layer(captures, layer) for layer in layers])
  for cap in chosen:
    if head is not None and not 0 <= head < cap.layer.num_heads:
      raise ValueError(f'head={head}, but {cap.layer.path} has {cap.layer.num_heads} heads.')
  fig = Figure(figsize=(11 * len(images), 3.4 * len(chosen)), layout='constrained')
  FigureCanvasAgg(fig)
  columns = fig.subfigures(1, len(images), squeeze=False)[0]
  for i, sub in enumerate(columns):
    axes = sub.subplots(len(chosen), 3, squeeze=False, gridspec_kw={'width_ratios': (1, 1.2, 1.4)})
    shown = display_image(images[i], dataset)
    for row, cap in zip(axes, chosen, strict=True):
      _draw_layer(row, shown, attention_maps(cap, query, index=i), head)
  fig.savefig(path, dpi=dpi)
  return path


def _unique(captures: list[GSACapture]) -> list[GSACapture]:
  seen, unique = set(), []
  for cap in captures:
    if cap.layer.path not in seen:
      seen.add(cap.layer.path)
      unique.append(cap)
  return unique


# ----------------------------------------------------------------------------- eval images


def eval_images(
  builder, *, dataset: str, image_size: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
  """The first ``count`` examples of the eval split, preprocessed exactly like eval.

  Returns:
    ``(images float32 [count, image_size, image_size, 3], labels int32 [count])``.
  """
  # Only `count` images are decoded (the eval iterator would decode a whole batch).
  ds = builder.as_dataset(
    split=input_pipeline.eval_split_name(dataset),
    shuffle_files=False,
    decoders={'image': tfds.decode.SkipDecoding()},
  ).take(count)
  images, labels = [], []
  for example in ds.as_numpy_iterator():
    image = tf.io.decode_image(example['image'], channels=3, expand_animations=False)
    images.append(
      input_pipeline.preprocess_for_eval(image, dataset=dataset, image_size=image_size).numpy()
    )
    labels.append(int(example['label']))
  return np.stack(images), np.asarray(labels, np.int32)


def _local(tree: Any) -> Any:
  """This process's copy of replicated arrays: applying it needs no other process."""
  return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


def write_attention_maps(
  writer, step: int, state, model: nn.Module, builder, config, count: int = 3
) -> None:
  """Writes attention maps of the first eval images to TensorBoard (``attention_maps``).

  The first and last GSA layers, center query pixel, mean over heads: one figure per
  image. Costs one jitted eval-mode apply on ``count`` images, on this process only.
  Does nothing for a network without GSA layers.

  Args:
    writer: a clu metric writer.
    step: the training step.
    state: the train state (``params``, ``batch_stats``), replicated.
    model: the network.
    builder: the dataset builder; ``config``: the run's config.
    count: number of eval images.
  """
  shape = (config.image_size, config.image_size, 3)
  if not find_gsa_layers(model, shape):
    return
  images, _ = eval_images(
    builder, dataset=config.dataset, image_size=config.image_size, count=count
  )
  variables = _local({'params': state.params, 'batch_stats': state.batch_stats})
  captures = capture(model, variables, images)
  chosen = _unique([captures[0], captures[-1]])
  rendered = []
  for i in range(len(images)):
    fig = attention_figure(
      display_image(images[i], config.dataset), [attention_maps(c, index=i) for c in chosen]
    )
    rendered.append(figure_to_array(fig))
  writer.write_images(step, {'attention_maps': np.stack(rendered)})


# ----------------------------------------------------------------------------- learning curves


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """``{tag: {step: value}}`` from the TensorBoard event files of a workdir (later win)."""
  scalars: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      event = tf.compat.v1.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField('tensor'):
          array = np.asarray(tf.make_ndarray(value.tensor))
          if array.size != 1 or array.dtype.kind not in 'fiub':  # images, text, hparams
            continue
          number = float(array.reshape(()))
        elif value.HasField('simple_value'):
          number = float(value.simple_value)
        else:
          continue
        scalars.setdefault(value.tag, {})[event.step] = number
  return scalars


def learning_curves_figure(workdir: str) -> Figure:
  """Loss and accuracy (train and eval) against the step, from a workdir's metrics.

  Raises:
    FileNotFoundError: the workdir has no train or eval metrics.
  """
  scalars = read_scalars(workdir)
  if 'train_loss' not in scalars and 'eval_loss' not in scalars:
    raise FileNotFoundError(f'no training metrics in {workdir}: train there first.')
  fig = Figure(figsize=(10, 3.6), layout='constrained')
  FigureCanvasAgg(fig)
  ax_loss, ax_acc = fig.subplots(1, 2)
  for ax, metric in ((ax_loss, 'loss'), (ax_acc, 'accuracy')):
    for split, style in (('train', '-'), ('eval', 'o-')):
      series = scalars.get(f'{split}_{metric}')
      if series:
        steps = sorted(series)
        ax.plot(steps, [series[s] for s in steps], style, label=f'{split}')
    ax.set_xlabel('step')
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    ax.legend()
  if 'eval_accuracy' in scalars:
    last = max(scalars['eval_accuracy'])
    ax_acc.set_title(f'accuracy (eval at step {last}: {scalars["eval_accuracy"][last]:.3f})')
  return fig


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m gsa_flax.visualize``: attention maps of a trained checkpoint as a PNG."""
  from gsa_flax import predict  # here: predict imports train, which imports this module

  parser = argparse.ArgumentParser(
    description='Attention maps (content weights, positional weights) of a trained GSA network.'
  )
  parser.add_argument(
    '--workdir', required=True, help='Training workdir (checkpoints, config.json).'
  )
  parser.add_argument('--output', default='attention_map.png', help='PNG to write.')
  parser.add_argument(
    '--layers', default='0,-1', help='GSA layers: indices in call order (-1: last) or module paths.'
  )
  parser.add_argument(
    '--query', default='', help='Query pixel "x,y" in each layer; default center.'
  )
  parser.add_argument('--head', type=int, default=None, help='One head; default: mean over heads.')
  parser.add_argument('--count', type=int, default=3, help='Eval images to draw without IMAGE.')
  parser.add_argument('--data_dir', default=None, help='Override the config data_dir.')
  parser.add_argument('images', nargs='*', help='Image files; default: the first eval images.')
  args = parser.parse_args(argv)

  try:
    loaded = predict.load(args.workdir, data_dir=args.data_dir)
  except predict.LoadError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  config = loaded.config
  failed = 0
  if args.images:
    decoded = []
    for path in args.images:
      try:
        decoded.append(predict.read_image(path, config))
      except predict.ImageError as error:
        print(f'error: {path}: {error}', file=sys.stderr)
        failed += 1
    if not decoded:
      return 1
    images = np.stack(decoded)
  else:
    images, _ = eval_images(
      loaded.builder, dataset=config.dataset, image_size=config.image_size, count=args.count
    )
  query = tuple(int(v) for v in args.query.split(',')) if args.query else None
  try:
    save_attention_map(
      args.output,
      loaded.model,
      loaded.variables,
      images,
      dataset=config.dataset,
      layers=[s.strip() for s in args.layers.split(',')],
      query=query,
      head=args.head,
    )
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  print(f'wrote {args.output} ({len(images)} images)')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
