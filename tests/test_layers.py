"""The GSA linen layer against the per-pixel loop references, and its knobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import loop_content, loop_positional

from gsa_flax.model.layers import GSA

B, H, W, C_IN, FEATURES, HEADS = 2, 5, 7, 6, 12, 3
BN_EPS = 1e-5


def _init(module, x):
  return module.init(jax.random.key(np.random.randint(1 << 30)), x, train=False)


def _reference(variables, x, *, content=True, positional='axial', key_features=FEATURES // 2):
  """GSA from its parameters with the loop references; BN in eval mode from its stats."""
  params = variables['params']
  x = np.asarray(x, np.float64)
  qkv = x @ np.asarray(params['qkv']['kernel'], np.float64)
  dk, dv = key_features // HEADS, FEATURES // HEADS
  q = qkv[..., :key_features].reshape(B, H, W, HEADS, dk)
  k = qkv[..., key_features : 2 * key_features].reshape(B, H, W, HEADS, dk)
  v = qkv[..., 2 * key_features :].reshape(B, H, W, HEADS, dv)
  out = np.zeros_like(v)
  if content:
    out += loop_content(q, k, v, normalize_queries=False)
  if positional != 'none':
    y = loop_positional(q, v, np.asarray(params['rel_col'], np.float64), axis=1)
    if positional == 'axial':
      stats = variables['batch_stats']['bn_col']
      bn = params['bn_col']
      flat = y.reshape(B, H, W, FEATURES)
      flat = (flat - np.asarray(stats['mean'])) / np.sqrt(np.asarray(stats['var']) + BN_EPS)
      flat = flat * np.asarray(bn['scale']) + np.asarray(bn['bias'])
      y = loop_positional(
        q, flat.reshape(y.shape), np.asarray(params['rel_row'], np.float64), axis=2
      )
    out += y
  return out.reshape(B, H, W, FEATURES)


@pytest.mark.parametrize(
  'content,positional', [(True, 'axial'), (False, 'axial'), (True, 'column'), (True, 'none')]
)
def test_gsa_matches_loop_reference(content, positional):
  x = jnp.asarray(np.random.standard_normal((B, H, W, C_IN)), jnp.float32)
  module = GSA(FEATURES, num_heads=HEADS, content=content, positional=positional)
  variables = _init(module, x)
  if positional == 'axial':
    # Non-trivial BN statistics so the BN between the steps is really exercised.
    rng = np.random.default_rng(123)
    stats = variables['batch_stats']['bn_col']
    variables['batch_stats']['bn_col'] = {
      'mean': jnp.asarray(rng.standard_normal(stats['mean'].shape), jnp.float32),
      'var': jnp.asarray(rng.uniform(0.5, 2.0, stats['var'].shape), jnp.float32),
    }
  got = module.apply(variables, x, train=False)
  want = _reference(variables, x, content=content, positional=positional)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_default_shapes_global_length_and_key_width():
  x = jnp.zeros((1, H, W, C_IN))
  params = _init(GSA(FEATURES, num_heads=HEADS), x)['params']
  assert params['qkv']['kernel'].shape == (C_IN, 2 * (FEATURES // 2) + FEATURES)
  assert params['rel_col'].shape == (2 * max(H, W) - 1, HEADS, FEATURES // 2 // HEADS)
  assert params['rel_row'].shape == params['rel_col'].shape
  params = _init(GSA(FEATURES, num_heads=HEADS, key_features=9, rel_length=3), x)['params']
  assert params['rel_row'].shape == (3, HEADS, 3)


def test_global_model_applies_to_other_sizes():
  module = GSA(FEATURES, num_heads=HEADS)
  variables = _init(module, jnp.zeros((1, H, W, C_IN)))
  out = module.apply(variables, jnp.ones((2, 9, 4, C_IN)), train=False)
  assert out.shape == (2, 9, 4, FEATURES)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(num_heads=5), 'num_heads=5'),
    (dict(key_features=7), 'key_features=7'),
    (dict(content=False, positional='none'), 'computes nothing'),
    (dict(positional='row'), 'positional'),
    (dict(rel_length=4), 'rel_length'),
  ],
)
def test_bad_configuration_is_a_clear_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _init(GSA(FEATURES, **{'num_heads': HEADS, **kwargs}), jnp.zeros((1, H, W, C_IN)))


def test_ablation_knobs_change_the_output():
  x = jnp.asarray(np.random.standard_normal((B, H, W, C_IN)), jnp.float32)
  base = GSA(FEATURES, num_heads=HEADS)
  variables = _init(base, x)
  ref = base.apply(variables, x, train=False)
  for kwargs in (dict(normalize_queries=True), dict(positional_softmax=True)):
    out = GSA(FEATURES, num_heads=HEADS, **kwargs).apply(variables, x, train=False)
    assert out.shape == ref.shape and np.isfinite(np.asarray(out)).all()
    assert not np.allclose(out, ref, atol=1e-3), kwargs
  absolute = GSA(FEATURES, num_heads=HEADS, position_embedding='absolute')
  params = _init(absolute, x)['params']
  assert params['abs_col'].shape == (H, HEADS, 2) and params['abs_row'].shape == (W, HEADS, 2)


def test_bfloat16_close_to_float32():
  x = jnp.asarray(np.random.standard_normal((B, H, W, C_IN)), jnp.float32)
  variables = _init(GSA(FEATURES, num_heads=HEADS), x)
  f32 = GSA(FEATURES, num_heads=HEADS).apply(variables, x, train=False)
  bf16 = GSA(FEATURES, num_heads=HEADS, dtype=jnp.bfloat16).apply(variables, x, train=False)
  assert bf16.dtype == jnp.bfloat16
  assert jax.tree.map(lambda p: p.dtype, variables['params'])['qkv']['kernel'] == jnp.float32
  err = np.abs(np.asarray(bf16, np.float32) - np.asarray(f32)).max() / np.abs(f32).max()
  assert err < 3e-2


def test_train_mode_updates_batch_stats():
  x = jnp.asarray(np.random.standard_normal((B, H, W, C_IN)), jnp.float32)
  module = GSA(FEATURES, num_heads=HEADS)
  variables = _init(module, x)
  _, updates = module.apply(variables, x, train=True, mutable=['batch_stats'])
  before, after = variables['batch_stats']['bn_col'], updates['batch_stats']['bn_col']
  assert not np.allclose(before['mean'], after['mean'])
  assert not np.allclose(before['var'], after['var'])


def test_train_mode_running_statistics_follow_the_column_output():
  """Running averages move toward the batch statistics of the column step, as
  flax.linen.BatchNorm's do (momentum 0.9, variance E[y^2] - E[y]^2)."""
  rng = np.random.default_rng(124)
  x = jnp.asarray(rng.standard_normal((B, H, W, C_IN)), jnp.float32)
  module = GSA(FEATURES, num_heads=HEADS)
  variables = _init(module, x)
  stats = {
    'mean': jnp.asarray(rng.standard_normal(FEATURES), jnp.float32),
    'var': jnp.asarray(rng.uniform(0.5, 2.0, FEATURES), jnp.float32),
  }
  variables['batch_stats']['bn_col'] = stats
  _, updates = module.apply(variables, x, train=True, mutable=['batch_stats'])
  params = variables['params']
  qkv = np.asarray(x, np.float64) @ np.asarray(params['qkv']['kernel'], np.float64)
  dk = FEATURES // 2
  q = qkv[..., :dk].reshape(B, H, W, HEADS, dk // HEADS)
  v = qkv[..., 2 * dk :].reshape(B, H, W, HEADS, FEATURES // HEADS)
  y = loop_positional(q, v, np.asarray(params['rel_col'], np.float64), axis=1)
  y = y.reshape(-1, FEATURES)
  new = updates['batch_stats']['bn_col']
  np.testing.assert_allclose(
    new['mean'], 0.9 * np.asarray(stats['mean']) + 0.1 * y.mean(0), rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(
    new['var'], 0.9 * np.asarray(stats['var']) + 0.1 * y.var(0), rtol=1e-4, atol=1e-4
  )


def test_parameters_do_not_depend_on_the_implementation():
  x = jnp.zeros((1, H, W, C_IN))
  trees = [
    jax.eval_shape(
      lambda impl=impl: GSA(FEATURES, num_heads=HEADS, implementation=impl).init(
        jax.random.key(0), x, train=False
      )
    )
    for impl in (None, 'xla', 'pallas')
  ]
  for tree in trees[1:]:
    assert jax.tree.structure(tree) == jax.tree.structure(trees[0])
    assert jax.tree.leaves(tree) == jax.tree.leaves(trees[0])
  assert set(trees[0]['params']) == {'qkv', 'rel_col', 'rel_row', 'bn_col'}
  assert set(trees[0]['batch_stats']['bn_col']) == {'mean', 'var'}


def test_bad_implementation_is_a_clear_error():
  with pytest.raises(ValueError, match="implementation='fast'.*None.*'xla'.*'pallas'"):
    _init(GSA(FEATURES, num_heads=HEADS, implementation='fast'), jnp.zeros((1, H, W, C_IN)))
