"""Image files (local or ``gs://``) read and preprocessed exactly like evaluation images."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
from etils import epath

from gsa_flax.data import preprocess
from gsa_flax.data.datasets import DatasetSpec


class ImageError(Exception):
  """A file is not a readable image; the message says why (without the path)."""


def read(path: str | os.PathLike, spec: DatasetSpec, image_size: int) -> np.ndarray:
  """Reads, decodes and preprocesses one image file like an eval image of ``spec``.

  Args:
    path: a PNG, JPEG, GIF (first frame) or BMP file.
    spec: the dataset the network was trained on (crop and normalisation).
    image_size: the network's resolution.

  Returns:
    ``float32 [image_size, image_size, 3]``, normalized.

  Raises:
    ImageError: the file cannot be read, or is not a decodable image.
  """
  file = epath.Path(path)
  if not file.exists():
    raise ImageError('no such file')
  if file.is_dir():
    raise ImageError('is a directory, not an image file')
  try:
    encoded = file.read_bytes()
  except OSError as error:
    raise ImageError(f'cannot read the file ({error.strerror or error})') from None
  try:
    image = preprocess.decode(tf.constant(encoded))
  except (tf.errors.InvalidArgumentError, ValueError):
    raise ImageError('not a decodable image (PNG, JPEG, GIF or BMP)') from None
  return preprocess.preprocess_for_eval(image, spec=spec, image_size=image_size).numpy()
