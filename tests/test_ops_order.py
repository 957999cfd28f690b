"""Both contraction orders of the axial positional attention against the loop reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference import loop_positional

from gsa_flax import ops
from gsa_flax.layers import GSA

# Non-square, heads > 1; d * e small against the axes so 'auto' takes the values-first order.
B, H, W, HEADS, DK, DV = 2, 7, 10, 3, 2, 2


def _random(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize('order', ['values', 'logits', 'auto'])
@pytest.mark.parametrize('axis', [1, 2])
@pytest.mark.parametrize('rel_kind', ['local', 'global', 'oversized'])
def test_positional_orders_match_loop(order, axis, rel_kind):
  rng = np.random.default_rng()
  size = H if axis == 1 else W
  num_rel = {'local': 3, 'global': 2 * size - 1, 'oversized': 2 * size + 5}[rel_kind]
  q, v = _random(rng, B, H, W, HEADS, DK), _random(rng, B, H, W, HEADS, DV)
  rel = _random(rng, num_rel, HEADS, DK)
  got = ops.positional_attention(q, v, rel, axis=axis, order=order)
  want = loop_positional(q.astype(np.float64), v.astype(np.float64), rel.astype(np.float64), axis)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_auto_order_takes_values_first_for_these_shapes():
  q, v = jnp.zeros((B, H, W, HEADS, DK)), jnp.zeros((B, H, W, HEADS, DV))
  assert ops._values_first(q, v, 1) and ops._values_first(q, v, 2)
  # Wide per-head channels on a short axis: the weights are the smaller intermediate.
  assert not ops._values_first(jnp.zeros((1, 4, 4, 1, 8)), jnp.zeros((1, 4, 4, 1, 8)), 1)


@pytest.mark.parametrize('axis', [1, 2])
def test_values_first_gradients(axis):
  rng = np.random.default_rng()
  size = 4 if axis == 1 else 5
  with jax.enable_x64(True):
    q = jnp.asarray(rng.standard_normal((1, 4, 5, 2, DK)), jnp.float64)
    v = jnp.asarray(rng.standard_normal((1, 4, 5, 2, DV)), jnp.float64)
    rel = jnp.asarray(rng.standard_normal((2 * size - 1, 2, DK)), jnp.float64)
    check_grads(
      lambda q, v, r: ops.positional_attention(q, v, r, axis=axis, order='values'),
      (q, v, rel),
      order=1,
      modes=['fwd', 'rev'],
    )


def test_values_order_refuses_softmax():
  q, v = jnp.zeros((1, 3, 3, 1, 2)), jnp.zeros((1, 3, 3, 1, 2))
  with pytest.raises(ValueError, match='softmax'):
    ops.positional_attention(q, v, jnp.zeros((5, 1, 2)), axis=1, softmax=True, order='values')
  with pytest.raises(ValueError, match='order'):
    ops.positional_attention(q, v, jnp.zeros((5, 1, 2)), axis=1, order='sideways')


@pytest.mark.parametrize('position_embedding', ['relative', 'absolute'])
def test_gsa_layer_same_output_in_both_orders(position_embedding, monkeypatch):
  """The layer's output does not depend on which order 'auto' picks."""
  x = jnp.asarray(np.random.standard_normal((B, H, W, 5)), jnp.float32)
  module = GSA(
    HEADS * DV, num_heads=HEADS, key_features=HEADS * DK, position_embedding=position_embedding
  )
  variables = module.init(jax.random.key(np.random.randint(1 << 30)), x, train=False)
  outs = []
  for values_first in (True, False):
    monkeypatch.setattr(ops, '_values_first', lambda q, v, axis, vf=values_first: vf)
    outs.append(np.asarray(module.apply(variables, x, train=False)))
  np.testing.assert_allclose(outs[0], outs[1], rtol=2e-5, atol=2e-5)
