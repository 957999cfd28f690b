"""A network rebuilt from a portable weights file (:mod:`gsa_flax.model.weights`), checked
against what its config describes before anything is built: its architecture bounded, its
number of residual blocks against the file's own tree, then every name and shape."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
from flax import traverse_util

from gsa_flax.model import networks, weights


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A network from a portable-weights file, ready to apply.

  Attributes:
    model: the network, built from the file's config by :func:`gsa_flax.model.networks.build`.
    variables: ``{'params': ..., 'batch_stats': ...}`` (NumPy arrays, as exported).
    config: the config of the run that trained it.
    card: the model card (model, dataset, resolution, parameters, accuracy, ...).
  """

  model: networks.ResNet
  variables: dict[str, Any]
  config: ml_collections.ConfigDict
  card: dict[str, Any]


def load_pretrained(path: str | os.PathLike) -> Pretrained:
  """Rebuilds the network of a portable-weights file (local or ``gs://``).

  ``pretrained.model.apply(pretrained.variables, images, train=False)`` gives the logits the
  exported network gave, bit for bit on the same machine. For another compute dtype,
  ``pretrained.model.clone(dtype=jnp.float32)``; for another resolution or number of
  classes, :func:`gsa_flax.model.transfer.adapt` the variables to the new network.

  Args:
    path: a file written by :func:`gsa_flax.model.weights.export` (``python -m
      gsa_flax.tools.export``).

  Raises:
    gsa_flax.model.weights.WeightsError: the file cannot be read, or its variables do not fit
      the network its config describes (one line, naming the first mismatching entry).
  """
  contents = weights.read(path)
  config = ml_collections.ConfigDict(contents.config)
  params = contents.variables['params']
  if networks.HEAD not in params or 'bias' not in params[networks.HEAD]:
    raise weights.WeightsError(
      f'{path} holds no classifier ({networks.HEAD}/bias): not a networks.ResNet family.'
    )
  try:
    architecture = networks.architecture_of(config)
    networks.check_architecture(architecture)
    image_size = config.image_size
    if not (isinstance(image_size, int) and 0 < image_size <= networks.MAX_IMAGE_SIZE):
      raise ValueError(f'image_size={image_size!r}: use 1 to {networks.MAX_IMAGE_SIZE}')
    model = networks.build(architecture, num_classes=int(params[networks.HEAD]['bias'].shape[0]))
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    raise weights.WeightsError(
      f'{path}: its config does not describe a network of this gsa-flax ({str(error).rstrip(".")}).'
    ) from None
  # The file's own tree first: shaping a network costs time in proportion to its blocks, so
  # a config claiming more blocks than the file holds is refused before it is shaped.
  prefix = networks.BottleneckBlock.__name__ + '_'
  blocks = sum(name.startswith(prefix) for name in params)
  if blocks != sum(model.stage_sizes):
    raise weights.WeightsError(
      f'{path} does not fit the network its config describes ({config.model}, stage_sizes '
      f'{list(model.stage_sizes)}: {sum(model.stage_sizes)} residual blocks); the file holds '
      f'{blocks}. Export it again.'
    )
  try:
    want = traverse_util.flatten_dict(networks.abstract_variables(model, image_size), sep='/')
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    raise weights.WeightsError(
      f'{path}: its config does not describe a network of this gsa-flax ({error}).'
    ) from None
  got = traverse_util.flatten_dict(contents.variables, sep='/')
  # Parameters before statistics: the first mismatch named is the telling one.
  for name in sorted(want.keys() | got.keys(), key=lambda p: (not p.startswith('params/'), p)):
    if name not in got or name not in want or tuple(want[name].shape) != got[name].shape:
      shapes = [tuple(t[name].shape) if name in t else 'absent' for t in (got, want)]
      raise weights.WeightsError(
        f'{path} does not fit the network its config describes ({config.model} at '
        f'{config.image_size}x{config.image_size}): {name} is {shapes[0]} in the file, '
        f'{shapes[1]} in the network.'
      )
  return Pretrained(model, contents.variables, config, contents.card)
