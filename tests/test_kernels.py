"""The Pallas kernels against the float64 loop references and the einsum ops.

On CPU the kernels run in the Pallas interpreter; both backends' kernels (Mosaic for TPU,
Triton for NVIDIA GPUs) are checked, in values and gradients. The dispatch is checked by
lowering: ``implementation=None`` takes the einsum ops on CPU and the Mosaic kernels when
the same code is compiled for a TPU (a real deviceless compile).
"""

import os

# Compiling for a TPU topology loads libtpu, which takes a lock unless this is set; other
# processes (pytest-xdist workers) may load it at the same time.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')

import collections  # noqa: E402
import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import compile_gsa_layer  # noqa: E402
from reference import loop_content, loop_positional  # noqa: E402

from gsa_flax.model import dispatch, ops  # noqa: E402
from gsa_flax.model.kernels import axial_tpu, costs, gsa, layout, positional  # noqa: E402
from gsa_flax.model.layers import GSA  # noqa: E402
from gsa_flax.tools.sizing import aot, hlo, traffic  # noqa: E402

# Non-square maps, heads > 1, d != e: transposed axes or channels show up as errors.
B, H, W, HEADS, D, E = 2, 5, 7, 2, 2, 3
RTOL = 1e-4


def _random(rng, *shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _rel_length(kind, size):
  return {'local': 3, 'global': 2 * size - 1, 'oversized': 2 * size + 5}[kind]


def _close(got, want, rtol=RTOL):
  """Equal up to ``rtol`` of the reference's largest magnitude."""
  want = np.asarray(want, np.float64)
  scale = max(np.abs(want).max(), 1e-6)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=rtol * scale)


def _vjp(fn, args, cotangent):
  out, pullback = jax.vjp(fn, *args)
  return out, pullback(cotangent)


# ------------------------------------------------------------------------ positional kernel


@pytest.mark.parametrize(
  'backend,axis,rel_kind,softmax',
  [
    ('mosaic', 1, 'local', False),
    ('mosaic', 2, 'global', False),
    ('mosaic', 1, 'oversized', True),
    ('mosaic', 2, 'local', True),
    ('triton', 1, 'global', True),
    ('triton', 2, 'oversized', False),
    ('triton', 1, 'local', False),
  ],
)
def test_positional_kernel_matches_loop_and_einsum_gradients(backend, axis, rel_kind, softmax):
  rng = np.random.default_rng(1)
  size = H if axis == 1 else W
  q, v = _random(rng, B, H, W, HEADS, D), _random(rng, B, H, W, HEADS, E)
  rel = _random(rng, _rel_length(rel_kind, size), HEADS, D)
  g = _random(rng, B, H, W, HEADS, E)

  def kernel(q, v, rel):
    return positional.positional_attention(
      q, v, rel, axis=axis, softmax=softmax, backend=backend, interpret=True
    )

  def einsum(q, v, rel):
    return ops.positional_attention(q, v, rel, axis=axis, softmax=softmax, implementation='xla')

  out, grads = jax.jit(lambda *a: _vjp(kernel, a, g))(q, v, rel)
  want = loop_positional(*(a.astype(np.float64) for a in (q, v, rel)), axis, softmax=softmax)
  _close(out, want)
  _, want_grads = _vjp(einsum, (q, v, rel), g)
  for got_grad, want_grad in zip(grads, want_grads, strict=True):
    _close(got_grad, want_grad)


@pytest.mark.parametrize('backend', ['mosaic', 'triton'])
def test_positional_kernel_bfloat16(backend):
  """bfloat16 operands, float32 accumulation: close to the loop on the rounded inputs."""
  rng = np.random.default_rng(2)
  q = jnp.asarray(_random(rng, B, H, W, HEADS, D), jnp.bfloat16)
  v = jnp.asarray(_random(rng, B, H, W, HEADS, E), jnp.bfloat16)
  rel = jnp.asarray(_random(rng, 2 * W - 1, HEADS, D), jnp.bfloat16)
  out = positional.positional_attention(q, v, rel, axis=2, backend=backend, interpret=True)
  assert out.dtype == jnp.bfloat16
  want = loop_positional(*(np.asarray(a, np.float64) for a in (q, v, rel)), 2)
  _close(out, want, rtol=2e-2)


def test_positional_kernel_rejects_bad_arguments():
  q, v = jnp.zeros((1, 3, 4, 2, 2)), jnp.zeros((1, 3, 4, 2, 3))
  with pytest.raises(ValueError, match='odd'):
    positional.positional_attention(q, v, jnp.zeros((4, 2, 2)), axis=1, interpret=True)
  with pytest.raises(ValueError, match='backend'):
    positional.positional_attention(q, v, jnp.zeros((5, 2, 2)), axis=1, backend='cuda')


# ---------------------------------------------------------------------- fused GSA attention


def _loop_gsa(qkv, rel_col, rel_row, scale, bias, mean, var, *, train, content, normalize,
              softmax, eps=1e-5):  # fmt: skip
  """float64 loops: content + row(BN(column)), the BatchNorm as flax.linen.BatchNorm."""
  qkv, rel_col, rel_row = (np.asarray(a, np.float64) for a in (qkv, rel_col, rel_row))
  b, h, w, _ = qkv.shape
  q = qkv[..., : HEADS * D].reshape(b, h, w, HEADS, D)
  k = qkv[..., HEADS * D : 2 * HEADS * D].reshape(b, h, w, HEADS, D)
  v = qkv[..., 2 * HEADS * D :].reshape(b, h, w, HEADS, E)
  y = loop_positional(q, v, rel_col, 1, softmax=softmax).reshape(b, h, w, HEADS * E)
  if train:
    mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
  normed = (y - mean) / np.sqrt(np.asarray(var, np.float64) + eps) * scale + bias
  out = loop_positional(q, normed.reshape(v.shape), rel_row, 2, softmax=softmax)
  if content:
    out = out + loop_content(q, k, v, normalize)
  return out.reshape(b, h, w, HEADS * E), mean, var


@pytest.mark.parametrize(
  'backend,train,content,normalize,softmax,rel_kinds',
  [
    ('mosaic', True, True, False, False, ('global', 'global')),
    ('mosaic', False, True, True, True, ('local', 'oversized')),
    ('triton', True, True, True, False, ('oversized', 'local')),
    ('triton', False, False, False, True, ('global', 'global')),
  ],
)
def test_gsa_kernels_match_loop_and_einsum_gradients(
  backend, train, content, normalize, softmax, rel_kinds
):
  rng = np.random.default_rng(3)
  qkv = _random(rng, B, H, W, HEADS * (2 * D + E))
  rel_col = _random(rng, _rel_length(rel_kinds[0], H), HEADS, D)
  rel_row = _random(rng, _rel_length(rel_kinds[1], W), HEADS, D)
  scale = rng.uniform(0.5, 1.5, HEADS * E).astype(np.float32)
  bias, mean = _random(rng, HEADS * E), _random(rng, HEADS * E)
  var = rng.uniform(0.5, 2.0, HEADS * E).astype(np.float32)
  args = (qkv, rel_col, rel_row, scale, bias, mean, var)
  g = _random(rng, B, H, W, HEADS * E)
  config = gsa.Config(
    HEADS, HEADS * D, train, content=content, normalize_queries=normalize, softmax=softmax,
    backend=backend, interpret=True,
  )  # fmt: skip

  def kernel(*args):
    return gsa.gsa_attention(*args, config)

  def einsum(*args):
    return ops.gsa_attention(
      *args, num_heads=HEADS, key_features=HEADS * D, train=train, content=content,
      normalize_queries=normalize, softmax=softmax, implementation='xla',
    )  # fmt: skip

  def values_and_grads(*args):
    (out, mean, var), pullback = jax.vjp(kernel, *args)
    return out, mean, var, pullback((g, jnp.zeros_like(mean), jnp.zeros_like(var)))

  out, got_mean, got_var, grads = jax.jit(values_and_grads)(*args)
  want, want_mean, want_var = _loop_gsa(
    *args, train=train, content=content, normalize=normalize, softmax=softmax
  )
  _close(out, want)
  _close(got_mean, want_mean)
  _close(got_var, want_var)
  _, want_grads = _vjp(lambda *b: einsum(*b)[0], args, g)
  for got_grad, want_grad in zip(grads, want_grads, strict=True):
    _close(got_grad, want_grad)


# GSA-ResNet-50's geometries (8 heads, d_k = d_out / 2) in bfloat16, as a run trains: each
# case reaches a path the small shapes above do not. Interpreted on CPU, ~35 s together.
REAL_CASES = [
  # Stage 1 (56x56, d_k 32, d_v 64): 56 lines are 4 Triton programs per image, whose
  # content-attention partials are merged across programs.
  pytest.param('triton', (1, 56, 56, 32, 64), id='stage1-56x56-triton-4-programs'),
  # Stage 2 (28x28, d_k 64, d_v 128): 2 programs per image.
  pytest.param('triton', (1, 28, 28, 64, 128), id='stage2-28x28-triton-2-programs'),
  # Stage 3's widths (d_k 128, d_v 256) on a non-square map: 20 lines are 2 programs.
  pytest.param('triton', (2, 14, 20, 128, 256), id='stage3-14x20-triton-nonsquare'),
  # Stage 4 (7x7, d_k 256, d_v 512): 1024 channels, 8 lane tiles of 128 on a TPU.
  pytest.param('mosaic', (2, 7, 7, 256, 512), id='stage4-7x7-mosaic-1024-channels'),
]
BF16_RTOL = 2e-2  # measured: ~6e-3 for values and gradients at these shapes


@pytest.mark.parametrize('backend, shape', REAL_CASES)
def test_gsa_kernels_in_bfloat16_at_the_real_geometries(backend, shape):
  """bfloat16 values and gradients of the fused kernels against the float32 einsum ops on
  the same (rounded) inputs, within BF16_RTOL of the largest magnitude."""
  batch, h, w, dk, dv = shape
  heads = 8
  rng = np.random.default_rng(sum(shape))
  qkv = jnp.asarray(_random(rng, batch, h, w, 2 * dk + dv), jnp.bfloat16)
  scale = (dk // heads) ** -0.5  # the layer's initialisation of the embeddings
  rel_col = jnp.asarray(_random(rng, 2 * h - 1, heads, dk // heads, scale=scale), jnp.bfloat16)
  rel_row = jnp.asarray(_random(rng, 2 * w - 1, heads, dk // heads, scale=scale), jnp.bfloat16)
  bn = (rng.uniform(0.5, 1.5, dv), _random(rng, dv), _random(rng, dv), rng.uniform(0.5, 2, dv))
  args = (qkv, rel_col, rel_row, *(jnp.asarray(a, jnp.float32) for a in bn))
  g = _random(rng, batch, h, w, dv)
  config = gsa.Config(heads, dk, train=True, backend=backend, interpret=True)

  def values_and_grads(fn, *args):
    (out, mean, var), pullback = jax.vjp(fn, *args)
    cotangent = (jnp.asarray(g, out.dtype), jnp.zeros_like(mean), jnp.zeros_like(var))
    return out, pullback(cotangent)

  out, grads = jax.jit(lambda *a: values_and_grads(lambda *x: gsa.gsa_attention(*x, config), *a))(
    *args
  )
  assert out.dtype == grads[0].dtype == jnp.bfloat16

  def einsum(*x):
    return ops.gsa_attention(*x, num_heads=heads, key_features=dk, train=True, implementation='xla')

  with jax.default_matmul_precision('float32'):
    want, want_grads = jax.jit(lambda *a: values_and_grads(einsum, *a))(
      *(jnp.asarray(a, jnp.float32) for a in args)
    )
  _close(out, want, rtol=BF16_RTOL)
  for got_grad, want_grad in zip(grads[:3], want_grads[:3], strict=True):
    _close(got_grad, want_grad, rtol=BF16_RTOL)


def test_layer_pallas_equals_xla():
  """GSA with the kernels: same output, running statistics and gradients as the einsums."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(_random(rng, B, H, W, 5))
  module = GSA(HEADS * E, num_heads=HEADS, key_features=HEADS * D)
  variables = module.init(jax.random.key(int(rng.integers(1 << 30))), x, train=False)
  g = _random(rng, B, H, W, HEADS * E)

  def run(implementation):
    layer = module.clone(implementation=implementation)

    def loss(params, x):
      out, updates = layer.apply(
        {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
      )
      return jnp.sum(out * g), (out, updates)

    grads, (out, updates) = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables['params'], x)
    return out, updates, grads

  got, want = run('pallas'), run('xla')
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    _close(a, b)
  assert jax.tree.structure(got) == jax.tree.structure(want)


@pytest.mark.parametrize('axis_type', ['Explicit', 'Auto'])
def test_kernels_run_per_device_under_a_sharded_jit(axis_type):
  """Batch sharded over the 8 CPU devices: every device runs the kernels on its own images
  (a shard_map over the mesh, whether its axes are Explicit or Auto), no gathers."""
  devices = jax.devices()
  mesh = jax.make_mesh(
    (len(devices),), ('data',), (getattr(jax.sharding.AxisType, axis_type),), devices=devices
  )
  rng = np.random.default_rng(5)
  batch = len(devices)
  q, v = _random(rng, batch, H, W, HEADS, D), _random(rng, batch, H, W, HEADS, E)
  rel, g = _random(rng, 2 * H - 1, HEADS, D), _random(rng, batch, H, W, HEADS, E)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def kernel(q, v, rel):
    return positional.positional_attention(q, v, rel, axis=1, backend='mosaic', interpret=True)

  step = jax.jit(lambda *a: _vjp(kernel, a[:3], a[3]), in_shardings=(split, split, whole, split))
  args = (q, v, rel, g)
  assert 'all-gather' not in step.lower(*args).compile().as_text()
  out, grads = step(*args)
  want, want_grads = _vjp(
    lambda *a: ops.positional_attention(*a, axis=1, implementation='xla'), (q, v, rel), g
  )
  _close(out, want)
  for got_grad, want_grad in zip(grads, want_grads, strict=True):
    _close(got_grad, want_grad)


# --------------------------------------------------------------------------- HBM traffic


def test_hbm_bytes_closed_form():
  """What every program copies in and out, counted by hand for one shape."""
  b, h, w, n, d, e, length = 3, 8, 6, 2, 4, 8, 11
  q = jax.ShapeDtypeStruct((b, h, w, n, d), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((b, h, w, n, e), jnp.bfloat16)
  rel = jax.ShapeDtypeStruct((length, n, d), jnp.float32)
  dk, dv, pixels = n * d, n * e, h * w
  used = min(length, (length - 1) // 2 + h)  # offsets a column of 8 can use: all 11
  # TPU: one program per image reads its queries, values and the [n*d, 128] offset rows
  # (bfloat16) and writes the output; the backward also reads the output gradient and
  # writes both input gradients and its float32 [n*d, 128] embedding-gradient partial.
  # Blocks move in HBM's tiles of 128 lanes: 8 or 16 channels move as 128.
  lanes = 128
  mosaic = positional.hbm_bytes(q, v, rel, axis=1, backend='mosaic')
  assert mosaic['forward'] == b * (3 * 2 * pixels * lanes + 2 * dk * lanes)
  assert mosaic['backward'] == b * (5 * 2 * pixels * lanes + 2 * dk * lanes + 4 * dk * lanes)
  # GPU: one program per image and group of 6 columns (all of them here), offset rows
  # [n*d, used] in bfloat16, embedding-gradient partial [n*d, used] in float32, elements
  # without padding.
  triton = positional.hbm_bytes(q, v, rel, axis=1, backend='triton')
  assert triton['forward'] == b * (2 * pixels * (dk + 2 * dv) + 2 * dk * used)
  assert triton['backward'] == b * (2 * pixels * (2 * dk + 3 * dv) + 6 * dk * used)


def test_gsa_hbm_bytes_closed_form():
  """The four fused passes on TPU, one program per image, blocks counted by hand in HBM's
  tiles (128 lanes; fewer than 8 rows take a tile of their own height)."""
  b, h, w, n, d, e = 2, 8, 6, 2, 4, 8
  dk, pixels, lanes = n * d, h * w, 128
  qkv = jax.ShapeDtypeStruct((b, h, w, n * (2 * d + e)), jnp.bfloat16)
  rel_col = jax.ShapeDtypeStruct((2 * h - 1, n, d), jnp.float32)
  rel_row = jax.ShapeDtypeStruct((2 * w - 1, n, d), jnp.float32)
  traffic = gsa.hbm_bytes(qkv, rel_col, rel_row, gsa.Config(n, dk, train=True, backend='mosaic'))
  image = 2 * pixels * lanes  # one bfloat16 array of an image (32, 16 or 8 channels)
  rows = 2 * dk * lanes  # the relative rows, bfloat16, 128 offset lanes
  f32 = 4 * lanes  # one float32 row of per-channel values
  # Column pass: qkv and the rows in; y, its sums [2, d_v], the key-softmax partials
  # [1, d_k] twice and the context [d_k, d_v] out.
  column = 2 * image + rows + f32 * (2 + 1 + 1 + dk)
  # Row pass: qkv, the rows, y, the BatchNorm affine [2, d_v] and the context in; the out.
  row = 3 * image + rows + f32 * (2 + dk)
  assert traffic['forward'] == b * (column + row)
  # Row gradient: qkv, rows, the column step's rows (y is recomputed on chip, not read),
  # output gradient, affine, context in; the embedding gradient [d_k, 128] (float32), the
  # query gradient and y's gradient packed in one array, its sums and the context's
  # gradient out.
  row_grad = 3 * image + 2 * rows + f32 * (2 + dk + dk + 2 + dk)
  # Column gradient: qkv, rows, the packed query and y gradients, the BatchNorm backward's
  # coefficients [3, d_v] (y recomputed), key statistics [3, d_k] and the context's
  # gradient in; the embedding gradient and the gradient of qkv out.
  column_grad = 3 * image + rows + f32 * (3 + 3 + dk + dk)
  assert traffic['backward'] == b * (row_grad + column_grad)


# ----------------------------------------------------------------------------- kernel costs


@pytest.mark.parametrize(
  'call',
  [
    layout.KernelCall(layout.AxialStep(1, 56, 28, 8, 32, 64, 111), False, 0, 32, 64),
    layout.KernelCall(
      layout.AxialStep(2, 7, 9, 4, 16, 8, 13, softmax=True),
      True,
      0,
      16,
      None,
      frozenset({'vals', 'affine', 'context', 'normalize_queries', 'bn_sums', 'packed'}),
    ),
  ],
)
def test_a_kernel_call_is_read_back_from_its_name(call):
  assert layout.KernelCall.parse(call.name) == call
  # As a compiled program shows it: an instruction name, or inside an op name.
  assert layout.KernelCall.parse(f'{call.name}.3') == call
  assert layout.KernelCall.parse(f'jit(step)/transpose(jvp(GSA))/{call.name}/pallas_call') == call


def test_a_name_that_spells_no_kernel_call_is_refused():
  assert layout.KernelCall.parse('pallas_call.16') is None
  assert layout.KernelCall.parse('gsa_axial1_fwd_8x6_n2_dk8_dv16_L15_q0_bogus') is None
  call = hlo.CustomCall('pallas_call.3', 'tpu_custom_call', 'jit(f)/double/pallas_call', (), ())
  with pytest.raises(ValueError, match='names no GSA kernel call'):
    costs.price(call)


def _in_hbm(call: hlo.CustomCall) -> hlo.CustomCall:
  """The call with every operand and result in HBM (none kept on chip)."""
  return dataclasses.replace(
    call,
    operands=tuple(a._replace(memory_space=0) for a in call.operands),
    results=tuple(a._replace(memory_space=0) for a in call.results),
  )


@pytest.mark.parametrize('target_name, backend', [('tpu-v5e:2x2', 'mosaic'), ('h100', 'triton')])
def test_costs_of_a_compiled_layer_are_the_kernels_grid_traffic(target_name, backend):
  """A GSA layer's forward + backward compiled for a TPU slice (batch split over its 4 chips)
  or an H100: its four kernel calls are priced, at the bytes of the kernels' own closed
  form for one chip's share of the batch."""
  target = aot.get_target(target_name)
  batch, h, w, heads, dk, dv = 2, 10, 6, 2, 8, 16  # rows of 10: the kernels (SHORT_LINE)
  compiled = compile_gsa_layer(
    target, batch=batch, height=h, width=w, heads=heads, key_dim=dk, value_dim=dv
  )
  analysis = aot.analyze(compiled)
  assert analysis.unpriced_custom_calls == ()
  calls = traffic.custom_calls(compiled.as_text())
  kernels = [c for c in calls if layout.KernelCall.parse(c.name + c.op_name)]
  assert len(kernels) == 4
  qkv = jax.ShapeDtypeStruct((batch, h, w, 2 * dk + dv), jnp.bfloat16)
  rel_col = jax.ShapeDtypeStruct((2 * h - 1, heads, dk // heads), jnp.float32)
  rel_row = jax.ShapeDtypeStruct((2 * w - 1, heads, dk // heads), jnp.float32)
  config = gsa.Config(heads, dk, train=True, backend=backend)
  want = sum(gsa.hbm_bytes(qkv, rel_col, rel_row, config).values())
  assert sum(costs.price(_in_hbm(c)).bytes_accessed for c in kernels) == want
  # The estimate charges what the calls move in HBM: buffers kept on chip move nothing.
  priced = sum(costs.price(c).bytes_accessed for c in kernels)
  charged = sum(
    r.hbm_bytes
    for r in traffic.traffic_by_instruction(compiled.as_text())
    if r.opcode == 'custom-call' and layout.KernelCall.parse(r.name + r.op_name)
  )
  assert charged == priced <= want


def _dot_flops_and_exps(jaxpr, times=1):
  """FLOPs of the dot_generals (2 x output elements x contraction) and the exponentials of
  a jaxpr, loops counted by their trip counts."""
  flops = exps = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      flops += times * 2 * int(np.prod(out)) * int(np.prod([lhs[i] for i in contract]))
    elif eqn.primitive.name == 'exp':
      exps += times * int(np.prod(eqn.outvars[0].aval.shape))
    repeat = times * eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else times
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          f, e = _dot_flops_and_exps(inner, repeat)
          flops, exps = flops + f, exps + e
  return flops, exps


@pytest.mark.parametrize('softmax', [False, True])
def test_tpu_compute_cost_is_what_the_kernels_multiply(softmax):
  """The closed form of the TPU kernels' FLOPs against the dots and exponentials of the
  four kernels' code, each loop iteration counted (grid: one program per image)."""
  b, h, w, n, d, e = 3, 8, 6, 2, 4, 8
  qkv = jax.ShapeDtypeStruct((b, h, w, n * (2 * d + e)), jnp.bfloat16)
  rels = [jax.ShapeDtypeStruct((2 * s - 1, n, d), jnp.float32) for s in (h, w)]
  config = gsa.Config(n, n * d, train=True, softmax=softmax, backend='mosaic')
  vec = jax.ShapeDtypeStruct((n * e,), jnp.float32)

  def fwd_bwd(qkv, *rest):
    out, pullback = jax.vjp(lambda *a: gsa.gsa_attention(*a, config)[0], qkv, *rest)
    return pullback(out)

  jaxpr = jax.make_jaxpr(fwd_bwd)(qkv, *rels, vec, vec, vec, vec)
  want_flops = want_exps = got_flops = got_exps = 0
  for eqn in _pallas_calls(jaxpr.jaxpr):
    call = layout.KernelCall.parse(eqn.params['name'])
    f, x = _dot_flops_and_exps(eqn.params['jaxpr'])
    want_flops, want_exps = want_flops + b * f, want_exps + b * x
    width = eqn.invars[1].aval.shape[1]  # the relative rows [n*d, P]
    f, x = axial_tpu.compute_cost(call, b, width)
    got_flops, got_exps = got_flops + f, got_exps + x
  assert got_flops == want_flops
  assert got_exps == want_exps


def _pallas_calls(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'pallas_call':
      yield eqn
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _pallas_calls(inner)


# ------------------------------------------------------------------------------- dispatch


def _gsa_step(implementation, shape=(2, 4, 6, 8)):
  """A GSA module's forward + backward, jitted, and abstract arguments for it."""
  module = GSA(8, num_heads=2, key_features=4, implementation=implementation)
  x = jnp.zeros(shape, jnp.float32)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))

  def loss(params, stats, x):
    out, _ = module.apply(
      {'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']
    )
    return jnp.sum(out * out)

  step = jax.jit(jax.grad(loss, argnums=(0, 2)))
  return step, (variables['params'], variables['batch_stats'], x)


def test_default_implementation_lowers_to_einsums_on_cpu():
  step, args = _gsa_step(None)
  assert 'pallas_call' not in step.lower(*args).as_text(debug_info=True)
  forced, args = _gsa_step('pallas')  # the check sees a kernel where there is one
  assert 'pallas_call' in forced.lower(*args).as_text(debug_info=True)


def _compiled_for(target_name, implementation, *, mesh='target', size=(4, 10)):
  """A GSA layer's forward + backward compiled for a target, as its optimized HLO text.

  ``mesh``: ``'target'`` the target's own ``jax.make_mesh`` mesh, batch split over it;
  ``'auto'`` a ``jax.sharding.Mesh(devices, ('data',))`` (axes of type Auto), batch split
  and no mesh set; ``'set_auto'`` the same mesh set with ``jax.set_mesh``; ``'single'``
  one device, no mesh. ``size``: the image's ``(height, width)``; the default has rows
  longer than ``dispatch.SHORT_LINE``.
  """
  target = aot.get_target(target_name)
  devices = np.array(target.devices)
  step, (params, stats, x) = _gsa_step(implementation, shape=(4 * len(devices), *size, 8))
  if mesh == 'single':
    whole = split = jax.sharding.SingleDeviceSharding(devices[0])
  else:
    m = target.mesh if mesh == 'target' else jax.sharding.Mesh(devices, (aot.DATA_AXIS,))
    whole = jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec(aot.DATA_AXIS))
  params, stats = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), (params, stats)
  )
  x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split)
  if mesh == 'set_auto':
    with jax.set_mesh(whole.mesh):
      return step.lower(params, stats, x).compile().as_text()
  return step.lower(params, stats, x).compile().as_text()


MOSAIC = 'custom_call_target="tpu_custom_call"'
TRITON = 'custom_call_target="__gpu$xla.gpu.triton"'


@pytest.mark.parametrize(
  'target_name, kernels, calls',
  [('tpu-v4:2x2x1', MOSAIC, 0), ('tpu-v5e:2x2', MOSAIC, 4), ('t4', TRITON, 0),
   ('a100', TRITON, 4), ('l4', TRITON, 4), ('h100', TRITON, 4)],
)  # fmt: skip
def test_default_implementation_takes_the_kernels_where_the_target_supports_them(
  target_name, kernels, calls
):
  """Compiled for each target: TPU v5e and NVIDIA GPUs of compute capability 8.0 or later
  (A100 8.0, L4 8.9, H100 9.0) get the four kernel calls; TPU v4 and the T4 (7.5) the
  einsum ops, with no conditional left for the other branch."""
  text = _compiled_for(target_name, None)
  assert text.count(kernels) == calls
  assert 'conditional' not in text


@pytest.mark.parametrize('target_name, kernels', [('tpu-v5e:2x2', MOSAIC), ('h100', TRITON)])
def test_images_of_short_lines_take_the_einsums_unless_the_kernels_are_forced(target_name, kernels):
  """An 8x8 image (no line longer than dispatch.SHORT_LINE = 8) compiles to the einsum ops
  under implementation=None, on chips that have the kernels; 'pallas' still gets them."""
  assert dispatch.SHORT_LINE == 8
  assert _compiled_for(target_name, None, size=(8, 8)).count(kernels) == 0
  assert _compiled_for(target_name, 'pallas', size=(8, 8)).count(kernels) == 4
  assert _compiled_for(target_name, None, size=(8, 9)).count(kernels) == 4


@pytest.mark.parametrize(
  'target_name, message',
  [
    ('tpu-v4:2x2x1', "'pallas': the TPU kernels need TPU v5 or later.*TPU v4;"),
    ('t4', "'pallas'.*compute capability 8.0 or later.*Tesla T4 \\(compute capability 7.5\\)"),
  ],
)
def test_pallas_is_refused_for_a_target_the_kernels_do_not_support(target_name, message):
  with pytest.raises(ValueError, match=message):
    _compiled_for(target_name, 'pallas', mesh='single')


def test_support_is_decided_by_the_devices():
  """TPU v5 and later; NVIDIA compute capability 8.0 and later; ROCm never (the Triton
  kernels are built for NVIDIA GPUs); an unknown device (no devices) is taken as supported."""
  device = collections.namedtuple('Device', 'device_kind compute_capability')
  tpu = [axial_tpu.supports(k) for k in ('TPU v4', 'TPU v5 lite', 'TPU v6 lite', 'cpu')]
  assert tpu == [False, True, True, True]
  gpus = {'Tesla V100': '7.0', 'Tesla T4': '7.5', 'A100': '8.0', 'L4': '8.9', 'H100': '9.0'}
  got = {k: dispatch.kernels_supported('cuda', [device(k, cc)]) for k, cc in gpus.items()}
  assert got == {'Tesla V100': False, 'Tesla T4': False, 'A100': True, 'L4': True, 'H100': True}
  assert not dispatch.kernels_supported('rocm', [device('AMD Instinct MI250X', None)])
  with pytest.raises(ValueError, match="'pallas'.*AMD Instinct MI250X \\(ROCm\\)"):
    dispatch.kernels_supported('rocm', [device('AMD Instinct MI250X', None)], 'pallas')
  assert dispatch.kernels_supported('cuda', []) and dispatch.kernels_supported('cpu', [])


@pytest.mark.parametrize(
  'target_name, kernels, mesh',
  [(t, k, m) for t, k in (('tpu-v5e:2x2', MOSAIC), ('h100:1x1x2', TRITON))
   for m in ('auto', 'set_auto', 'single')]
  # The v5e slice's own jax.make_mesh mesh is compiled by the test above.
  + [('h100:1x1x2', TRITON, 'target')],
)  # fmt: skip
def test_kernels_compile_under_any_mesh(target_name, kernels, mesh):
  """A batch split over a mesh the user builds (``jax.sharding.Mesh``, axes of type Auto,
  with or without ``jax.set_mesh``), the trainer's ``jax.make_mesh`` mesh and one device:
  the kernels compile into the program for a TPU v5e slice and two H100s, without
  gathering the batch."""
  text = _compiled_for(target_name, None, mesh=mesh)
  assert text.count(kernels) == 4
  assert 'all-gather' not in text


def test_implementation_is_validated():
  q, v, rel = jnp.zeros((1, 3, 4, 2, 2)), jnp.zeros((1, 3, 4, 2, 3)), jnp.zeros((5, 2, 2))
  with pytest.raises(ValueError, match="None.*'xla'.*'pallas'"):
    ops.positional_attention(q, v, rel, axis=1, implementation='triton')
  x = jnp.zeros((1, 4, 6, 3))
  with pytest.raises(ValueError, match="implementation='mosaic'"):
    GSA(8, num_heads=2, implementation='mosaic').init(jax.random.key(0), x, train=False)


@pytest.mark.parametrize('kwargs', [dict(position_embedding='absolute'), dict(positional='none')])
def test_pallas_refuses_what_no_kernel_covers(kwargs):
  x = jnp.zeros((1, 4, 6, 3))
  with pytest.raises(ValueError, match="'pallas'"):
    GSA(8, num_heads=2, implementation='pallas', **kwargs).init(jax.random.key(0), x, train=False)
  qkv, table = jnp.zeros((1, 4, 6, 16)), jnp.zeros((4, 2, 2))
  vec = jnp.zeros((8,))
  with pytest.raises(ValueError, match="'pallas'"):
    ops.gsa_attention(
      qkv, table, jnp.zeros((6, 2, 2)), vec, vec, vec, vec, num_heads=2, key_features=4,
      train=False, position_embedding='absolute', implementation='pallas',
    )  # fmt: skip


def test_absolute_embeddings_fall_back_to_einsums():
  """Under implementation=None an unsupported combination runs the einsum path."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(_random(rng, 2, 4, 6, 3))
  module = GSA(8, num_heads=2, position_embedding='absolute')
  variables = module.init(jax.random.key(int(rng.integers(1 << 30))), x, train=False)
  got = module.apply(variables, x, train=False)
  want = module.clone(implementation='xla').apply(variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
