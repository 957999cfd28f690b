"""Reads back the scalars a run wrote to its TensorBoard event files (local or ``gs://``)."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from gsa_flax.train import workdir as workdir_lib


def read_scalars(workdir: str | os.PathLike) -> dict[str, dict[int, float]]:
  """``{tag: {step: value}}`` from the event files of a workdir (later files win).

  Scalars written as tensors (clu's writers) and as ``simple_value`` are both read;
  images, text and hyperparameters are skipped.
  """
  scalars: dict[str, dict[int, float]] = {}
  for path in sorted(workdir_lib.workdir_path(workdir).glob('events.out.tfevents.*')):
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
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
