"""Figures: attention maps over the image, and learning curves from a workdir's metrics.

Drawn with matplotlib's object API (figures are not registered with pyplot), so they
render the same in scripts, tests and notebooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from gsa_flax.data.datasets import DatasetSpec
from gsa_flax.tools import events


def display_image(image: np.ndarray, spec: DatasetSpec) -> np.ndarray:
  """Undoes the eval normalization: ``float [height, width, 3]`` in ``[0, 1]`` for imshow."""
  mean = np.asarray(spec.mean_rgb, np.float32)
  std = np.asarray(spec.stddev_rgb, np.float32)
  return np.clip((np.asarray(image, np.float32) * std + mean) / 255.0, 0.0, 1.0)


def _mark_query(ax, maps, image_hw: tuple[int, int]) -> None:
  # Layers below the input resolution cover the image with coarser cells.
  cell_h, cell_w = image_hw[0] / maps.layer.height, image_hw[1] / maps.layer.width
  x, y = maps.query
  ax.add_patch(
    Rectangle((y * cell_w, x * cell_h), cell_w, cell_h, fill=False, edgecolor='lime', linewidth=2)
  )


def _draw_layer(axes, image: np.ndarray, maps, head: int | None) -> None:
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


def attention_figure(image: np.ndarray, maps: Sequence[Any], *, head: int | None = None) -> Figure:
  """A figure with one row per layer: the query, its content map and positional weights.

  Args:
    image: ``float [height, width, 3]`` in ``[0, 1]`` (see :func:`display_image`).
    maps: ``AttentionMaps`` from :func:`gsa_flax.tools.attention_maps.attention_maps`, one
      per layer to draw (all for the same image).
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


def attention_grid(images: Sequence[np.ndarray], maps: Sequence[Sequence[Any]], *, head=None):
  """One column per image, one row per layer: :func:`attention_figure` side by side.

  Args:
    images: ``float [height, width, 3]`` in ``[0, 1]``, one per column.
    maps: per image, its ``AttentionMaps`` of every layer to draw.
    head: a head to draw; None averages the weights over heads.
  """
  rows = len(maps[0])
  fig = Figure(figsize=(11 * len(images), 3.4 * rows), layout='constrained')
  FigureCanvasAgg(fig)
  columns = fig.subfigures(1, len(images), squeeze=False)[0]
  for sub, image, image_maps in zip(columns, images, maps, strict=True):
    axes = sub.subplots(rows, 3, squeeze=False, gridspec_kw={'width_ratios': (1, 1.2, 1.4)})
    for row, layer_maps in zip(axes, image_maps, strict=True):
      _draw_layer(row, image, layer_maps, head)
  return fig


def learning_curves_figure(workdir: str) -> Figure:
  """Loss and accuracy (train and eval) against the step, from a workdir's metrics.

  Raises:
    FileNotFoundError: the workdir has no train or eval metrics.
  """
  scalars = events.read_scalars(workdir)
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
