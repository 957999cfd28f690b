r"""Classifies image files with the latest checkpoint of a training workdir.

  python -m gsa_flax.tools.predict --workdir=runs/gsa photo.jpg digit.png

The model is rebuilt from the ``config.json`` the run saved next to its checkpoints, the
parameters and BatchNorm statistics come from the newest intact checkpoint (the moving
average of the parameters when the run kept one; ``--raw`` for the raw ones), and each image
is decoded (PNG, JPEG, GIF, BMP), turned upright by its EXIF orientation and preprocessed
exactly like an eval image. For each file
the top-5 classes are printed with their probabilities; a file that cannot be read or
decoded (missing, a directory, a FIFO, a device such as ``/dev/zero``, too large, not an
image) gets one ``error:`` line on stderr naming it, and the others are still classified.

Exit status: 0 when every file was classified, 1 when some file failed, 2 when the workdir
has no usable config or checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging

from gsa_flax.data import datasets, input_pipeline
from gsa_flax.tools import cli, images
from gsa_flax.train import restore

TOP_K = 5
# Images per compiled apply: bounds memory for long file lists (one compile per batch size).
_BATCH = 32


def class_names(dataset: str, data_dir: str | None, image_size: int) -> list[str]:
  """Label names of a dataset, from its TFDS metadata.

  The prepared dataset's (in ``data_dir``); if it is not prepared there, TFDS's built-in
  metadata, with a warning (ImageNet: WordNet ids; CIFAR-100 writes its names at
  preparation, so without it they are indices).

  Args:
    dataset: the dataset's name (``config.dataset``).
    data_dir: the TFDS data directory; None: TFDS's default.
    image_size: the resolution (datasets built locally are stored per resolution).
  """
  spec = datasets.get(dataset)
  try:
    builder = input_pipeline.get_builder(spec, data_dir, image_size=image_size)
  except input_pipeline.DatasetNotFoundError:
    logging.warning(
      "%s is not prepared in data_dir=%r: class names from TFDS's built-in metadata (pass "
      "--data_dir to use the prepared dataset's).",
      dataset,
      data_dir,
    )
    builder = tfds.builder(spec.name, data_dir=data_dir)
  return input_pipeline.class_names(builder)


@functools.lru_cache(maxsize=4)
def _probabilities_fn(model: nn.Module):
  return jax.jit(lambda variables, x: jax.nn.softmax(model.apply(variables, x, train=False)))


def probabilities(trained: restore.Trained, batch: np.ndarray) -> np.ndarray:
  """Class probabilities ``[n, num_classes]`` of preprocessed images ``[n, h, w, 3]``."""
  fn = _probabilities_fn(trained.model)
  out = []
  size = min(_BATCH, len(batch))
  for start in range(0, len(batch), _BATCH):
    chunk = batch[start : start + _BATCH]
    padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
    out.append(np.asarray(fn(trained.variables, padded))[: len(chunk)])
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


def run(
  workdir: str, paths: Sequence[str], data_dir: str | None = None, *, raw: bool = False
) -> int:
  """Prints the top-5 classes of each image file; returns the exit status (0, or 1 if a
  file could not be read).

  Args:
    workdir: the training run.
    paths: image files.
    data_dir: the TFDS data dir of the label names; None: the run's.
    raw: classify with the raw parameters even when the run kept a moving average of them
      (which is used by default).

  Raises:
    WorkdirError: the workdir has no usable config or checkpoint.
  """
  trained = restore.load(workdir, raw=raw)
  spec = datasets.get(trained.config.dataset)
  config = trained.config
  names = class_names(
    config.dataset, data_dir or config.get('data_dir') or None, image_size=config.image_size
  )
  kept, batch = [], []
  for path in paths:
    try:
      batch.append(images.read(path, spec, trained.config.image_size))
      kept.append(path)
    except images.ImageError as error:
      cli.error(f'{path}: {error}')
  if batch:
    for path, p in zip(kept, probabilities(trained, np.stack(batch)), strict=True):
      print(format_prediction(path, top_k(p, names)))
  return 0 if len(kept) == len(paths) else 1


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> int:
  if not FLAGS.workdir:
    cli.fail('--workdir is required: the workdir of a training run.')
  if len(argv) < 2:
    cli.fail('no image given: python -m gsa_flax.tools.predict --workdir=DIR IMAGE...')
  cli.check_backend()
  return run(FLAGS.workdir, argv[1:], FLAGS.data_dir, raw=FLAGS.raw)


if __name__ == '__main__':
  # Flags exist only when the module runs as a program: importing it defines none.
  flags.DEFINE_string('workdir', None, 'The training run (config.json, checkpoints).')
  flags.DEFINE_string('data_dir', None, "TFDS data dir for the label names (default: the run's).")
  flags.DEFINE_bool(
    'raw', False, 'The raw parameters, not their moving average (if the run kept one).'
  )
  cli.run(main)
