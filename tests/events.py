"""Reads the scalars that clu's default writer put in a workdir's TensorBoard event files."""

import collections
import glob
import os

import numpy as np
import tensorflow as tf


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """``{tag: {step: value}}`` over every event file of ``workdir`` (later files win)."""
  scalars = collections.defaultdict(dict)
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('tensor'):
          array = np.asarray(tf.make_ndarray(value.tensor))
          if array.size == 1 and array.dtype.kind in 'fiub':  # skip text, images, hparams
            scalars[value.tag][event.step] = float(array.reshape(()))
        elif value.HasField('simple_value'):
          scalars[value.tag][event.step] = float(value.simple_value)
  return dict(scalars)


def count_writes(workdir: str, tag: str) -> collections.Counter:
  """How many times each step of ``tag`` was written (resumed runs must not repeat steps)."""
  counts = collections.Counter()
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          counts[event.step] += 1
  return counts
