"""Portable weights: a trained network in one file, without the training run around it.

One msgpack map (flax's ``serialization.msgpack_serialize``; no pickle, nothing executed
on reading)::

  {'format': 'gsa-flax-weights', 'version': 1,
   'config': <the run's config as a dict>,
   'variables': {'params': ..., 'batch_stats': ...},
   'card': {'model': ..., 'dataset': ..., 'resolution': ..., 'num_classes': ...,
            'parameters': ..., 'step': ..., 'eval_accuracy': ..., ...}}

Arrays are stored with their dtype and shape, bit for bit. ``config`` is enough to rebuild
the network (``gsa_flax.model.pretrained.load_pretrained``); ``card`` describes it for a reader (the
model card). Files are read and written through ``etils.epath``, so ``gs://`` paths work
like local ones.

This module knows the file, not the networks: it imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import msgpack
import numpy as np
from etils import epath
from flax import serialization, traverse_util

from gsa_flax import errors, files

FORMAT = 'gsa-flax-weights'
VERSION = 1
# The keys of the file's top-level map, in the order they are written.
KEYS = ('format', 'version', 'config', 'variables', 'card')
COLLECTIONS = ('params', 'batch_stats')
# The largest weights file read (a GSA-ResNet-101 in float32 is about 200 MB): a path that
# names something larger is a mistake, refused before a byte is read.
MAX_BYTES = 4 * 2**30
# Bytes read by :func:`check_header` before the format tag must have been seen: the map
# header, and the model card and config that sort before ``format`` in a file written with
# sorted keys (flax's ``msgpack_serialize`` without ``in_place``).
_HEADER_BYTES = 2**20


class WeightsError(errors.UserError):
  """A file is not a readable portable-weights file; the message names it and says why."""


@dataclasses.dataclass(frozen=True)
class Weights:
  """The contents of a portable-weights file.

  Attributes:
    config: the config of the run that trained the network (a plain dict; wrap it in
      ``ml_collections.ConfigDict`` to use it as a config).
    variables: ``{'params': ..., 'batch_stats': ...}``, NumPy arrays.
    card: the model card (model, dataset, resolution, parameters, accuracy, ...).
    version: the format version of the file.
  """

  config: dict[str, Any]
  variables: dict[str, Any]
  card: dict[str, Any]
  version: int = VERSION


def parameter_count(variables: Mapping[str, Any]) -> int:
  """Number of trainable parameters (the ``params`` collection)."""
  return sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(variables['params']))


def make_card(
  config: Mapping[str, Any],
  variables: Mapping[str, Any],
  *,
  num_classes: int,
  step: int | None = None,
  metrics: Mapping[str, float] | None = None,
) -> dict[str, Any]:
  """The model card of a trained network.

  Args:
    config: the run's config (``model``, ``dataset`` and ``image_size`` are read).
    variables: the network's ``{'params': ..., 'batch_stats': ...}`` (parameters counted).
    num_classes: the classifier's outputs.
    step: the training step the weights are from.
    metrics: the run's evaluation at that step, e.g. ``{'eval_accuracy': 0.77}``; the
      caller reads them (the exporter: from the run's TensorBoard events).

  Returns:
    ``{'model', 'dataset', 'resolution', 'num_classes', 'parameters', 'step', **metrics}``.
  """
  card = {
    'model': str(config['model']),
    'dataset': str(config['dataset']),
    'resolution': int(config['image_size']),
    'num_classes': int(num_classes),
    'parameters': parameter_count(variables),
    'step': None if step is None else int(step),
  }
  card.update({name: float(value) for name, value in (metrics or {}).items()})
  return card


def describe(card: Mapping[str, Any]) -> str:
  """The card as one line, e.g. ``gsa_resnet50 on imagenet2012 at 224x224, 1000 classes,
  16,894,696 parameters, step 112590, eval_accuracy 0.7712``."""
  size = card.get('resolution')
  parts = [f'{card.get("model")} on {card.get("dataset")} at {size}x{size}']
  if card.get('num_classes') is not None:
    parts.append(f'{card["num_classes"]} classes')
  if isinstance(card.get('parameters'), int):
    parts.append(f'{card["parameters"]:,} parameters')
  if card.get('step') is not None:
    parts.append(f'step {card["step"]}')
  for name, value in card.items():
    if name not in ('model', 'dataset', 'resolution', 'num_classes', 'parameters', 'step'):
      parts.append(f'{name} {value:.4f}' if isinstance(value, float) else f'{name} {value}')
  return ', '.join(parts)


def _plain(value: Any) -> Any:
  """Config values msgpack can store: tuples become lists, other objects their ``str``."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return str(value)


def _variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  missing = [name for name in COLLECTIONS if name not in variables]
  if missing:
    raise ValueError(
      f'variables lack {", ".join(missing)}: pass {{"params": ..., "batch_stats": ...}}.'
    )
  host = jax.device_get({name: variables[name] for name in COLLECTIONS})
  # Nested plain dicts of NumPy arrays, whatever mapping type the tree came in.
  return jax.tree.map(np.asarray, serialization.to_state_dict(host))


def export(
  path: str | os.PathLike,
  config: Mapping[str, Any],
  variables: Mapping[str, Any],
  card: Mapping[str, Any],
) -> epath.Path:
  """Writes a network to one portable-weights file (local or ``gs://``).

  Args:
    path: the file to write (replaced if it exists); its directory is created.
    config: the run's config (an ``ml_collections.ConfigDict`` or a dict).
    variables: ``{'params': ..., 'batch_stats': ...}`` (any further collection is left out).
    card: the model card (:func:`make_card`).

  Returns:
    The path written.
  """
  config = config.to_dict() if hasattr(config, 'to_dict') else config
  contents = {
    'format': FORMAT,
    'version': VERSION,
    'config': _plain(config),
    'variables': _variables(variables),
    'card': _plain(card),
  }
  # in_place keeps the key order (the format tag first, for check_header); the dict is ours.
  encoded = serialization.msgpack_serialize(contents, in_place=True)
  path = epath.Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise files.FileError(
      path, f'cannot be written: its directory cannot be made ({error.strerror or error}).'
    ) from None
  return files.write_atomically(path, encoded)


def _not_weights(path, reason: str) -> WeightsError:
  return WeightsError(
    f'{path} is not a gsa-flax weights file ({reason}); export one with '
    'python -m gsa_flax.tools.export --workdir=RUN --output=FILE.'
  )


def _read_bytes(path: epath.Path) -> bytes:
  try:
    return files.read_bytes(path, limit=MAX_BYTES, what='an exported weights file')
  except files.FileError as error:
    raise WeightsError(str(error)) from None


def _check_tag(path, contents: Any) -> None:
  if not isinstance(contents, dict) or 'format' not in contents:
    raise _not_weights(path, 'no format tag')
  if contents['format'] != FORMAT:
    raise _not_weights(path, f'format {contents["format"]!r}, expected {FORMAT!r}')


def check_header(path: str | os.PathLike) -> None:
  """Checks cheaply (the first bytes only) that ``path`` is a portable-weights file.

  For start-up validation of a path that will be read later; :func:`read` checks the rest.

  Raises:
    WeightsError: missing, a directory, or not starting with this format's tag.
  """
  path = epath.Path(path)
  try:
    files.check_readable(path, limit=MAX_BYTES, what='an exported weights file')
    with path.open('rb') as file:
      head = file.read(_HEADER_BYTES)
  except files.FileError as error:
    raise WeightsError(str(error)) from None
  except OSError as error:
    raise WeightsError(f'{path} cannot be read ({error.strerror or error}).') from None
  unpacker = msgpack.Unpacker(raw=False)
  unpacker.feed(head)
  found = {}
  try:
    # The tag is the first key of this project's files; flax's msgpack_serialize sorts the
    # keys, putting the (small) card and config before it.
    for _ in range(min(unpacker.read_map_header(), len(KEYS))):
      key = unpacker.unpack()
      if key == 'format':
        found['format'] = unpacker.unpack()
        break
      unpacker.skip()
  except (msgpack.OutOfData, ValueError, TypeError):
    raise _not_weights(path, 'not a msgpack map') from None
  _check_tag(path, found)


def read(path: str | os.PathLike) -> Weights:
  """Reads a portable-weights file (local or ``gs://``).

  Args:
    path: a file written by :func:`export`.

  Returns:
    The config, variables (NumPy arrays, exactly as exported) and card.

  Raises:
    WeightsError: one line naming the file and what is wrong: missing, not msgpack,
      truncated, another format, a newer version, or missing or malformed entries.
  """
  path = epath.Path(path)
  encoded = _read_bytes(path)
  try:
    contents = serialization.msgpack_restore(encoded)
  except msgpack.ExtraData:
    raise _not_weights(path, 'not one msgpack object') from None
  except ValueError as error:
    if 'incomplete input' in str(error):
      raise WeightsError(
        f'{path} is truncated ({len(encoded)} bytes end mid-file); copy or export it again.'
      ) from None
    raise _not_weights(path, f'not msgpack: {error}') from None
  except Exception as error:  # noqa: BLE001  (any undecodable byte string is the same story)
    raise _not_weights(path, f'undecodable: {type(error).__name__}') from None
  _check_tag(path, contents)
  if not isinstance(contents.get('version'), int) or contents['version'] > VERSION:
    raise WeightsError(
      f'{path} has format version {contents.get("version")!r}; this gsa-flax reads versions '
      f'up to {VERSION}: update gsa-flax.'
    )
  missing = [key for key in KEYS if key not in contents]
  if missing:
    raise WeightsError(f'{path} is incomplete: {", ".join(missing)} missing; export it again.')
  variables = contents['variables']
  if not isinstance(variables, dict) or any(
    not isinstance(variables.get(name), dict) for name in COLLECTIONS
  ):
    raise WeightsError(
      f'{path} is malformed: variables must hold {" and ".join(COLLECTIONS)}; export it again.'
    )
  for name, leaf in traverse_util.flatten_dict(variables, sep='/').items():
    if not isinstance(leaf, np.ndarray):
      raise WeightsError(
        f'{path} is malformed: variables/{name} is not an array ({type(leaf).__name__}).'
      )
  for key in ('config', 'card'):
    if not isinstance(contents[key], dict):
      raise WeightsError(f'{path} is malformed: {key} is not a map; export it again.')
  return Weights(
    config=contents['config'],
    variables={name: variables[name] for name in COLLECTIONS},
    card=contents['card'],
    version=contents['version'],
  )
