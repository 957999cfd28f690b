"""Attention maps are the weights the model uses: every GSA output is rebuilt from them.

The rebuild takes nothing but what :func:`attention_maps.attention_maps` returns for each
pixel (content weights over the image, positional weights along the column and row) and
the module's BatchNorm, and must give the module's output.
"""

import functools

import jax
import numpy as np
import pytest
from helpers import DIGITS_IMAGE_SIZE, tiny_config

from gsa_flax.data import datasets, input_pipeline
from gsa_flax.model import networks
from gsa_flax.model.layers import GSA
from gsa_flax.tools import attention_maps
from gsa_flax.train import evaluators, steps


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


def _batch_norm(y, params, stats, eps=1e-5):
  """Inference BatchNorm over the flattened ``heads * e`` channels of ``[b, x, y, n, e]``."""
  flat = y.reshape(*y.shape[:3], -1)
  flat = (flat - stats['mean']) / np.sqrt(stats['var'] + eps) * params['scale'] + params['bias']
  return flat.reshape(y.shape)


def _rebuild(cap, stats):
  """The GSA output at every pixel of every image, from the maps of each pixel alone."""
  module, v = cap.layer.module, np.asarray(cap.v, np.float64)
  batch, height, width, heads, e = v.shape
  maps = {
    (b, x, y): attention_maps.attention_maps(cap, (x, y), index=b)
    for b in range(batch)
    for x in range(height)
    for y in range(width)
  }
  content = np.zeros(v.shape)
  column = np.zeros(v.shape)
  for (b, x, y), m in maps.items():
    if m.content is not None:  # [heads, height, width] over every pixel
      content[b, x, y] = np.einsum('nxy,xyne->ne', m.content, v[b])
    if m.column is not None:  # [heads, height] along the column of (x, y)
      column[b, x, y] = np.einsum('nz,zne->ne', m.column, v[b, :, y])
  if module.positional != 'axial':
    return (content + column).reshape(batch, height, width, -1)
  column = _batch_norm(column, cap.params['bn_col'], stats['bn_col'])
  row = np.zeros(v.shape)
  for (b, x, y), m in maps.items():  # [heads, width] along the row, over the column outputs
    row[b, x, y] = np.einsum('nz,zne->ne', m.row, column[b, x])
  return (content + row).reshape(batch, height, width, -1)


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
  (cap,) = attention_maps.capture(module, variables, x)
  assert (cap.layer.height, cap.layer.width, cap.layer.module.num_heads) == (7, 5, 3)
  got = _rebuild(cap, variables.get('batch_stats', {}))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_positional_weights_are_zero_outside_the_neighbourhood():
  module = GSA(features=4, num_heads=2, key_features=4, content=False, rel_length=5)
  x = jax.random.normal(jax.random.key(0), (1, 9, 4, 3))
  variables = _random_variables(module, x, seed=2)
  (cap,) = attention_maps.capture(module, variables, x)
  maps = attention_maps.attention_maps(cap, (6, 1))
  np.testing.assert_array_equal(maps.column_valid, [False] * 4 + [True] * 5)  # rows 4..8
  assert np.all(maps.column[:, :4] == 0)
  # Query row 6 gives row 8 (offset +2, the last of 5 embeddings) the weight q . R_col[4].
  q = np.asarray(cap.q[0, 6, 1])
  want = np.einsum('nd,nd->n', q, np.asarray(variables['params']['rel_col'][4]))
  np.testing.assert_allclose(maps.column[:, 8], want, rtol=1e-5)
  with pytest.raises(ValueError, match='outside the 9x4 map'):
    attention_maps.attention_maps(cap, query=(9, 0))


@functools.cache
def _network(model_name='gsa_resnet_tiny'):
  """The network of the tiny digits run with random variables, and a batch."""
  model = networks.build(
    networks.architecture_of(tiny_config('', model=model_name)), num_classes=10
  )
  x = jax.random.normal(jax.random.key(0), (2, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE, 3))
  return model, _random_variables(model, x, seed=3), x


def _gsa_outputs(model, variables, x):
  """Every GSA module's output by module path, captured by flax (not by the tool)."""
  _, state = jax.jit(
    functools.partial(
      model.apply,
      train=False,
      capture_intermediates=lambda m, name: isinstance(m, GSA) and name == '__call__',
      mutable=True,
    )
  )(variables, x)
  found = {}

  def walk(tree, path):
    for key, value in tree.items():
      if key == '__call__':
        found['/'.join(path)] = value[0]
      elif isinstance(value, dict):
        walk(value, (*path, key))

  walk(state['intermediates'], ())
  return found


def test_network_capture_matches_every_gsa_layer():
  """In a GSA-ResNet, every captured layer's maps rebuild that layer's output."""
  model, variables, x = _network()
  outputs = _gsa_outputs(model, variables, x)
  captures = attention_maps.capture(model, variables, x)
  assert [c.layer.path for c in captures] == list(outputs)
  assert list(outputs) == ['BottleneckBlock_0/GSA_0', 'BottleneckBlock_1/GSA_0']
  # GSA runs before the 2x2 pooling of a strided block: both at the input's 16x16.
  assert [(c.layer.height, c.layer.width, c.layer.module.features) for c in captures] == [
    (16, 16, 8),
    (16, 16, 16),
  ]
  for cap in captures:
    want = outputs[cap.layer.path]
    block, name = cap.layer.path.split('/')
    stats = variables['batch_stats'][block][name]
    # Random weights through the stem and a block grow activations to ~1e7: compare at scale.
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(_rebuild(cap, stats), want, rtol=1e-4, atol=1e-5 * scale)


def test_select_layers_and_heads():
  model, variables, x = _network()
  captures = attention_maps.capture(model, variables, x)
  chosen = attention_maps.select(captures, ['-1', 'BottleneckBlock_1/GSA_0', 0])
  assert [c.layer.path for c in chosen] == ['BottleneckBlock_1/GSA_0', 'BottleneckBlock_0/GSA_0']
  with pytest.raises(ValueError, match='has 2 heads'):
    attention_maps.select(captures, [0], head=2)
  with pytest.raises(ValueError, match="no GSA layer '5'; the network has 2"):
    attention_maps.select(captures, ['5'])
  resnet, resnet_vars, _ = _network('resnet_tiny')
  assert attention_maps.capture(resnet, resnet_vars, x) == []
  with pytest.raises(ValueError, match='no GSA layer'):
    attention_maps.select([], [0])


@pytest.mark.parametrize('model_name', ['gsa_resnet_tiny', 'resnet_tiny'])
def test_evaluator_renders_the_first_eval_images(digits_dir, model_name):
  spec = datasets.get('digits')
  model, variables, _ = _network(model_name)
  context = evaluators.Context(
    spec=spec,
    builder=input_pipeline.get_builder(spec, digits_dir, image_size=DIGITS_IMAGE_SIZE),
    model=model,
    mesh=steps.make_mesh(),
    image_size=DIGITS_IMAGE_SIZE,
    eval_batch_size=16,
  )
  results = attention_maps.AttentionMapEvaluator(context, count=2).run(variables)
  if model_name == 'resnet_tiny':
    assert results == {}  # no GSA layers: nothing drawn, nothing fails
    return
  images = results['attention_maps']
  assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[0] == 2
  assert images.shape[-1] == 3 and images.std() > 0
