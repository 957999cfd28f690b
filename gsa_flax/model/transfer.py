"""Transfer: a trained network's variables made to fit another network of the same family.

Pretrain once, use everywhere: the variables of a run (a checkpoint or a portable-weights
file) start another network that differs from it in what transfer may change, and nothing
else:

- **resolution**: a global relative position table has ``L = 2 max(H, W) - 1`` entries,
  fixed at initialisation, so a network trained at 224x224 and applied at 384x384 would
  attend only within the offsets it has entries for (``docs/method.md``, "Positional
  attention"). :func:`resize_table` resizes every table to the target's length by linear
  interpolation in the offset, keeping offset 0 at the centre, so attention stays global at
  the new resolution; absolute tables (one entry per position) are resized likewise.
- **classes**: a classifier (:data:`gsa_flax.model.networks.HEAD`) whose number of classes differs
  is re-initialised (the target's own initialisation), everything else is copied.

Anything else that differs (another depth or architecture, another stage width, another
number of heads) is a :class:`TransferError` naming the parameter and both shapes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from gsa_flax import errors
from gsa_flax.model import networks, weights

# Position tables, [length, heads, channels per head] (gsa_flax.model.layers.GSA). Relative:
# entry c = (L - 1) / 2 is offset 0; absolute: entry i is position i along the axis.
RELATIVE_TABLES = ('rel_col', 'rel_row')
ABSOLUTE_TABLES = ('abs_col', 'abs_row')


class TransferError(errors.UserError):
  """Variables cannot be transferred to the target network; the message says which and why."""


def resize_table(table: np.ndarray, length: int) -> np.ndarray:
  """Resizes a position table along its first axis by linear interpolation, ends aligned.

  Entry ``j`` of the result is read at the fractional source entry
  ``u = c + (j - c') * (L - 1) / (length - 1)`` with ``c = (L - 1) / 2``, ``c' = (length -
  1) / 2``, linearly between the two entries around ``u``. So the first and last entries map
  onto each other, the centre onto the centre, and offsets scale by ``(length - 1) / (L -
  1)``: for a relative table (odd lengths) entry ``c'`` is exactly the source's offset-0
  entry and offset ``k`` of the result reads the source at offset ``k (L - 1) / (length -
  1)``, the same fraction of the map. Linear in the offset (not, e.g., in log-offset):
  resolution transfer scales the image, so a feature ``k`` pixels away moves to ``k``
  times the scale. A one-entry table is repeated; at equal length the table is returned
  unchanged. Computed in float64, returned in the table's dtype.

  Args:
    table: ``[L, ...]`` (``[L, heads, channels]`` for GSA's tables).
    length: the new length, >= 1.

  Returns:
    ``[length, ...]``.
  """
  table = np.asarray(table)
  size = table.shape[0]
  if length < 1 or size < 1:
    raise ValueError(f'cannot resize a table of length {size} to {length}.')
  if length == size:
    return table.copy()
  if size == 1 or length == 1:
    # One entry has no offsets to scale: repeat it, or keep the source's centre.
    return np.repeat(table[[(size - 1) // 2]], length, axis=0)
  source = (size - 1) / 2 + (np.arange(length) - (length - 1) / 2) * ((size - 1) / (length - 1))
  low = np.clip(np.floor(source).astype(int), 0, size - 2)
  weight = (source - low).reshape(-1, *([1] * (table.ndim - 1)))
  values = table.astype(np.float64)
  return ((1 - weight) * values[low] + weight * values[low + 1]).astype(table.dtype)


def _is_table(path: str) -> bool:
  parts = path.split('/')
  return parts[0] == 'params' and parts[-1] in RELATIVE_TABLES + ABSOLUTE_TABLES


def _is_head(path: str) -> bool:
  return path.startswith(f'params/{networks.HEAD}/')


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(np.shape(leaf))


def _resized(path: str, source: Any, target_shape: tuple[int, ...]) -> np.ndarray:
  """A position table at the target's length; other shapes must be equal."""
  if _shape(source)[1:] != target_shape[1:]:
    raise TransferError(
      f'{path} is {_shape(source)} in the source but {target_shape} in the target network: '
      'position tables are resized in length only; heads and channels per head must match '
      '(gsa.num_heads, gsa.key_ratio, num_filters).'
    )
  return resize_table(np.asarray(source), target_shape[0])


def resize_position_tables(
  variables: Mapping[str, Any], model: networks.ResNet, image_size: int
) -> dict[str, Any]:
  """``variables`` with every position table resized for ``model`` at ``image_size``.

  Each GSA layer sees its own feature-map size, so each table's new length is taken from
  ``model``'s (shape-only) initialisation at ``image_size``: the new global length
  ``2 max(H, W) - 1`` of that layer's map, or the model's ``rel_length`` if it has one.
  Nothing else changes (see :func:`resize_table` for the interpolation).

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a network of ``model``'s
      architecture.
    model: the network to apply the variables with (e.g. the one they were trained with).
    image_size: the new resolution.

  Returns:
    The variables as nested dicts, tables as NumPy arrays, every other leaf as it was.

  Raises:
    TransferError: a table that ``model`` does not have, or of other heads or channels.
  """
  target = traverse_util.flatten_dict(networks.abstract_variables(model, image_size), sep='/')
  flat = traverse_util.flatten_dict(variables, sep='/')
  for path, leaf in flat.items():
    if _is_table(path):
      if path not in target:
        raise TransferError(f'{path} is a position table that {type(model).__name__} lacks.')
      flat[path] = _resized(path, leaf, _shape(target[path]))
  return traverse_util.unflatten_dict(flat, sep='/')


@dataclasses.dataclass(frozen=True)
class Adapted:
  """Variables made to fit a target network, and what :func:`adapt` did to them.

  Attributes:
    variables: the target's ``{'params': ..., 'batch_stats': ...}``.
    reinitialized: paths whose values are the target's own initialisation (the classifier
      when the number of classes differs), e.g. ``('params/head/bias', 'params/head/kernel')``.
    resized: ``(path, source length, target length)`` of every resized position table.
  """

  variables: dict[str, Any]
  reinitialized: tuple[str, ...]
  resized: tuple[tuple[str, int, int], ...]


def _order(path: str) -> tuple[bool, str]:
  """Parameters before statistics: the mismatch a user acts on is named first."""
  return (not path.startswith('params/'), path)


def _first(paths: set[str]) -> str:
  """The first path, and how many more there are."""
  first = min(paths, key=_order)
  return first if len(paths) == 1 else f'{first} ({len(paths) - 1} more like it)'


_ARCHITECTURE = (
  'another architecture (model, stage_sizes, gsa.attention_stages, gsa.positional, '
  'gsa.position_embedding, gsa.content); only the resolution and the number of classes may '
  'differ.'
)


def adapt(source_variables: Mapping[str, Any], target_variables: Mapping[str, Any]) -> Adapted:
  """Fits a trained network's variables to a target network (transfer, fine-tuning).

  Parameters and BatchNorm statistics are copied (cast to the target's dtype); position
  tables are resized to the target's lengths (:func:`resize_table`); the classifier
  (:data:`gsa_flax.model.networks.HEAD`) is taken from the target's initialisation when its number
  of classes differs. Everything else must match exactly.

  Args:
    source_variables: ``{'params': ..., 'batch_stats': ...}`` of the trained network (from
      a checkpoint or :func:`gsa_flax.model.pretrained.load_pretrained`).
    target_variables: the target network freshly initialised at its resolution
      (:func:`gsa_flax.model.networks.init_variables`): they give every shape and the values of
      what is re-initialised. Leaves may be ``jax.ShapeDtypeStruct``
      (:func:`gsa_flax.model.networks.abstract_variables`): a check before anything is
      initialised, where re-initialised leaves stay abstract.

  Returns:
    The adapted variables (NumPy arrays, re-initialised leaves as given) and a record of
    what was re-initialised and resized, also logged.

  Raises:
    TransferError: the first parameter that does not fit, named with both shapes: one
      missing from either network (another architecture), or of another shape than
      transfer may change (another stage width, number of heads or channels per head).
  """
  source = traverse_util.flatten_dict(source_variables, sep='/')
  target = traverse_util.flatten_dict(target_variables, sep='/')
  missing, extra = target.keys() - source.keys(), source.keys() - target.keys()
  if missing:
    raise TransferError(
      f'{_first(missing)}: in the target network, not in the source: {_ARCHITECTURE}'
    )
  if extra:
    raise TransferError(
      f'{_first(extra)}: in the source, not in the target network: {_ARCHITECTURE}'
    )
  out, reinitialized, resized = {}, [], []
  for path in sorted(target, key=_order):
    want, have = target[path], source[path]
    want_shape = _shape(want)
    if _is_table(path):
      out[path] = _resized(path, have, want_shape).astype(want.dtype)
      if _shape(have)[0] != want_shape[0]:
        resized.append((path, _shape(have)[0], want_shape[0]))
    elif _shape(have) == want_shape:
      out[path] = np.asarray(jax.device_get(have)).astype(want.dtype)
    elif _is_head(path) and _shape(have)[:-1] == want_shape[:-1]:
      out[path] = want  # Another number of classes: the target's own initialisation.
      reinitialized.append(path)
    else:
      raise TransferError(
        f'{path} is {_shape(have)} in the source but {want_shape} in the target network: '
        'a different width (num_filters, gsa.key_ratio) or layout; only the position '
        "tables' lengths and the classifier's number of classes may differ."
      )
  if reinitialized:
    head = [p for p in reinitialized if p.endswith('/bias')]
    classes = (
      f' ({_shape(source[head[0]])[0]} -> {_shape(target[head[0]])[0]} classes)' if head else ''
    )
    logging.info('Transfer: re-initialised %s%s.', ', '.join(reinitialized), classes)
  if resized:
    logging.info(
      'Transfer: resized %d position tables (%s).',
      len(resized),
      ', '.join(sorted({f'{a} -> {b}' for _, a, b in resized})),
    )
  return Adapted(traverse_util.unflatten_dict(out, sep='/'), tuple(reinitialized), tuple(resized))


@dataclasses.dataclass(frozen=True)
class Source:
  """Where ``init_from`` points.

  Attributes:
    path: the path as given.
    kind: ``'weights'``: a portable-weights file (read it with
      :func:`gsa_flax.model.pretrained.load_pretrained`); ``'run'``: a directory, a training run's
      (restore it with ``gsa_flax.train.checkpoints.load``).
  """

  path: str
  kind: str


def locate(init_from: str | os.PathLike) -> Source:
  """Tells what ``init_from`` is, cheaply, before anything is read or compiled.

  A file must start like a portable-weights file (:func:`gsa_flax.model.weights.check_header`);
  a directory is a training run, which the checkpoint reader checks.

  Args:
    init_from: a portable-weights file or a training run's directory (local or ``gs://``).

  Raises:
    TransferError: it does not exist, or is a file of another kind (one line).
  """
  path = epath.Path(init_from)
  try:
    is_dir, exists = path.is_dir(), path.exists()
  except Exception as error:  # noqa: BLE001  (a file system that cannot be reached)
    raise TransferError(f'{init_from} cannot be read ({type(error).__name__}: {error}).') from None
  if is_dir:
    return Source(str(init_from), 'run')
  if not exists:
    raise TransferError(
      f'{init_from} does not exist: give a training workdir or an exported weights file.'
    )
  try:
    weights.check_header(path)
  except weights.WeightsError as error:
    raise TransferError(str(error)) from None
  return Source(str(init_from), 'weights')
