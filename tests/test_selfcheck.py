"""The self-check: a network's distinct GSA geometries, the kernels (in the Pallas
interpreter here) passing against the einsum ops, and a wrong kernel caught with one line."""

import jax.numpy as jnp
import pytest

from gsa_flax.model import networks, selfcheck
from gsa_flax.model.layers import GSA, GSAOptions


def test_the_distinct_geometries_of_gsa_resnet50_are_its_stages():
  """At 224: the first block of each stage (at the previous stage's resolution, its own
  width) and the rest of the stage (56/28/14/7), 8 heads, d_k = d_out / 2; shapes only."""
  model = networks.create_model('gsa_resnet50', num_classes=10, dtype=jnp.bfloat16)
  layers = selfcheck.gsa_layers(model, 224, batch=2)
  got = [(layer.input_shape, layer.module.features, layer.module.num_heads) for layer in layers]
  assert got == [
    ((2, 56, 56, 64), 64, 8),
    ((2, 56, 56, 128), 128, 8),
    ((2, 28, 28, 128), 128, 8),
    ((2, 28, 28, 256), 256, 8),
    ((2, 14, 14, 256), 256, 8),
    ((2, 14, 14, 512), 512, 8),
    ((2, 7, 7, 512), 512, 8),
  ]
  assert all(layer.module.dtype == jnp.bfloat16 for layer in layers)
  assert (
    layers[0].describe() == 'BottleneckBlock_0/GSA_0 (56x56, 64 -> 64 channels, 8 heads, d_k 32)'
  )


def test_layers_without_a_kernel_are_not_checked():
  gsa = GSAOptions(num_heads=4, position_embedding='absolute')
  model = networks.create_model('gsa_resnet_tiny', num_classes=10, gsa=gsa)
  assert selfcheck.gsa_layers(model, 16) == []


def _layer(dtype=jnp.float32):
  # Non-square, heads > 1, d_k != d_v: a transposed axis or channel is an error.
  module = GSA(12, num_heads=2, key_features=8, dtype=dtype)
  return selfcheck.Layer('block/gsa', module, (2, 4, 6, 5), jnp.dtype(dtype))


# float32: tests/tools/test_selfcheck_tool.py (the default config) passes in float32.
@pytest.mark.parametrize('dtype', [jnp.bfloat16])
def test_the_kernels_pass(dtype):
  result = selfcheck.check_layer(_layer(dtype), implementation='pallas')
  assert result.ok, result.errors
  assert set(result.errors) == {
    'train output',
    'eval output',
    'parameter gradients',
    'input gradient',
  }
  assert result.tolerance == selfcheck.TOLERANCE[jnp.dtype(dtype).name]
  assert max(result.errors.values()) < result.tolerance / 5


def test_a_wrong_kernel_is_caught_with_the_layer_and_the_fix():
  """A kernel path that computes another attention (its content branch normalises the
  queries: the candidate seam) fails by far more than the tolerance, and stops the run
  with one line naming the layer and the fix."""
  wrong = lambda m: m.clone(implementation='pallas', normalize_queries=True)  # noqa: E731
  model = GSA(12, num_heads=2, key_features=8)
  results = selfcheck.check(model, 6, batch=2, candidate=wrong)
  assert len(results) == 1 and not results[0].ok
  assert results[0].worst[1] > 10 * results[0].tolerance
  message = selfcheck.failure(results)
  assert '\n' not in message
  assert 'layer gsa (6x6, 3 -> 12 channels, 2 heads, d_k 8)' in message
  assert message.endswith('--config.gsa.implementation=xla')
