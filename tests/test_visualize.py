"""Attention maps are the weights the model uses: each GSA output is rebuilt from them."""

import functools
import glob
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from conftest import DIGITS_IMAGE_SIZE
from events import read_scalars as reference_scalars
from PIL import Image
from tiny import tiny_config

from gsa_flax import input_pipeline, train, visualize
from gsa_flax.layers import GSA


def _random_variables(module, x, seed):
  """Every variable random: parameters normal, BatchNorm statistics in [0.5, 1.5].

  Shapes come from an abstract init and values from NumPy: nothing is compiled.
  """
  shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  variables = {
    'params': jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), shapes['params'])
  }
  if 'batch_stats' in shapes:
    variables['batch_stats'] = jax.tree.map(
      lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), shapes['batch_stats']
    )
  return variables


def _rebuild_at_every_pixel(layer, fn, shape):
  """``fn(x, y) -> [batch, heads, e]`` at every pixel, as ``[batch, height, width, heads, e]``."""
  xs, ys = jnp.meshgrid(jnp.arange(layer.height), jnp.arange(layer.width), indexing='ij')
  out = jax.vmap(fn)(xs.ravel(), ys.ravel())  # [pixels, batch, heads, e]
  return out.transpose(1, 0, 2, 3).reshape(shape)


def _content_from_maps(layer, q, k, v):
  """``sum_j a_pj v_j`` at every pixel p, with ``a_p`` from content_weights."""

  def at(x, y):
    a = visualize.content_weights(q, k, (x, y), normalize_queries=layer.normalize_queries)
    return jnp.einsum('bnxy,bxyne->bne', a, v)

  return _rebuild_at_every_pixel(layer, at, v.shape)


def _step_from_maps(layer, q, params, values, axis):
  """One positional step at every pixel: sum over p's column (axis 1) or row (axis 2)."""
  relative = layer.position_embedding == 'relative'
  name = ('rel_' if relative else 'abs_') + ('col' if axis == 1 else 'row')

  def at(x, y):
    w, _ = visualize.positional_weights(
      q, params[name], (x, y), axis=axis, relative=relative, softmax=layer.positional_softmax
    )
    line = values[:, :, y] if axis == 1 else values[:, x, :]  # [batch, length, heads, e]
    return jnp.einsum('bnz,bzne->bne', w, line)

  return _rebuild_at_every_pixel(layer, at, values.shape)


def _batch_norm(y, params, stats, eps=1e-5):
  flat = y.reshape(*y.shape[:3], -1)
  flat = (flat - stats['mean']) / jnp.sqrt(stats['var'] + eps) * params['scale'] + params['bias']
  return flat.reshape(y.shape)


@functools.partial(jax.jit, static_argnums=0)
def _rebuild(layer, q, k, v, params, stats):
  out = jnp.zeros(v.shape, jnp.float32)
  if layer.content:
    out += _content_from_maps(layer, q, k, v)
  if layer.positional != 'none':
    y = _step_from_maps(layer, q, params, v, axis=1)
    if layer.positional == 'axial':
      y = _batch_norm(y, params['bn_col'], stats['bn_col'])
      y = _step_from_maps(layer, q, params, y, axis=2)
    out += y
  return out.reshape(*out.shape[:3], -1)


def _gsa_from_maps(cap, batch_stats):
  """The whole GSA output rebuilt from its content map and column/row weights."""
  return _rebuild(cap.layer, cap.q, cap.k, cap.v, cap.params, batch_stats)


GSA_VARIANTS = {
  'content_only_query_softmax': dict(positional='none', normalize_queries=True),
  'column_local_softmax': dict(
    content=False, positional='column', rel_length=3, positional_softmax=True
  ),
  'axial': dict(),
  'axial_local': dict(rel_length=5),
  'axial_absolute_softmax': dict(position_embedding='absolute', positional_softmax=True),
}


@pytest.mark.parametrize('variant', sorted(GSA_VARIANTS))
def test_maps_rebuild_gsa_output(variant):
  """Content map and column/row weights reproduce GSA's output at every pixel (H != W)."""
  module = GSA(features=12, num_heads=3, key_features=6, **GSA_VARIANTS[variant])
  x = jax.random.normal(jax.random.key(0), (2, 7, 5, 4))
  variables = _random_variables(module, x, seed=1)
  want = module.apply(variables, x, train=False)
  (cap,) = visualize.capture(module, variables, x)
  assert (cap.layer.height, cap.layer.width, cap.layer.num_heads) == (7, 5, 3)
  got = _gsa_from_maps(cap, variables.get('batch_stats', {}))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_positional_weights_masked_outside_neighbourhood():
  q = jax.random.normal(jax.random.key(0), (1, 9, 4, 2, 3))
  rel = jax.random.normal(jax.random.key(1), (5, 2, 3))  # offsets -2..2
  w, valid = visualize.positional_weights(q, rel, (6, 1), axis=1)
  np.testing.assert_array_equal(valid, [False] * 4 + [True] * 5)
  assert np.all(w[..., :4] == 0)
  # Direct: query row 6 looks at row 8 with offset +2, the last embedding.
  np.testing.assert_allclose(w[0, :, 8], jnp.einsum('nd,nd->n', q[0, 6, 1], rel[4]), rtol=1e-6)
  w, _ = visualize.positional_weights(q, rel, (6, 1), axis=1, softmax=True)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)


@functools.cache
def _network(model_name='gsa_resnet_tiny'):
  """The network of a tiny digits run (tiny_config) with random variables, and a batch.

  Shared by the tests below, so that each program is compiled once for all of them (and
  the capture of write_attention_maps, on this model and shape, is compiled once too).
  """
  model = train.create_model(tiny_config('', model=model_name), num_classes=10)
  x = jax.random.normal(jax.random.key(0), (2, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE, 3))
  if model_name == 'gsa_resnet_tiny':
    return model, _random_variables(model, x, seed=3), x
  # A convolutional network is never applied: its GSA layers are found abstractly.
  return model, jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x), x


def test_network_capture_matches_every_gsa_layer():
  """In a GSA-ResNet, every captured layer's maps rebuild that layer's output."""
  model, variables, x = _network()
  gsa_outputs = functools.partial(
    model.apply, train=False, capture_intermediates=visualize._is_gsa_call, mutable=True
  )
  _, state = jax.jit(gsa_outputs)(variables, x)
  captures = visualize.capture(model, variables, x)
  assert [c.layer.path for c in captures] == ['BottleneckBlock_0/GSA_0', 'BottleneckBlock_1/GSA_0']
  # GSA runs before the 2x2 pooling of a strided block: both at the input's 16x16.
  assert [(c.layer.height, c.layer.width, c.layer.features) for c in captures] == [
    (16, 16, 8),
    (16, 16, 16),
  ]
  for cap in captures:
    want = visualize._subtree(state['intermediates'], cap.layer.path)['__call__'][0]
    stats = visualize._subtree(variables['batch_stats'], cap.layer.path)
    # Random weights through the stem and a block grow activations to ~1e7: compare at scale.
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(_gsa_from_maps(cap, stats), want, rtol=1e-4, atol=1e-5 * scale)


def test_attention_maps_and_png(tmp_path):
  model, variables, x = _network()
  captures = visualize.capture(model, variables, x)
  maps = visualize.attention_maps(captures[-1], index=1)
  assert maps.query == (8, 8)
  assert maps.content.shape == (2, 16, 16)
  assert maps.column.shape == maps.row.shape == (2, 16)
  want = visualize.content_weights(captures[-1].q, captures[-1].k, (8, 8))[1]
  np.testing.assert_allclose(maps.content, want, rtol=1e-5)
  with pytest.raises(ValueError, match='outside the 16x16 map'):
    visualize.attention_maps(captures[0], query=(16, 0))

  path = visualize.save_attention_map(
    str(tmp_path / 'maps.png'), model, variables, x, dataset='digits', query=(3, 5)
  )
  with Image.open(path) as image:
    width, height = image.size
  assert width > 1200 and height > 400  # two images side by side, two layer rows

  with pytest.raises(ValueError, match='has 2 heads'):
    visualize.save_attention_map(
      str(tmp_path / 'x.png'), model, variables, x, dataset='digits', head=2
    )
  with pytest.raises(ValueError, match="no GSA layer '5'; the network has 2"):
    visualize.save_attention_map(
      str(tmp_path / 'x.png'), model, variables, x, dataset='digits', layers=['5']
    )

  resnet, resnet_vars, _ = _network('resnet_tiny')
  assert visualize.capture(resnet, resnet_vars, x) == []
  with pytest.raises(ValueError, match='no GSA layer'):
    visualize.save_attention_map(str(tmp_path / 'x.png'), resnet, resnet_vars, x, dataset='digits')


class _ImageWriter:
  def __init__(self):
    self.images = {}

  def write_images(self, step, images):
    self.images[step] = images


@pytest.mark.parametrize('model_name', ['gsa_resnet_tiny', 'resnet_tiny'])
def test_write_attention_maps(digits_dir, model_name):
  builder = input_pipeline.get_builder('digits', digits_dir, image_size=DIGITS_IMAGE_SIZE)
  model, variables, _ = _network(model_name)
  state = types.SimpleNamespace(**variables)  # what the hook reads of a TrainState
  writer = _ImageWriter()
  visualize.write_attention_maps(writer, 7, state, model, builder, tiny_config(digits_dir), count=2)
  if model_name == 'resnet_tiny':
    assert writer.images == {}  # no GSA layers: nothing written, nothing fails
    return
  images = writer.images[7]['attention_maps']
  assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[0] == 2
  assert images.shape[-1] == 3 and images.std() > 0


_RUNS = {}


def trained_run(digits_dir, tmp_path_factory):
  """One tiny digits run for this file and test_predict.py: ``(workdir, final state)``.

  Two steps, an eval after each, a checkpoint at the end; run once per session.
  """
  if digits_dir not in _RUNS:
    workdir = str(tmp_path_factory.mktemp('trained_run'))
    config = tiny_config(
      digits_dir,
      num_train_steps=2,
      log_every_steps=1,
      eval_every_steps=1,
      checkpoint_every_steps=2,
      attention_maps=True,
    )
    _RUNS[digits_dir] = workdir, train.train_and_evaluate(config, workdir)
  return _RUNS[digits_dir]


@pytest.fixture
def trained_workdir(digits_dir, tmp_path_factory):
  return trained_run(digits_dir, tmp_path_factory)[0]


def _image_tags(workdir):
  tags = {}
  for path in glob.glob(f'{workdir}/events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == 'images':
          tags.setdefault(value.tag, set()).add(event.step)
  return tags


def test_eval_writes_attention_maps_to_tensorboard(trained_workdir):
  assert _image_tags(trained_workdir) == {'attention_maps': {1, 2}}  # at every eval


def test_attention_maps_flag_off(digits_dir, trained_workdir, tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('attention maps written with config.attention_maps=False')

  monkeypatch.setattr(visualize, 'write_attention_maps', fail)
  # An eval_only run on the trained checkpoint reaches the eval hook; the evaluation itself
  # is stubbed out (its compile would cost more than the whole check).
  monkeypatch.setattr(train, 'evaluate', lambda *args: {'eval_accuracy': 0.5})
  shutil.copytree(f'{trained_workdir}/checkpoints', tmp_path / 'checkpoints')
  config = tiny_config(digits_dir, num_train_steps=2, eval_only=True, attention_maps=False)
  train.train_and_evaluate(config, str(tmp_path))
  assert visualize.read_scalars(str(tmp_path))['eval_accuracy'] == {2: 0.5}
  assert _image_tags(str(tmp_path)) == {}


def test_visualize_cli(trained_workdir, tmp_path, capsys):
  # The first eval images (as many as the eval hook drew, so its compiled capture is reused).
  assert visualize.main([f'--workdir={trained_workdir}', f'--output={tmp_path / "a.png"}']) == 0
  assert (tmp_path / 'a.png').stat().st_size > 10_000
  # Image files: a bad one is reported on one line and the others are still drawn.
  Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / 'grey.png')
  (tmp_path / 'notes.txt').write_text('not an image')
  args = [str(tmp_path / 'grey.png'), str(tmp_path / 'notes.txt')]
  status = visualize.main(
    [f'--workdir={trained_workdir}', f'--output={tmp_path / "b.png"}', '--layers=-1', *args]
  )
  assert status == 1
  assert 'not a decodable image' in capsys.readouterr().err
  assert (tmp_path / 'b.png').stat().st_size > 5_000


def test_learning_curves(trained_workdir, tmp_path):
  scalars = visualize.read_scalars(trained_workdir)
  assert scalars == reference_scalars(trained_workdir)
  assert sorted(scalars['eval_accuracy']) == [1, 2]
  fig = visualize.learning_curves_figure(trained_workdir)
  fig.savefig(tmp_path / 'curves.png')
  assert (tmp_path / 'curves.png').stat().st_size > 10_000
  with pytest.raises(FileNotFoundError, match='no training metrics'):
    visualize.learning_curves_figure(str(tmp_path))
