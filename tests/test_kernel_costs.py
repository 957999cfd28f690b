"""What the kernels multiply: the closed-form dots of each kernel call against the dots of
the kernel's traced body, the MXU padding and the attention's useful FLOPs by hand, and
what a compiled program's roofline makes of them.

Everything here traces (``jax.make_jaxpr``) without compiling, except the last test, which
compiles one tiny layer for a TPU slice and an H100.
"""

import os

os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from helpers import compile_gsa_layer  # noqa: E402

from gsa_flax.model.kernels import axial_gpu, axial_tpu, flops, gsa, layout, positional  # noqa: E402
from gsa_flax.tools.sizing import aot  # noqa: E402


def _gsa_jaxpr(backend, shape, dtype=jnp.bfloat16, rel_length=None, **options):
  """Forward + backward of the fused GSA attention, traced: ``shape`` is
  ``(batch, height, width, heads, d_k, d_v)``; the relative tables of both steps have
  ``rel_length`` entries (default: the layer's, reaching every pixel)."""
  b, h, w, n, dk, dv = shape
  qkv = jax.ShapeDtypeStruct((b, h, w, 2 * dk + dv), dtype)
  length = rel_length or 2 * max(h, w) - 1
  rels = [jax.ShapeDtypeStruct((length, n, dk // n), jnp.float32) for _ in (h, w)]
  vec = jax.ShapeDtypeStruct((dv,), jnp.float32)
  config = gsa.Config(n, dk, backend=backend, **options)

  def fwd_bwd(qkv, *rest):
    out, pullback = jax.vjp(lambda *a: gsa.gsa_attention(*a, config)[0], qkv, *rest)
    return pullback(out)

  return jax.make_jaxpr(fwd_bwd)(qkv, *rels, vec, vec, vec, vec)


def _closed_form(backend, call, batch, sixteen_bit):
  if backend == 'mosaic':
    return axial_tpu.kernel_dots(call, batch, axial_tpu.offset_lanes(call.step))
  return axial_gpu.kernel_dots(call, batch, sixteen_bit)


# Every extra of the kernels is reached: the training module (BatchNorm statistics, content
# attention, the TPU's recomputed column output), the positional softmax with normalised
# queries in float32 (Triton's dots on the CUDA cores), no content branch, a local table
# (L = 3: fewer offset lanes than positions), a table longer than the column needs (the
# 14x20 map's L = 39: cropped), and GSA-ResNet-50's four stage geometries (8 heads,
# d_k = d_out / 2) in bfloat16.
BF16 = jnp.bfloat16
CASES = [
  pytest.param((2, 8, 6, 2, 8, 16), jnp.bfloat16, dict(train=True), id='8x6-train'),
  pytest.param(
    (2, 8, 6, 2, 8, 16),
    jnp.float32,
    dict(train=False, softmax=True, normalize_queries=True),
    id='8x6-softmax-normalized-f32',
  ),
  pytest.param((1, 5, 7, 2, 4, 6), BF16, dict(train=True, content=False), id='5x7-no-content'),
  pytest.param((1, 9, 6, 2, 4, 6), jnp.bfloat16, dict(train=True, rel_length=3), id='9x6-local'),
  pytest.param((1, 14, 20, 8, 128, 256), BF16, dict(train=True, softmax=True), id='14x20-softmax'),
  pytest.param((2, 56, 56, 8, 32, 64), jnp.bfloat16, dict(train=True), id='stage1-56x56'),
  pytest.param((2, 28, 28, 8, 64, 128), jnp.bfloat16, dict(train=True), id='stage2-28x28'),
  pytest.param((2, 14, 14, 8, 128, 256), jnp.bfloat16, dict(train=True), id='stage3-14x14'),
  pytest.param((2, 7, 7, 8, 256, 512), jnp.bfloat16, dict(train=True), id='stage4-7x7'),
]  # fmt: skip


@pytest.mark.parametrize('backend', ['mosaic', 'triton'])
@pytest.mark.parametrize('shape, dtype, options', CASES)
def test_each_kernels_dots_are_its_closed_form(backend, shape, dtype, options):
  """Per kernel call, the products read from the kernel's traced body (loops times their
  trip counts, grid times programs) are the closed form's, shape for shape; the FLOPs of
  its CostEstimate are theirs."""
  jaxpr = _gsa_jaxpr(backend, shape, dtype, **options)
  calls = flops.inventory(jaxpr)
  assert len(calls) == 4
  sixteen_bit = jnp.dtype(dtype).itemsize == 2
  for name, dots in calls:
    call = layout.KernelCall.parse(name)
    want = _closed_form(backend, call, shape[0], sixteen_bit)
    assert flops.merged(dots) == flops.merged(want), name
    if backend == 'mosaic':
      cost, _ = axial_tpu.compute_cost(call, shape[0], axial_tpu.offset_lanes(call.step))
    else:
      cost, _ = axial_gpu.compute_cost(call, shape[0])
    assert flops.executed_flops(dots) == cost, name


@pytest.mark.parametrize('backend', ['mosaic', 'triton'])
@pytest.mark.parametrize('axis', [1, 2])
def test_the_positional_kernels_dots_are_their_closed_form(backend, axis):
  """The single-step kernels (no fused extras) of positional attention."""
  b, h, w, n, d, e = 2, 5, 7, 2, 2, 3
  q = jax.ShapeDtypeStruct((b, h, w, n, d), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((b, h, w, n, e), jnp.bfloat16)
  rel = jax.ShapeDtypeStruct((9, n, d), jnp.bfloat16)

  def fwd_bwd(q, v, rel):
    fn = lambda *a: positional.positional_attention(*a, axis=axis, backend=backend)  # noqa: E731
    out, pullback = jax.vjp(fn, q, v, rel)
    return pullback(out)

  calls = flops.inventory(jax.make_jaxpr(fwd_bwd)(q, v, rel))
  assert len(calls) == 2
  for name, dots in calls:
    call = layout.KernelCall.parse(name)
    assert flops.merged(dots) == flops.merged(_closed_form(backend, call, b, True)), name


def test_mxu_padding_worked_by_hand():
  """The TPU column step's forward on one 5x7 image, 2 heads of d = 2 and e = 3, L = 9:
  every query line of 5 positions runs the logits ``[5, 4] @ [4, 2 x 128]`` (128 offset
  lanes per head, the table block-diagonal) and per head ``[5, 128] @ [128, 6]``."""
  q = jax.ShapeDtypeStruct((1, 5, 7, 2, 2), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((1, 5, 7, 2, 3), jnp.bfloat16)
  rel = jax.ShapeDtypeStruct((9, 2, 2), jnp.bfloat16)
  jaxpr = jax.make_jaxpr(lambda *a: positional.positional_attention(*a, axis=1, backend='mosaic'))(
    q, v, rel
  )
  ((_, dots),) = flops.inventory(jaxpr)
  lines = 7
  executed = lines * (2 * 5 * 4 * 256 + 2 * (2 * 5 * 128 * 6))
  assert flops.executed_flops(dots) == executed == 179_200
  # 128-wide MXU: M 5 -> 8 sublanes; K 4 -> 128, N 256 stays; K 128 stays, N 6 -> 128.
  assert flops.padded_flops(dots, 128) == lines * (2 * 8 * 128 * 256 + 2 * (2 * 8 * 128 * 128))
  assert flops.padded_flops(dots, 128) == 7_340_032
  # 256-wide (v6): every K and N becomes 256.
  assert flops.padded_flops(dots, 256) == lines * 3 * (2 * 8 * 256 * 256) == 22_020_096


@pytest.mark.parametrize('length, rel_length', [(5, 3), (5, 9), (5, 21), (7, 5), (56, 111)])
def test_neighbour_pairs_count_the_positions_a_table_reaches(length, rel_length):
  radius = (rel_length - 1) // 2
  pairs = sum(abs(z - x) <= radius for x in range(length) for z in range(length))
  assert flops.neighbour_pairs(length, rel_length) == pairs


def test_useful_flops_worked_by_hand():
  """Column step of a 6x4 image, 2 heads, d = 3, e = 5, L = 3 (each query sees itself
  and its two neighbours): 4 lines of 6 positions have 6 + 2 x 5 = 16 pairs each."""
  step = layout.AxialStep(1, 6, 4, 2, 6, 10, 3)
  forward = layout.KernelCall(step, False, 0, k_off=6, v_off=12)
  pairs = 4 * 16
  positional_fwd = pairs * 2 * (3 + 5) * 2  # logits 2d and values 2e per pair and head
  context = 2 * (6 * 4) * 3 * 5 * 2  # softmax(K)^T V per head: 2 N d e
  assert flops.useful_flops(forward, batch=3) == 3 * (positional_fwd + context)
  backward = layout.KernelCall(step, True, 0, extras=frozenset({'key_stats', 'dcontext'}))
  assert flops.useful_flops(backward, batch=1) == 2 * (positional_fwd + context)


@pytest.mark.parametrize('backend', ['mosaic', 'triton'])
def test_the_kernels_execute_more_than_the_attention_needs(backend):
  """At GSA-ResNet-50's first stage every kernel executes more FLOPs than its useful
  count, and a TPU's MXU pads them further."""
  jaxpr = _gsa_jaxpr(backend, (1, 56, 56, 8, 32, 64), train=True)
  for name, dots in flops.inventory(jaxpr):
    useful = flops.useful_flops(layout.KernelCall.parse(name), 1)
    assert flops.executed_flops(dots) > useful, name
    if backend == 'mosaic':
      assert flops.padded_flops(dots, 128) > flops.executed_flops(dots), name


@pytest.mark.parametrize('target_name, backend', [('tpu-v5e:2x2', 'mosaic'), ('h100', 'triton')])
def test_a_compiled_layers_kernel_flops_are_its_traced_dots(target_name, backend):
  """A GSA layer compiled for a TPU slice (batch split over 4 chips) or an H100: the
  kernel FLOPs, MXU-padded FLOPs and CUDA-core FLOPs that the analysis reads from the
  compiled program's custom calls are those of the kernels' traced dots for one chip's
  share of the batch."""
  target = aot.get_target(target_name)
  batch, h, w, heads, dk, dv = 2, 10, 6, 2, 8, 16  # rows of 10: the kernels (SHORT_LINE)
  compiled = compile_gsa_layer(
    target, batch=batch, height=h, width=w, heads=heads, key_dim=dk, value_dim=dv
  )
  analysis = aot.analyze(compiled)
  traced = _gsa_jaxpr(backend, (batch, h, w, heads, dk, dv), train=True)
  dots = [d for _, kernel_dots in flops.inventory(traced) for d in kernel_dots]
  assert analysis.kernel_flops == flops.executed_flops(dots)
  if backend == 'mosaic':
    assert analysis.kernel_padded_flops == {m: flops.padded_flops(dots, m) for m in (128, 256)}
    assert analysis.kernel_vector_flops == 0
  else:
    assert analysis.kernel_vector_flops == flops.executed_flops(dots, flops.VECTOR) > 0
