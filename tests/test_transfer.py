"""Transfer: table resizing against a hand computation and closed forms; adapting variables
between resolutions and numbers of classes; every mismatch one clear error.

Variables are fresh random draws of the networks' shapes (batch statistics positive), so a
copied, resized or re-initialised value is told apart from any other.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gsa_flax.model import networks, transfer, weights
from gsa_flax.model.layers import GSA, GSAOptions

HEADS = 2


def _tiny(**overrides) -> networks.ResNet:
  """Three GSA layers seeing 16, 16 and 8 pixels at 16x16 (small stem; the strided block
  pools after its GSA module)."""
  kwargs = dict(num_classes=10, stage_sizes=(1, 2), num_filters=8, gsa=GSAOptions(num_heads=HEADS))
  return networks.GSAResNetTiny(**{**kwargs, **overrides})


# The feature-map side each GSA layer sees, as a fraction of the image side: block 0
# (stage 1) and block 1 (stage 2's strided block, pooling after GSA) see the stem's
# resolution, block 2 half of it.
GSA_FRACTIONS = {'BottleneckBlock_0': 1, 'BottleneckBlock_1': 1, 'BottleneckBlock_2': 2}


def _random_variables(model, image_size: int, rng) -> dict:
  """Random values of ``model``'s shapes at ``image_size``; batch statistics in 0.5..1.5.

  Kernels and tables are scaled by 1/sqrt(fan-in), as an initialiser would, so that
  activations stay finite through the network whatever the draw.
  """
  shapes = networks.abstract_variables(model, image_size)

  def param(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(s.dtype)

  return {
    'params': jax.tree.map(param, shapes['params']),
    'batch_stats': jax.tree.map(
      lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes['batch_stats']
    ),
  }


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep='/')


def _tables(tree) -> dict:
  return {
    path: leaf
    for path, leaf in _flat(tree).items()
    if path.rsplit('/', 1)[-1] in ('rel_col', 'rel_row', 'abs_col', 'abs_row')
  }


def _by_hand(table: np.ndarray, length: int) -> np.ndarray:
  """Linear interpolation in the offset, one output entry at a time.

  Entry ``j`` is offset ``j - c'``; scaled by ``(L - 1) / (length - 1)`` it is a fractional
  offset of the source, read between the two entries around it.
  """
  size = table.shape[0]
  centre, new_centre = (size - 1) / 2, (length - 1) / 2
  out = np.zeros((length, *table.shape[1:]))
  for j in range(length):
    offset = (j - new_centre) * (size - 1) / (length - 1)
    position = centre + offset
    below = math.floor(position)
    fraction = position - below
    if below >= size - 1:  # the last entry itself
      out[j] = table[size - 1]
    else:
      out[j] = (1 - fraction) * table[below].astype(np.float64) + fraction * table[
        below + 1
      ].astype(np.float64)
  return out


# Tables


@pytest.mark.parametrize(
  'size, length', [(31, 63), (63, 31), (7, 23), (23, 7), (5, 9), (16, 32), (32, 12), (3, 101)]
)
def test_resize_table_matches_a_hand_computation(size, length):
  table = np.random.default_rng(140).normal(size=(size, 3, 2)).astype(np.float32)
  resized = transfer.resize_table(table, length)
  assert resized.shape == (length, 3, 2) and resized.dtype == np.float32
  np.testing.assert_allclose(resized, _by_hand(table, length), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('size, length', [(31, 63), (63, 31), (15, 15), (9, 41)])
def test_resize_keeps_offset_zero_at_the_centre_and_scales_offsets(size, length):
  rng = np.random.default_rng(141)
  table = rng.normal(size=(size, HEADS, 4)).astype(np.float32)
  resized = transfer.resize_table(table, length)
  centre, new_centre = (size - 1) // 2, (length - 1) // 2
  # Offset 0, the first and the last entry are carried over exactly.
  np.testing.assert_array_equal(resized[new_centre], table[centre])
  np.testing.assert_array_equal(resized[[0, -1]], table[[0, -1]])
  if size == length:
    np.testing.assert_array_equal(resized, table)
  # A table linear in the offset, a + b * offset, becomes a + b * offset * (L-1)/(L'-1).
  a, b = rng.normal(size=(2, HEADS, 4))
  offsets = np.arange(size) - centre
  linear = a + b * offsets[:, None, None]
  new_offsets = (np.arange(length) - new_centre) * (size - 1) / (length - 1)
  np.testing.assert_allclose(
    transfer.resize_table(linear, length), a + b * new_offsets[:, None, None], atol=1e-12
  )


def test_resize_a_single_entry_repeats_it():
  table = np.random.default_rng(142).normal(size=(1, HEADS, 3))
  np.testing.assert_array_equal(transfer.resize_table(table, 7), np.repeat(table, 7, axis=0))
  five = np.random.default_rng(143).normal(size=(5, HEADS, 3))
  np.testing.assert_array_equal(transfer.resize_table(five, 1), five[[2]])


def test_resize_position_tables_to_each_layers_new_global_length():
  rng = np.random.default_rng(144)
  model = _tiny()
  variables = _random_variables(model, 16, rng)
  resized = transfer.resize_position_tables(variables, model, 32)
  before, after = _tables(variables), _tables(resized)
  assert len(after) == 2 * len(GSA_FRACTIONS)
  for path, table in after.items():
    side = 32 // GSA_FRACTIONS[path.split('/')[1]]
    assert table.shape == (2 * side - 1, HEADS, before[path].shape[2]), path
    assert before[path].shape[0] == 2 * (side // 2) - 1
    np.testing.assert_array_equal(table[side - 1], before[path][side // 2 - 1])
  # Nothing else changes.
  for path, leaf in _flat(resized).items():
    if path not in after:
      assert leaf is _flat(variables)[path], path
  # A configured rel_length is the length every table gets.
  fixed = transfer.resize_position_tables(
    variables, model.clone(gsa=dataclasses.replace(model.gsa, rel_length=9)), 32
  )
  assert {t.shape[0] for t in _tables(fixed).values()} == {9}


def test_a_resized_table_reaches_the_whole_new_map():
  """The problem resizing solves: a global table from 16x16 is local at 32x32.

  A GSA layer with the column step only: its output at row 0 depends on row 31 of the
  same column only if its table has offset 31.
  """
  rng = np.random.default_rng(145)
  layer = GSA(features=8, num_heads=HEADS, content=False, positional='column')
  variables = layer.init(jax.random.key(0), jnp.zeros((1, 16, 16, 8)), train=False)
  assert variables['params']['rel_col'].shape[0] == 31
  x = rng.normal(size=(1, 32, 32, 8)).astype(np.float32)
  far = x.copy()
  far[0, 31, 5] += 1.0  # the farthest pixel of column 5 from row 0

  def row0(variables, x):
    return np.asarray(layer.apply(variables, x, train=False))[0, 0, 5]

  np.testing.assert_array_equal(row0(variables, x), row0(variables, far))  # local: unseen
  rel_col = transfer.resize_table(variables['params']['rel_col'], 63)
  resized = {'params': {**variables['params'], 'rel_col': rel_col}}
  assert np.abs(row0(resized, x) - row0(resized, far)).max() > 1e-3  # global again


def test_resized_model_applies_at_the_new_resolution():
  """16 -> 32 with absolute tables: one entry per position, ends aligned, and the network
  runs at the new resolution only once they are resized."""
  rng = np.random.default_rng(146)
  model = _tiny(gsa=GSAOptions(num_heads=HEADS, position_embedding='absolute'))
  variables = _random_variables(model, 16, rng)
  x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  # Absolute tables have one entry per position: without resizing, 32x32 cannot run.
  with pytest.raises(Exception, match='abs_col'):
    model.apply(variables, x, train=False)
  resized = transfer.resize_position_tables(variables, model, 32)
  for path, table in _tables(resized).items():
    side = 32 // GSA_FRACTIONS[path.split('/')[1]]
    assert table.shape[0] == side, path
    np.testing.assert_array_equal(table[[0, -1]], _tables(variables)[path][[0, -1]])
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(resized, x)
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()


# adapt


def test_adapt_16_to_32_resizes_every_table_and_copies_the_rest():
  rng = np.random.default_rng(147)
  model = _tiny()
  source = _random_variables(model, 16, rng)
  target = _random_variables(model, 32, rng)
  adapted = transfer.adapt(source, target)
  assert adapted.reinitialized == ()
  tables = _tables(adapted.variables)
  assert {(path, a, b) for path, a, b in adapted.resized} == {
    (path, 2 * (16 // GSA_FRACTIONS[path.split('/')[1]]) - 1, t.shape[0])
    for path, t in tables.items()
  }
  for path, table in tables.items():
    side = 32 // GSA_FRACTIONS[path.split('/')[1]]
    assert table.shape[0] == 2 * side - 1
    np.testing.assert_allclose(
      table, _by_hand(_flat(source)[path], 2 * side - 1), rtol=1e-6, atol=1e-6
    )
  for path, leaf in _flat(adapted.variables).items():
    if path not in tables:
      np.testing.assert_array_equal(leaf, _flat(source)[path], err_msg=path)
  x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(adapted.variables, x)
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()


def test_adapt_to_more_classes_reinitialises_the_head_only():
  rng = np.random.default_rng(148)
  source = _random_variables(_tiny(num_classes=10), 16, rng)
  target = _random_variables(_tiny(num_classes=100), 16, rng)
  adapted = transfer.adapt(source, target)
  assert set(adapted.reinitialized) == {'params/head/kernel', 'params/head/bias'}
  assert adapted.resized == ()
  flat, want_source, want_target = _flat(adapted.variables), _flat(source), _flat(target)
  assert flat['params/head/kernel'].shape == (4 * 16, 100)
  for path, leaf in flat.items():
    expected = want_target[path] if path.startswith('params/head/') else want_source[path]
    np.testing.assert_array_equal(leaf, expected, err_msg=path)
  assert any(path.startswith('batch_stats/') for path in flat)
  # Against an abstract target (a check before anything is initialised), the head stays
  # abstract and the rest is copied all the same.
  shapes = networks.abstract_variables(_tiny(num_classes=100), 16)
  dry = _flat(transfer.adapt(source, shapes).variables)
  assert isinstance(dry['params/head/bias'], jax.ShapeDtypeStruct)
  np.testing.assert_array_equal(
    dry['params/conv_init/kernel'], want_source['params/conv_init/kernel']
  )


@pytest.mark.parametrize(
  'target, words',
  [
    # Another stage width: the first parameter named, with both shapes.
    (
      _tiny(num_filters=16),
      ['params/BottleneckBlock_0/BatchNorm_0/bias', '(8,) in the source', '(16,) in the target'],
    ),
    # Another number of heads: the table's length may change, its heads may not.
    (
      _tiny(gsa=GSAOptions(num_heads=4)),
      ['params/BottleneckBlock_0/GSA_0/rel_col', f'(31, {HEADS}, 2)', '(31, 4, 1)'],
    ),
    # Another architecture: convolutions where the source has GSA modules.
    (
      networks.ResNetTiny(num_classes=10, stage_sizes=(1, 2), num_filters=8),
      ['params/BottleneckBlock_0/Conv_2/kernel', 'not in the source', 'architecture'],
    ),
    # Another depth: a block the target lacks.
    (_tiny(stage_sizes=(1, 1)), ['params/BottleneckBlock_2', 'not in the target']),
  ],
)
def test_a_mismatch_is_one_clear_error(target, words):
  source = _random_variables(_tiny(), 16, np.random.default_rng(149))
  with pytest.raises(transfer.TransferError) as error:
    transfer.adapt(source, networks.abstract_variables(target, 16))
  message = str(error.value)
  assert isinstance(error.value, ValueError) and '\n' not in message
  for word in words:
    assert word in message, message


# init_from


def test_locate_tells_files_from_runs(tmp_path):
  model = _tiny()
  variables = _random_variables(model, 16, np.random.default_rng(150))
  exported = weights.export(
    tmp_path / 'w.msgpack',
    {'model': 'gsa_resnet_tiny', 'dataset': 'digits', 'image_size': 16},
    variables,
    {},
  )
  assert transfer.locate(str(exported)) == transfer.Source(str(exported), 'weights')
  assert transfer.locate(str(tmp_path)) == transfer.Source(str(tmp_path), 'run')
  (tmp_path / 'notes.txt').write_text('not weights')
  for bad, word in [(tmp_path / 'missing', 'does not exist'), (tmp_path / 'notes.txt', 'not a')]:
    with pytest.raises(transfer.TransferError, match=word) as error:
      transfer.locate(str(bad))
    assert str(bad) in str(error.value)
