"""predict: the CLI on real files against the eval pipeline applied to the saved state."""

import contextlib
import io
import os
import struct
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import DIGITS_IMAGE_SIZE, REPO, environment, tiny_config
from PIL import Image, ImageOps

from gsa_flax.data import datasets, input_pipeline
from gsa_flax.tools import images, predict
from gsa_flax.train import checkpoints, experiment
from gsa_flax.train import state as state_lib
from gsa_flax.train import workdir as workdir_lib

DIGITS = datasets.get('digits')

NUM_IMAGES = 3


def _test_examples(digits_dir):
  """The first test-split examples: their encoded PNG bytes and labels."""
  builder = input_pipeline.get_builder(DIGITS, digits_dir, image_size=DIGITS_IMAGE_SIZE)
  ds = builder.as_dataset(split='test', decoders={'image': tfds.decode.SkipDecoding()})
  return [(ex['image'], int(ex['label'])) for ex in ds.take(NUM_IMAGES).as_numpy_iterator()]


def _saved_run(digits_dir, workdir):
  """A workdir as training leaves it (config.json, a checkpoint), with random parameters.

  Written by training's own save functions; no training step is compiled. Random normal
  parameters (not the init, whose zero BatchNorm scales flatten the output; scaled so that
  the softmax neither saturates nor flattens) give each image its own ranked classes.
  Returns the state that was saved.
  """
  config = tiny_config(digits_dir)
  pieces = experiment.setup(config, 10, steps_per_epoch=10, num_train_steps=10)
  state = jax.jit(lambda rng: state_lib.create(pieces, rng, image_size=16))(jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: 0.35 * rng.normal(size=p.shape).astype(p.dtype), state.params)
  state = state.replace(step=7, params=params)
  workdir_lib.write_config(config, workdir)
  saver = checkpoints.Checkpointer(workdir, keep=1)
  saver.save(7, state_lib.state_dict(state), {'step': 7})
  saver.wait()
  return pieces.model, state


def _reference(digits_dir, model, state):
  """Top-5 of the in-memory state on the eval pipeline's first batch.

  Independent of what predict does with files: the images come from the eval pipeline and
  the variables from memory, not from the checkpoint.
  """
  builder = input_pipeline.get_builder(DIGITS, digits_dir, image_size=DIGITS_IMAGE_SIZE)
  iterator, _ = input_pipeline.create_eval_iterator(
    builder, spec=DIGITS, global_batch_size=8, image_size=DIGITS_IMAGE_SIZE
  )
  batch = next(iterator)
  names = input_pipeline.class_names(builder)
  variables = jax.device_get(state_lib.variables(state))
  # Eval batches are uint8 on 0..255; the eval step normalises with the spec's statistics.
  mean, std = np.float32(DIGITS.mean_rgb), np.float32(DIGITS.stddev_rgb)
  images = (batch['image'][:NUM_IMAGES].astype(np.float32) - mean) / std
  logits = model.apply(variables, images, train=False)
  probs = np.asarray(jax.nn.softmax(logits))
  return [predict.top_k(p, names) for p in probs], batch['label'][:NUM_IMAGES]


def _parse(stdout):
  """``{path: [(name, probability), ...]}`` from predict's output."""
  parsed, current = {}, None
  for line in stdout.splitlines():
    if line.startswith('  '):
      rank, name, prob = line.split()
      assert rank == f'{len(parsed[current]) + 1}.'
      parsed[current].append((name, float(prob)))
    else:
      current = line
      parsed[current] = []
  return parsed


def test_predict_files(digits_dir, tmp_path, capsys):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  model, state = _saved_run(digits_dir, str(workdir))
  examples = _test_examples(digits_dir)
  paths = []
  for i, (encoded, _) in enumerate(examples):
    paths.append(tmp_path / f'digit{i}.png')
    paths[-1].write_bytes(encoded)
  (tmp_path / 'notes.txt').write_text('not an image')
  missing = tmp_path / 'missing.jpg'
  # The first digit as a camera stores a photo taken sideways: pixels turned a quarter
  # counter-clockwise, EXIF orientation 6 saying "turn clockwise to view".
  sideways = tmp_path / 'sideways.png'
  turned = _with_orientation(np.rot90(_pixels(paths[0]), k=1), 6)
  turned.save(sideways, exif=turned.info['exif'])
  fifo = tmp_path / 'fifo.png'
  os.mkfifo(fifo)  # nobody writes it: reading it would block for ever
  args = [str(paths[0]), str(tmp_path / 'notes.txt'), str(paths[1]), str(missing), str(paths[2])]
  args += [str(sideways), '/dev/zero', str(fifo)]

  started = time.perf_counter()
  status = predict.run(str(workdir), args)
  out, err = capsys.readouterr()
  assert status == 1, err[-3000:]  # some files failed, not all
  assert time.perf_counter() - started < 60
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert errors == [
    f'error: {tmp_path / "notes.txt"}: not a decodable image (PNG, JPEG, GIF or BMP)',
    f'error: {missing}: does not exist: give the path of an image file',
    'error: /dev/zero: is a device, not an image file',
    f'error: {fifo}: is a FIFO, not an image file',
  ]
  got = _parse(out)
  assert list(got) == [str(p) for p in [*paths, sideways]]  # in order, the bad ones skipped
  assert got[str(sideways)] == got[str(paths[0])]  # classified upright
  want, labels = _reference(digits_dir, model, state)
  np.testing.assert_array_equal(labels, [label for _, label in examples])  # the same images
  for path, ranked in zip(paths, want, strict=True):
    assert [name for name, _ in got[str(path)]] == [name for name, _ in ranked]
    # Printed with 4 decimals; the three images differ in the third.
    np.testing.assert_allclose([p for _, p in got[str(path)]], [p for _, p in ranked], atol=6e-5)


def _pixels(path) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


def _with_orientation(pixels: np.ndarray, orientation: int) -> Image.Image:
  """An image whose EXIF says its stored ``pixels`` are seen after ``orientation``'s turn."""
  image = Image.fromarray(np.ascontiguousarray(pixels))
  exif = Image.Exif()
  exif[images.ORIENTATION] = orientation
  image.info['exif'] = exif.tobytes()
  return image


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG'])
def test_every_exif_orientation_is_turned_like_pil_does(tmp_path, fmt):
  rng = np.random.default_rng(0)
  stored = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)  # H != W: turns show
  for orientation in range(1, 9):
    path = tmp_path / f'o{orientation}.{fmt.lower()}'
    image = _with_orientation(stored, orientation)
    image.save(path, format=fmt, exif=image.info['exif'], quality=100)
    encoded = path.read_bytes()
    with Image.open(io.BytesIO(encoded)) as opened:
      want = np.asarray(ImageOps.exif_transpose(opened).convert('RGB'))  # PIL's reading
    decoded = _pixels(path)  # what the file holds, unturned (JPEG: after its loss)
    np.testing.assert_array_equal(images.upright(decoded, orientation), want)


def _png_header(width: int, height: int) -> bytes:
  """A PNG that claims ``width x height`` pixels in a few dozen bytes."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack('>I', len(data)) + body + struct.pack('>I', zlib.crc32(body))

  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', header)
    + chunk(b'IDAT', zlib.compress(b''))
    + chunk(b'IEND', b'')
  )


@pytest.mark.parametrize('side', [12_000, 20_000])  # past our bound; past PIL's own too
def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(tmp_path, side):
  path = tmp_path / 'bomb.png'
  path.write_bytes(_png_header(side, side))
  started = time.perf_counter()
  with pytest.warns() if side == 12_000 else contextlib.nullcontext():  # PIL's warning
    with pytest.raises(images.ImageError, match='134,217,728 an image may have'):
      images.read(path, DIGITS, 16)
  assert time.perf_counter() - started < 2


def test_load_errors(tmp_path):
  with pytest.raises(workdir_lib.WorkdirError) as error:
    predict.run(str(tmp_path / 'nowhere'), ['x.png'])
  assert str(error.value) == (
    f'workdir {tmp_path / "nowhere"} does not exist; pass the --workdir of a training run.'
  )
  with pytest.raises(workdir_lib.WorkdirError, match='config.json is missing'):
    predict.run(str(tmp_path), ['x.png'])
  workdir_lib.write_config(tiny_config(''), str(tmp_path))
  with pytest.raises(workdir_lib.WorkdirError, match='no checkpoint'):
    predict.run(str(tmp_path), ['x.png'])
  assert not (tmp_path / 'checkpoints').exists()  # a read-only tool creates nothing


def test_cli_user_error_is_one_line(tmp_path):
  result = subprocess.run(
    [sys.executable, '-m', 'gsa_flax.tools.predict', f'--workdir={tmp_path}', 'x.png'],
    env=environment(devices=1),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert errors == [
    f'error: {tmp_path / "config.json"} is missing: {tmp_path} is not a training workdir '
    '(main.py writes it).'
  ]
  assert result.stderr.strip().endswith(errors[0]) and 'Traceback' not in result.stderr


def test_top_k_and_format():
  probs = np.array([0.1, 0.05, 0.3, 0.2, 0.15, 0.2])
  ranked = predict.top_k(probs, ['a', 'b', 'c', 'd', 'e', 'f'])
  assert ranked == [('c', 0.3), ('d', 0.2), ('f', 0.2), ('e', 0.15), ('a', 0.1)]
  assert predict.format_prediction('x.png', ranked[:2]).splitlines() == [
    'x.png',
    '  1. c  0.3000',
    '  2. d  0.2000',
  ]
