"""Both contraction orders of the einsum positional attention against the loop reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference import loop_positional

from gsa_flax.model import ops
from gsa_flax.model.layers import GSA

# Non-square, heads > 1; d * e small against the axes so 'auto' takes the values-first order.
B, H, W, HEADS, DK, DV = 2, 7, 10, 3, 2, 2


def _random(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def _intermediate_shapes(fn, *args):
  """Shapes of every array an equation produces, nested jaxprs included."""
  shapes = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      shapes.update(tuple(var.aval.shape) for var in eqn.outvars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, tuple | list) else (param,):
          inner = getattr(sub, 'jaxpr', sub)
          if hasattr(inner, 'eqns'):
            visit(inner)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


def _forms(shapes, shape):
  """Whether some intermediate holds ``shape``'s axes in any order."""
  return any(sorted(s) == sorted(shape) for s in shapes)


@pytest.mark.parametrize('order', ['values', 'logits', 'auto'])
@pytest.mark.parametrize('axis', [1, 2])
@pytest.mark.parametrize('rel_kind', ['local', 'global', 'oversized'])
def test_positional_orders_match_loop(order, axis, rel_kind):
  rng = np.random.default_rng(135)
  size = H if axis == 1 else W
  num_rel = {'local': 3, 'global': 2 * size - 1, 'oversized': 2 * size + 5}[rel_kind]
  q, v = _random(rng, B, H, W, HEADS, DK), _random(rng, B, H, W, HEADS, DV)
  rel = _random(rng, num_rel, HEADS, DK)
  got = ops.positional_attention(q, v, rel, axis=axis, order=order, implementation='xla')
  want = loop_positional(q.astype(np.float64), v.astype(np.float64), rel.astype(np.float64), axis)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('axis', [1, 2])
def test_auto_order_forms_the_cheaper_intermediate(axis):
  """'auto' builds the per-pixel [d, e] contexts here (d * e small against the axis) and
  the per-pixel weights when the channels are wide and the axis short."""
  size = H if axis == 1 else W
  context = (B, H, W, HEADS, DK, DV)  # values first: a [d, e] context per pixel and head
  weights = (B, W if axis == 1 else H, HEADS, size, size)  # logits first: [query, key]

  def shapes(order, q, v, rel):
    return _intermediate_shapes(
      lambda q, v, rel: ops.positional_attention(
        q, v, rel, axis=axis, order=order, implementation='xla'
      ),
      q,
      v,
      rel,
    )

  q, v = jnp.zeros((B, H, W, HEADS, DK)), jnp.zeros((B, H, W, HEADS, DV))
  rel = jnp.zeros((2 * size - 1, HEADS, DK))
  auto, values, logits = (shapes(order, q, v, rel) for order in ('auto', 'values', 'logits'))
  # The shape checks tell the two orders apart...
  assert _forms(values, context) and not _forms(values, weights)
  assert _forms(logits, weights) and not _forms(logits, context)
  # ... and 'auto' takes the values-first order for these shapes,
  assert _forms(auto, context) and not _forms(auto, weights)
  # but the logits-first order for wide per-head channels on a short axis.
  wide_q, wide_v = jnp.zeros((1, 4, 4, 1, 8)), jnp.zeros((1, 4, 4, 1, 8))
  wide = shapes('auto', wide_q, wide_v, jnp.zeros((7, 1, 8)))
  assert _forms(wide, (1, 4, 1, 4, 4)) and not _forms(wide, (1, 4, 4, 1, 8, 8))


@pytest.mark.parametrize('axis', [1, 2])
def test_values_first_gradients(axis):
  rng = np.random.default_rng(136)
  size = 4 if axis == 1 else 5
  with jax.enable_x64(True):
    q = jnp.asarray(rng.standard_normal((1, 4, 5, 2, DK)), jnp.float64)
    v = jnp.asarray(rng.standard_normal((1, 4, 5, 2, DV)), jnp.float64)
    rel = jnp.asarray(rng.standard_normal((2 * size - 1, 2, DK)), jnp.float64)
    check_grads(
      lambda q, v, r: ops.positional_attention(
        q, v, r, axis=axis, order='values', implementation='xla'
      ),
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
def test_gsa_layer_same_output_in_both_orders(position_embedding):
  """The layer's output does not depend on the contraction order."""
  x = jnp.asarray(np.random.standard_normal((B, H, W, 5)), jnp.float32)
  module = GSA(
    HEADS * DV,
    num_heads=HEADS,
    key_features=HEADS * DK,
    position_embedding=position_embedding,
    implementation='xla',
  )
  variables = module.init(jax.random.key(np.random.randint(1 << 30)), x, train=False)
  outs = [
    np.asarray(module.clone(order=order).apply(variables, x, train=False))
    for order in ('values', 'logits')
  ]
  np.testing.assert_allclose(outs[0], outs[1], rtol=2e-5, atol=2e-5)
