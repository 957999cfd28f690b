r"""Classifies image files with the latest checkpoint of a training workdir.

  python -m gsa_flax.predict --workdir=/tmp/gsa photo.jpg digit.png

The model is rebuilt from the ``config.json`` the run saved next to its checkpoints, the
parameters and BatchNorm statistics come from the newest intact checkpoint, and each image
is decoded (PNG, JPEG, GIF, BMP) and preprocessed exactly like an eval image. For each file
the top-5 classes are printed with their probabilities; a file that cannot be read or
decoded gets one ``error:`` line on stderr naming it, and the others are still classified.

Exit status: 0 when every file was classified, 1 when some file failed, 2 when the workdir
has no usable config or checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import tensorflow as tf
import tensorflow_datasets as tfds

from gsa_flax import checkpointing, input_pipeline, train

TOP_K = 5
# Images per compiled apply: bounds memory for long file lists (one compile per batch size).
_BATCH = 32


class LoadError(Exception):
  """The workdir cannot be used for prediction; the message says why and what to do."""


class ImageError(Exception):
  """A file is not a readable image; the message says why (without the path)."""


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A trained network, ready to apply.

  Attributes:
    config: the run's config (from ``<workdir>/config.json``).
    model: the network it trained.
    variables: ``{'params': ..., 'batch_stats': ...}`` from the checkpoint.
    class_names: label names from the dataset's metadata, indexed by class.
    builder: the dataset builder (metadata only; its data may be absent).
    step: the training step of the checkpoint.
  """

  config: ml_collections.ConfigDict
  model: nn.Module
  variables: dict[str, Any]
  class_names: list[str]
  builder: Any
  step: int


def _builder(config: ml_collections.ConfigDict, data_dir: str | None):
  """The dataset's builder; label metadata suffices, so the data need not be prepared."""
  data_dir = data_dir or config.data_dir or None
  try:
    return input_pipeline.get_builder(config.dataset, data_dir, image_size=config.image_size)
  except input_pipeline.DatasetNotFoundError:
    # Prediction needs only the label metadata that ships with TFDS (ImageNet: WordNet
    # ids); CIFAR-100's names are written at preparation, so without it they are indices.
    print(
      f'warning: {config.dataset} is not prepared in data_dir={data_dir!r}; class names '
      "from TFDS's built-in metadata (pass --data_dir to use the prepared dataset's).",
      file=sys.stderr,
    )
    return tfds.builder(config.dataset, data_dir=data_dir)


def load(workdir: str, data_dir: str | None = None) -> Loaded:
  """Rebuilds the model of a training workdir and restores its latest checkpoint.

  Args:
    workdir: the ``--workdir`` of a training run (holds ``config.json`` and
      ``checkpoints/``).
    data_dir: TFDS data dir to read the dataset's metadata from; None: the run's own.

  Returns:
    The loaded network.

  Raises:
    LoadError: no such workdir, no ``config.json``, no checkpoint, or a checkpoint that does
      not fit the saved config (one line, saying what to do).
  """
  config_path = os.path.join(workdir, 'config.json')
  if not tf.io.gfile.isdir(workdir):
    raise LoadError(f'workdir {workdir} does not exist; pass the --workdir of a training run.')
  if not tf.io.gfile.exists(config_path):
    raise LoadError(
      f'{config_path} is missing: {workdir} is not a training workdir (main.py writes it).'
    )
  with tf.io.gfile.GFile(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if not tf.io.gfile.isdir(str(checkpointing.checkpoint_dir(workdir))):
    raise LoadError(f'no checkpoint in {workdir}: train first (checkpoints/ is missing).')

  builder = _builder(config, data_dir)
  names = input_pipeline.class_names(builder)
  model = train.create_model(config, len(names))
  # The restore target only needs shapes: nothing is initialised. The optimizer is built
  # with a schedule, as in training, so its state has the same structure.
  tx = train.create_optimizer(config, optax.constant_schedule(0.0))
  abstract = jax.eval_shape(
    functools.partial(train.create_train_state, config, model, tx, image_size=config.image_size),
    jax.random.key(0),
  )
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
    train.state_dict(abstract),
  )
  try:
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
    restored = ckpt.restore_latest(target, read_only=True)  # inspecting never moves files
  except (ValueError, RuntimeError) as error:  # mismatching or unreadable checkpoints
    raise LoadError(str(error)) from error
  if restored is None:
    raise LoadError(f'no checkpoint in {checkpointing.checkpoint_dir(workdir)}: train first.')
  state, _, step = restored
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return Loaded(config, model, variables, names, builder, step)


def read_image(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
  """Reads, decodes and preprocesses one image file exactly like an eval image.

  Returns:
    ``float32 [image_size, image_size, 3]``, normalized.

  Raises:
    ImageError: the file cannot be read, or is not a PNG, JPEG, GIF or BMP image.
  """
  if not tf.io.gfile.exists(path):
    raise ImageError('no such file')
  if tf.io.gfile.isdir(path):
    raise ImageError('is a directory, not an image file')
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      encoded = f.read()
  except (OSError, tf.errors.OpError) as error:
    reason = getattr(error, 'message', None) or str(error)
    raise ImageError(f'cannot read the file ({reason.splitlines()[0]})') from None
  try:
    # channels=3 and no animation: as the eval pipeline decodes (first frame of a GIF).
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, ValueError):
    raise ImageError('not a decodable image (PNG, JPEG, GIF or BMP)') from None
  image = input_pipeline.preprocess_for_eval(
    image, dataset=config.dataset, image_size=config.image_size
  )
  return image.numpy()


@functools.lru_cache(maxsize=4)
def _probabilities_fn(model: nn.Module):
  return jax.jit(lambda variables, x: jax.nn.softmax(model.apply(variables, x, train=False)))


def probabilities(loaded: Loaded, images: np.ndarray) -> np.ndarray:
  """Class probabilities ``[n, num_classes]`` of preprocessed images ``[n, h, w, 3]``."""
  fn = _probabilities_fn(loaded.model)
  out = []
  for start in range(0, len(images), _BATCH):
    chunk = images[start : start + _BATCH]
    size = min(_BATCH, len(images))
    padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
    out.append(np.asarray(fn(loaded.variables, padded))[: len(chunk)])
  return np.concatenate(out)


def top_k(probs: np.ndarray, names: Sequence[str], k: int = TOP_K) -> list[tuple[str, float]]:
  """The ``k`` most probable ``(class name, probability)`` of one probability vector."""
  order = np.argsort(-probs, kind='stable')[:k]
  return [(names[i], float(probs[i])) for i in order]


def format_prediction(path: str, ranked: Sequence[tuple[str, float]]) -> str:
  """The path, then one ``  rank. name  probability`` line per class."""
  width = max(len(name) for name, _ in ranked)
  lines = [path] + [
    f'  {rank}. {name:<{width}}  {prob:.4f}' for rank, (name, prob) in enumerate(ranked, 1)
  ]
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m gsa_flax.predict --workdir=DIR IMAGE...``; returns the exit status."""
  parser = argparse.ArgumentParser(
    description='Top-5 classes of image files with the latest checkpoint of a training workdir.'
  )
  parser.add_argument(
    '--workdir', required=True, help='The training run (config.json, checkpoints).'
  )
  parser.add_argument(
    '--data_dir', default=None, help="TFDS data dir for the label names (default: the run's)."
  )
  parser.add_argument('images', nargs='+', metavar='IMAGE', help='PNG, JPEG, GIF or BMP files.')
  args = parser.parse_args(argv)

  try:
    loaded = load(args.workdir, data_dir=args.data_dir)
  except LoadError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  paths, images, failed = [], [], 0
  for path in args.images:
    try:
      images.append(read_image(path, loaded.config))
      paths.append(path)
    except ImageError as error:
      print(f'error: {path}: {error}', file=sys.stderr)
      failed += 1
  if images:
    probs = probabilities(loaded, np.stack(images))
    for path, p in zip(paths, probs, strict=True):
      print(format_prediction(path, top_k(p, loaded.class_names)))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
