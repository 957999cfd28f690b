"""The portable-weights file: what is written is read back exactly; every bad file is one
clear error naming it."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
from flax import serialization
from test_files import finishes_within, full_disk

from gsa_flax import files
from gsa_flax.model import weights

CONFIG = {
  'model': 'gsa_resnet_tiny',
  'dataset': 'digits',
  'image_size': 16,
  'stage_sizes': (1, 1),
  'gsa': {'num_heads': 2, 'attention_stages': (True, False), 'rel_length': 0},
  'learning_rate': 0.5,
  'data_dir': '',
}


def _variables(rng) -> dict:
  return {
    'params': {
      'conv_init': {'kernel': rng.normal(size=(3, 3, 3, 8)).astype(np.float32)},
      'head': {
        'kernel': rng.normal(size=(8, 10)).astype(np.float32),
        'bias': rng.normal(size=(10,)).astype(np.float32),
      },
      'count': rng.integers(0, 100, size=(2, 3)).astype(np.int32),
    },
    'batch_stats': {'bn_init': {'mean': rng.normal(size=(8,)).astype(np.float32)}},
  }


def _leaves(tree, prefix=''):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f'{prefix}{key}/')
    else:
      yield f'{prefix}{key}', value


def test_read_gives_back_what_was_exported(tmp_path):
  rng = np.random.default_rng(151)
  variables = _variables(rng)
  card = weights.make_card(CONFIG, variables, num_classes=10, step=42, metrics={'acc': 0.5})
  assert card == {
    'model': 'gsa_resnet_tiny',
    'dataset': 'digits',
    'resolution': 16,
    'num_classes': 10,
    'parameters': 3 * 3 * 3 * 8 + 8 * 10 + 10 + 2 * 3,  # params only, not batch_stats
    'step': 42,
    'acc': 0.5,
  }
  path = weights.export(tmp_path / 'sub' / 'w.msgpack', CONFIG, variables, card)
  contents = weights.read(path)
  assert contents.version == weights.VERSION and contents.card == card
  # Tuples come back as lists; every other value as written.
  assert contents.config == {
    **CONFIG,
    'stage_sizes': [1, 1],
    'gsa': {'num_heads': 2, 'attention_stages': [True, False], 'rel_length': 0},
  }
  want, got = dict(_leaves(variables)), dict(_leaves(contents.variables))
  assert want.keys() == got.keys()
  for name, array in want.items():
    assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
    np.testing.assert_array_equal(got[name], array)
  weights.check_header(path)  # the format tag is at the front
  line = weights.describe(card)
  assert line == (
    'gsa_resnet_tiny on digits at 16x16, 10 classes, 312 parameters, step 42, acc 0.5000'
  )


def _valid(tmp_path) -> bytes:
  variables = _variables(np.random.default_rng(152))
  path = weights.export(tmp_path / 'valid.msgpack', CONFIG, variables, {'model': 'x'})
  return path.read_bytes()


def _packed(contents) -> bytes:
  return serialization.msgpack_serialize(contents, in_place=True)


def _bad_files(tmp_path) -> dict[str, tuple[bytes | None, str]]:
  """name -> (file contents, or None for no file, words the message must hold)."""
  valid = _valid(tmp_path)
  arrays = _variables(np.random.default_rng(153))
  whole = dict(format=weights.FORMAT, version=1, config={}, variables=arrays, card={})
  return {
    'missing': (None, 'does not exist'),
    'text': (b'hello, not weights\n', 'not a gsa-flax weights file'),
    'empty': (b'', 'truncated'),
    'truncated_half': (valid[: len(valid) // 2], 'truncated'),
    'truncated_last_byte': (valid[:-1], 'truncated'),
    'other_format': (_packed({**whole, 'format': 'flax-state'}), "format 'flax-state'"),
    'no_format_tag': (_packed({'version': 1}), 'no format tag'),
    'not_a_map': (msgpack.packb([1, 2, 3]), 'no format tag'),
    'newer_version': (_packed({**whole, 'version': 99}), 'version 99'),
    'missing_card': (
      _packed({k: v for k, v in whole.items() if k != 'card'}),
      'incomplete: card missing',
    ),
    'no_batch_stats': (
      _packed({**whole, 'variables': {'params': arrays['params']}}),
      'params and batch_stats',
    ),
    'leaf_not_array': (
      _packed({**whole, 'variables': {'params': {'w': 3}, 'batch_stats': {}}}),
      'variables/params/w is not an array',
    ),
  }


@pytest.mark.parametrize(
  'name',
  [
    'missing',
    'text',
    'empty',
    'truncated_half',
    'truncated_last_byte',
    'other_format',
    'no_format_tag',
    'not_a_map',
    'newer_version',
    'missing_card',
    'no_batch_stats',
    'leaf_not_array',
  ],
)
def test_a_bad_file_is_one_clear_error(tmp_path, name):
  data, words = _bad_files(tmp_path)[name]
  path = tmp_path / f'{name}.msgpack'
  if data is not None:
    path.write_bytes(data)
  with pytest.raises(weights.WeightsError) as error:
    weights.read(path)
  message = str(error.value)
  assert isinstance(error.value, ValueError) and '\n' not in message
  assert str(path) in message and words in message, message


def test_a_directory_is_not_a_file(tmp_path):
  with pytest.raises(weights.WeightsError, match='is a directory'):
    weights.read(tmp_path)


@pytest.mark.parametrize(
  'data, words',
  [(b'hello', 'not a msgpack map'), (_packed({'format': 'flax-state'}), "format 'flax-state'")],
)
def test_check_header_reads_the_tag_only(tmp_path, data, words):
  path = tmp_path / 'x.msgpack'
  path.write_bytes(data)
  with pytest.raises(weights.WeightsError, match=words):
    weights.check_header(path)
  # A valid file cut after its first bytes still passes: only the header is read.
  path.write_bytes(_valid(tmp_path)[:80])
  weights.check_header(path)


def test_an_export_that_fails_on_a_full_disk_leaves_the_old_file_byte_identical(tmp_path):
  variables = _variables(np.random.default_rng(0))
  path = weights.export(tmp_path / 'w.msgpack', CONFIG, variables, {'model': 'old'})
  old = path.read_bytes()
  bigger = {**variables, 'params': {**variables['params'], 'extra': np.ones(4096, np.float32)}}
  with full_disk(free_bytes=len(old)), pytest.raises(files.FileError) as failed:
    weights.export(path, CONFIG, bigger, {'model': 'new'})
  assert str(failed.value).startswith(f'{path} could not be written (File too large); ')
  assert [p.name for p in tmp_path.iterdir()] == ['w.msgpack']  # no partial file
  assert path.read_bytes() == old


@pytest.mark.parametrize('kind', ['symlink', 'directory', 'fifo'])
def test_an_export_never_writes_through_a_link_or_into_what_is_not_a_file(tmp_path, kind):
  outside = tmp_path / 'outside.bin'
  outside.write_bytes(b"someone else's file")
  path = tmp_path / 'w.msgpack'
  {
    'symlink': lambda: path.symlink_to(outside),
    'directory': path.mkdir,
    'fifo': lambda: os.mkfifo(path),
  }[kind]()
  outcome = finishes_within(
    10, lambda: weights.export(path, CONFIG, _variables(np.random.default_rng(154)), {})
  )
  assert isinstance(outcome.get('error'), files.FileError), outcome
  assert str(outcome['error']).startswith(f'{path} is ') and '\n' not in str(outcome['error'])
  assert outside.read_bytes() == b"someone else's file"


@pytest.mark.parametrize('path', ['/dev/zero', 'fifo'])
def test_a_weights_path_that_never_ends_is_refused_at_once(tmp_path, path):
  if path == 'fifo':
    path = tmp_path / 'fifo'
    os.mkfifo(path)
  for load in (weights.read, weights.check_header):
    outcome = finishes_within(5, lambda load=load: load(path))
    assert isinstance(outcome.get('error'), weights.WeightsError), outcome
    assert 'not an exported weights file' in str(outcome['error'])
