"""The GSA ops against direct per-pixel loops in float64 numpy (independent references)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference import loop_content as _loop_content
from reference import loop_positional as _loop_positional

from gsa_flax.model import ops

# Non-square maps and heads > 1 catch transposed einsums.
B, H, W, HEADS, DK, DV = 2, 5, 7, 3, 4, 6


def _random(rng, *shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize('normalize_queries', [False, True])
def test_content_attention_matches_loop(normalize_queries):
  rng = np.random.default_rng(129)
  q, k, v = (
    _random(rng, B, H, W, HEADS, DK),
    _random(rng, B, H, W, HEADS, DK, scale=3.0),
    _random(rng, B, H, W, HEADS, DV),
  )
  got = ops.content_attention(q, k, v, normalize_queries=normalize_queries)
  want = _loop_content(
    q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), normalize_queries
  )
  assert got.shape == (B, H, W, HEADS, DV)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_content_attention_stable_for_large_logits():
  rng = np.random.default_rng(130)
  q, v = _random(rng, 1, H, W, 2, DK), _random(rng, 1, H, W, 2, DV)
  k = _random(rng, 1, H, W, 2, DK, scale=1.0) + 1000.0  # exp would overflow without the max shift
  got = np.asarray(ops.content_attention(q, k, v))
  assert np.isfinite(got).all()
  want = _loop_content(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('axis', [1, 2])
@pytest.mark.parametrize('rel_kind', ['local', 'global', 'oversized'])
def test_positional_attention_matches_loop(axis, rel_kind):
  rng = np.random.default_rng(131)
  size = H if axis == 1 else W
  num_rel = {'local': 3, 'global': 2 * size - 1, 'oversized': 2 * size + 5}[rel_kind]
  q, v = _random(rng, B, H, W, HEADS, DK), _random(rng, B, H, W, HEADS, DV)
  rel = _random(rng, num_rel, HEADS, DK)
  got = ops.positional_attention(q, v, rel, axis=axis)
  want = _loop_positional(q.astype(np.float64), v.astype(np.float64), rel.astype(np.float64), axis)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('axis', [1, 2])
def test_positional_softmax_matches_loop(axis):
  rng = np.random.default_rng(132)
  q, v = _random(rng, B, H, W, HEADS, DK), _random(rng, B, H, W, HEADS, DV)
  rel = _random(rng, 5, HEADS, DK)  # local: masked keys must get no weight
  got = ops.positional_attention(q, v, rel, axis=axis, softmax=True)
  want = _loop_positional(
    q.astype(np.float64), v.astype(np.float64), rel.astype(np.float64), axis, softmax=True
  )
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_positional_sums_over_other_positions():
  """A branch that only rescales v at the query's own position would fail this."""
  q = jnp.ones((1, 4, 3, 1, 2))
  v = jnp.zeros((1, 4, 3, 1, 1)).at[0, 3, 1, 0, 0].set(1.0)  # one hot value at row 3
  rel = jnp.ones((7, 1, 2))
  out = ops.positional_attention(q, v, rel, axis=1)
  # Every row of column 1 sees the value at row 3, weight q.rel = 2; other columns see none.
  np.testing.assert_allclose(out[0, :, 1, 0, 0], [2.0, 2.0, 2.0, 2.0])
  np.testing.assert_allclose(out[0, :, 0, 0, 0], 0.0)


def test_even_rel_length_is_rejected():
  with pytest.raises(ValueError, match='odd'):
    ops.positional_attention(
      jnp.ones((1, 3, 3, 1, 2)), jnp.ones((1, 3, 3, 1, 2)), jnp.ones((4, 1, 2)), axis=1
    )


def test_gradients():
  rng = np.random.default_rng(133)
  with jax.enable_x64(True):
    q, k, v = (rng.standard_normal((1, 3, 4, 2, 2)) for _ in range(3))
    rel = rng.standard_normal((5, 2, 2))
    for normalize in (False, True):
      check_grads(
        functools.partial(ops.content_attention, normalize_queries=normalize),
        (q, k, v),
        order=2,
        modes=['rev'],
      )
    for axis, softmax in itertools.product((1, 2), (False, True)):
      check_grads(
        functools.partial(ops.positional_attention, axis=axis, softmax=softmax),
        (q, v, rel),
        order=1,
        modes=['fwd', 'rev'],
      )


def _max_intermediate_size(fn, *args):
  """Largest array (in elements) produced by any equation, nested jaxprs included."""
  sizes = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      sizes.extend(int(np.prod(var.aval.shape)) for var in eqn.outvars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(sub, 'eqns'):
            visit(sub)
          elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
            visit(sub.jaxpr)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return max(sizes)


def _full_attention(q, k, v):
  logits = jnp.einsum('bxynd,bzwnd->bxynzw', q, k)
  shape = logits.shape
  weights = jax.nn.softmax(logits.reshape(*shape[:4], -1), axis=-1).reshape(shape)
  return jnp.einsum('bxynzw,bzwne->bxyne', weights, v)


def test_no_quadratic_intermediates():
  """No array of (H*W)^2 elements appears in the forward or backward computation."""
  h, w = 5, 7
  quadratic = (h * w) ** 2
  q = jnp.ones((1, h, w, 2, 3))
  v = jnp.ones((1, h, w, 2, 3))
  rel = jnp.ones((2 * w - 1, 2, 3))

  def gsa_like(q, k, v, rel):
    # The einsum ops (the Pallas kernels keep per-line tiles padded to the vector width).
    col = ops.positional_attention(q, v, rel, axis=1, implementation='xla')
    row = ops.positional_attention(q, col, rel, axis=2, implementation='xla')
    return (ops.content_attention(q, k, v) + row).sum()

  fwd_bwd = jax.grad(gsa_like, argnums=(0, 1, 2, 3))
  assert _max_intermediate_size(fwd_bwd, q, q, v, rel) < quadratic
  # The checker itself must catch a quadratic implementation.
  assert (
    _max_intermediate_size(jax.grad(lambda q, k, v: _full_attention(q, k, v).sum()), q, q, v)
    >= quadratic
  )


def test_content_attention_is_permutation_equivariant():
  rng = np.random.default_rng(134)
  q, k, v = _random(rng, 1, H, W, 2, DK), _random(rng, 1, H, W, 2, DK), _random(rng, 1, H, W, 2, DV)
  perm = rng.permutation(H * W)

  def permute(a):
    flat = a.reshape(a.shape[0], H * W, *a.shape[3:])
    return flat[:, perm].reshape(a.shape)

  out = ops.content_attention(q, k, v)
  out_of_permuted = ops.content_attention(permute(q), permute(k), permute(v))
  np.testing.assert_allclose(
    np.asarray(out_of_permuted), permute(np.asarray(out)), rtol=1e-5, atol=1e-5
  )
