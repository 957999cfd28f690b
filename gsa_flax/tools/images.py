"""Image files (local or ``gs://``) read and preprocessed exactly like evaluation images.

A file is checked before it is read (a regular file of at most :data:`MAX_BYTES`; a FIFO or
``/dev/zero`` is refused at once) and before it is decoded (at most :data:`MAX_PIXELS`),
and its EXIF orientation is applied, so a phone photo is classified upright.
"""

from __future__ import annotations

import io
import os

import numpy as np
import PIL.Image
import tensorflow as tf

from gsa_flax import files
from gsa_flax.data import preprocess
from gsa_flax.data.datasets import DatasetSpec

# The largest image file read, and the most pixels decoded (a 12,000 x 11,000 photo): a
# larger file or a small file claiming more pixels is refused before it is decoded.
MAX_BYTES = 256 * files.MiB
MAX_PIXELS = 2**27
# The EXIF tag of the orientation in which the camera stored the pixels.
ORIENTATION = 0x0112


class ImageError(Exception):
  """A file is not a readable image; the message says why (without the path)."""


def upright(image: np.ndarray, orientation: int) -> np.ndarray:
  """``[h, w, c]`` pixels stored with EXIF ``orientation`` (1-8), turned to be viewed upright.

  The same turns as PIL's ``ImageOps.exif_transpose``: 2 mirrors, 3 turns 180 degrees,
  4 flips, 5 transposes, 6 turns 90 degrees clockwise, 7 transverses, 8 turns 90 degrees
  counter-clockwise; any other value leaves the pixels as they are.
  """
  turns = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, k=1),
  }
  return np.ascontiguousarray(turns[orientation](image)) if orientation in turns else image


def _orientation(encoded: bytes) -> int:
  """The EXIF orientation of an encoded image (1 if none), checking its size on the way."""
  try:
    with PIL.Image.open(io.BytesIO(encoded)) as image:
      width, height = image.size
      if width * height > MAX_PIXELS:
        raise ImageError(
          f'is {width}x{height} pixels, more than the {MAX_PIXELS:,} an image may have; '
          'downscale it first'
        )
      orientation = image.getexif().get(ORIENTATION, 1)  # may read the file (PNG)
  except PIL.Image.DecompressionBombError:
    raise ImageError(
      f'claims more pixels than the {MAX_PIXELS:,} an image may have; downscale it first'
    ) from None
  except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError):
    return 1  # not PIL's to judge: the decoder says whether it is an image
  return orientation if isinstance(orientation, int) else 1


def read(path: str | os.PathLike, spec: DatasetSpec, image_size: int) -> np.ndarray:
  """Reads, decodes and preprocesses one image file like an eval image of ``spec``.

  Args:
    path: a PNG, JPEG, GIF (first frame) or BMP file; its EXIF orientation is applied.
    spec: the dataset the network was trained on (crop and normalisation).
    image_size: the network's resolution.

  Returns:
    ``float32 [image_size, image_size, 3]``, normalized.

  Raises:
    ImageError: the file cannot be read (missing, a directory, a FIFO, a device, too
      large), or is not a decodable image.
  """
  try:
    encoded = files.read_bytes(path, limit=MAX_BYTES, what='an image file')
  except files.FileError as error:
    raise ImageError(error.reason.rstrip('.')) from None
  orientation = _orientation(encoded)
  try:
    image = preprocess.decode(tf.constant(encoded))
  except (tf.errors.InvalidArgumentError, ValueError):
    raise ImageError('not a decodable image (PNG, JPEG, GIF or BMP)') from None
  if orientation != 1:
    image = tf.constant(upright(image.numpy(), orientation))
  return preprocess.preprocess_for_eval(image, spec=spec, image_size=image_size).numpy()
