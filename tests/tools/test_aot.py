"""Deviceless compiles for TPU slices and the H100: targets, traffic, FLOPs, roofline, batch fit.

References are closed forms (bytes of known buffers, multiply-adds of a dot or a
convolution), the compilers' own memory plan and libtpu's own FLOP count.
"""

import dataclasses
import os

# Before JAX loads libtpu: other test workers may hold it too.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')

import types  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from gsa_flax.tools.sizing import aot, hlo, traffic  # noqa: E402

TARGETS = ('tpu-v5e:2x2', 'h100')


def _input(target: aot.Target, per_chip_shape, dtype, *, sharded: bool = True):
  """An abstract input: the leading axis split over the chips (``per_chip_shape`` on each)."""
  if not sharded:
    return jax.ShapeDtypeStruct(per_chip_shape, dtype, sharding=target.sharding())
  shape = (per_chip_shape[0] * target.num_chips, *per_chip_shape[1:])
  return jax.ShapeDtypeStruct(shape, dtype, sharding=target.sharding(aot.DATA_AXIS))


def _compile(target, f, *args):
  return jax.jit(f).lower(*args).compile()


# ----------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
  'name, chips, kind',
  [
    ('tpu-v4:2x2x1', 4, 'TPU v4'),
    ('tpu-v5e:2x2', 4, 'TPU v5 lite'),
    ('tpu-v5p:2x2x1', 4, 'TPU v5'),
    ('tpu-v6e:2x2', 4, 'TPU v6 lite'),
    ('h100', 1, 'NVIDIA H100 80GB HBM3'),
    ('a100', 1, 'NVIDIA A100-SXM4-40GB'),
    ('l4', 1, 'NVIDIA L4'),
    ('t4', 1, 'Tesla T4'),
  ],
)
def test_named_targets_are_single_host_slices_of_their_chip(name, chips, kind):
  target = aot.get_target(name)
  assert name in aot.TARGETS
  assert target.num_chips == chips  # v4 and v5p: one device per chip, not per TensorCore
  assert target.num_hosts == 1
  assert {d.device_kind for d in target.devices} == {kind}
  assert target.mesh.axis_names == (aot.DATA_AXIS,)
  assert target.mesh.devices.shape == (chips,)


@pytest.mark.parametrize('name', aot.GPUS)
def test_gpu_facts_agree_with_the_compiler_target_description(name):
  spec = aot.gpu_target_config(name)
  memory = int(spec.split('device_memory_size:')[1].split()[0])
  bandwidth = int(spec.split('memory_bandwidth:')[1].split()[0])
  chip = aot.get_target(name).chip
  assert chip.hbm_bytes == memory
  assert chip.hbm_bandwidth == pytest.approx(bandwidth, rel=0.01)


@pytest.mark.parametrize('name', ['tpu-v7:2x2', 'v100', 'v5e:2x2', ''])
def test_unknown_target_names_the_valid_ones(name):
  with pytest.raises(ValueError, match='unknown target') as error:
    aot.get_target(name)
  for valid in aot.TARGETS:
    assert valid in str(error.value)


def test_a_topology_the_chip_does_not_have_is_a_value_error():
  with pytest.raises(ValueError, match="topology '3x3' is not valid for tpu-v5e"):
    aot.get_target('tpu-v5e:3x3')


def test_pod_slice_spans_hosts_and_compiles_one_spmd_program_with_collectives():
  target = aot.get_target('tpu-v5e:4x4')
  assert target.num_chips == 16
  assert target.num_hosts == 4
  assert sorted({d.process_index for d in target.devices}) == [0, 1, 2, 3]

  def loss(w, x):  # data parallel: the gradient of replicated weights is summed over chips
    return jnp.mean(jnp.square(x @ w))

  w = _input(target, (128, 256), jnp.float32, sharded=False)
  x = _input(target, (8, 128), jnp.float32)
  analysis = aot.analyze(_compile(target, jax.grad(loss), w, x))
  assert analysis.collectives.get('all-reduce', 0) >= 1
  # Per chip: 8 of the 128 rows. Forward 2*8*128*256, backward the same for dW.
  assert analysis.matmul_flops == 2 * (2 * 8 * 128 * 256)


# ----------------------------------------------------------------------------- traffic


@pytest.mark.parametrize('name', TARGETS)
def test_traffic_of_an_elementwise_op_is_two_operands_and_one_result(name):
  target = aot.get_target(name)
  a = _input(target, (256, 512), jnp.float32)
  analysis = aot.analyze(_compile(target, lambda a, b: a * b + 1.0, a, a))
  assert analysis.hbm_bytes == 3 * 256 * 512 * 4
  assert analysis.argument_bytes == 2 * 256 * 512 * 4
  assert analysis.output_bytes == 256 * 512 * 4


@pytest.mark.parametrize('name', TARGETS)
def test_traffic_counts_tile_padding_as_the_memory_plan_does(name):
  target = aot.get_target(name)
  a = _input(target, (8, 14, 14, 64), jnp.bfloat16)
  analysis = aot.analyze(_compile(target, lambda a, b: a + b, a, a))
  # A TPU stores bf16 [..., 64] in 8x128 tiles: the last dimension padded to 128.
  minor = 128 if target.platform == 'tpu' else 64
  buffer = 8 * 14 * 14 * minor * 2
  assert analysis.hbm_bytes == 3 * buffer
  assert analysis.argument_bytes + analysis.output_bytes == 3 * buffer


@pytest.mark.parametrize('name', TARGETS)
def test_traffic_and_flops_of_a_matmul(name):
  target = aot.get_target(name)
  m, k, n = 1024, 256, 512
  x = _input(target, (m, k), jnp.bfloat16)
  w = _input(target, (k, n), jnp.bfloat16, sharded=False)
  analysis = aot.analyze(_compile(target, lambda x, w: x @ w, x, w))
  assert analysis.hbm_bytes == (m * k + k * n + m * n) * 2
  assert analysis.matmul_flops == 2 * m * k * n
  assert analysis.flops == 2 * m * k * n


@pytest.mark.parametrize('name', TARGETS)
def test_traffic_of_a_tuple_returning_program(name):
  target = aot.get_target(name)
  a = _input(target, (256, 512), jnp.float32)
  analysis = aot.analyze(_compile(target, lambda a, b: (a + b, a * b), a, a))
  buffer = 256 * 512 * 4
  if target.platform == 'tpu':
    # One multi-output fusion: a tuple-shaped result of two arrays from two operands.
    assert analysis.hbm_bytes == 4 * buffer
  else:
    # Two loop fusions, each reading both operands.
    assert analysis.hbm_bytes == 6 * buffer
  assert 0 <= analysis.output_bytes - 2 * buffer <= 1024  # (TPU: and the tuple's index table)


# ----------------------------------------------------------------------------- FLOPs


def _grouped_conv(x, k, padding):
  return jax.lax.conv_general_dilated(
    x, k, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=4
  )


def test_h100_flops_of_a_batched_dot():
  target = aot.get_target('h100')
  a = _input(target, (6, 64, 96), jnp.float32)
  b = _input(target, (6, 96, 80), jnp.float32)
  analysis = aot.analyze(_compile(target, lambda a, b: jnp.einsum('bij,bjk->bik', a, b), a, b))
  assert analysis.xla_flops is None  # the GPU compiler has no cost analysis
  assert analysis.flops == analysis.matmul_flops == 2 * 6 * 64 * 96 * 80


def test_h100_flops_of_a_grouped_convolution_and_its_gradients():
  target = aot.get_target('h100')
  n, h, w, c, o, groups = 8, 12, 10, 32, 64, 4
  x = _input(target, (n, h, w, c), jnp.float32)
  k = _input(target, (3, 3, c // groups, o), jnp.float32, sharded=False)
  forward = aot.analyze(_compile(target, lambda x, k: _grouped_conv(x, k, 'VALID'), x, k))
  assert forward.flops == 2 * n * (h - 2) * (w - 2) * o * 9 * (c // groups)

  # With SAME padding a 3x3 window meets 3L - 2 input elements along an axis of length L
  # (one tap of each edge position falls on padding). The input and kernel gradients are
  # convolutions with the same multiply-adds as the forward pass.
  loss = lambda x, k: jnp.sum(jnp.square(_grouped_conv(x, k, 'SAME')))
  both = aot.analyze(_compile(target, jax.grad(loss, argnums=(0, 1)), x, k))
  assert both.flops == 3 * 2 * n * o * (c // groups) * (3 * h - 2) * (3 * w - 2)


def test_tpu_flops_agree_with_libtpu_for_a_dot_and_a_grouped_convolution():
  target = aot.get_target('tpu-v5e:2x2')
  x = _input(target, (8, 12, 10, 32), jnp.float32)
  k = _input(target, (3, 3, 8, 64), jnp.float32, sharded=False)
  conv = aot.analyze(_compile(target, lambda x, k: _grouped_conv(x, k, 'VALID'), x, k))
  assert conv.xla_flops == conv.matmul_flops == 2 * 8 * 10 * 8 * 64 * 9 * 8
  a = _input(target, (128, 256), jnp.bfloat16)
  b = _input(target, (256, 384), jnp.bfloat16, sharded=False)
  dot = aot.analyze(_compile(target, lambda a, b: a @ b, a, b))
  assert dot.xla_flops == dot.matmul_flops == 2 * 128 * 256 * 384


# ----------------------------------------------------------------------------- custom calls


def _double_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2.0


def _double(x):
  out = jax.ShapeDtypeStruct(x.shape, x.dtype)
  return pl.pallas_call(_double_kernel, out_shape=out, name='double_kernel')(x)


@pytest.mark.filterwarnings('ignore:Using ``pl.pallas_call`` for Mosaic GPU:DeprecationWarning')
@pytest.mark.parametrize('name', TARGETS)
def test_custom_call_costs_replace_what_the_hlo_cannot_show(name):
  target = aot.get_target(name)
  x = _input(target, (64, 256), jnp.float32)
  spec = jax.sharding.PartitionSpec(aot.DATA_AXIS)
  # A kernel runs per chip: XLA cannot partition it, shard_map does.
  per_chip = jax.shard_map(
    _double, mesh=target.mesh, in_specs=spec, out_specs=spec, check_vma=False
  )
  compiled = _compile(target, per_chip, x)
  buffer = 64 * 256 * 4

  plain = aot.analyze(compiled)
  assert len(plain.unpriced_custom_calls) == 1
  assert plain.hbm_bytes == 2 * buffer  # only its operand and result are visible

  fixed = aot.analyze(
    compiled, {'double_kernel': hlo.CustomCallCost(bytes_accessed=12345, flops=678)}
  )
  assert fixed.unpriced_custom_calls == ()
  assert fixed.hbm_bytes == 12345
  assert fixed.flops - plain.flops == 678

  def from_shapes(call: hlo.CustomCall) -> hlo.CustomCallCost:
    assert [a.dims for a in call.operands] == [(64, 256)]
    return hlo.CustomCallCost(
      bytes_accessed=3 * sum(a.nbytes for a in call.operands + call.results),
      flops=call.results[0].size,
    )

  computed = aot.analyze(compiled, {'pallas_call': from_shapes})
  assert computed.hbm_bytes == 3 * 2 * buffer
  assert computed.flops - plain.flops == 64 * 256


def _double_with_estimate(x):
  out = jax.ShapeDtypeStruct(x.shape, x.dtype)
  estimate = pl.CostEstimate(flops=678_000, transcendentals=0, bytes_accessed=2 * x.size * 4)
  return pl.pallas_call(
    _double_kernel, out_shape=out, name='double_kernel', cost_estimate=estimate
  )(x)


@pytest.mark.filterwarnings('ignore:Using ``pl.pallas_call`` for Mosaic GPU:DeprecationWarning')
@pytest.mark.parametrize('name', TARGETS)
def test_a_kernel_priced_twice_counts_its_flops_once(name):
  """A TPU kernel's own CostEstimate is in libtpu's FLOPs already; the price given to
  analyze adds them only where the compiler has no count (the GPU)."""
  target = aot.get_target(name)
  x = _input(target, (64, 256), jnp.float32)
  spec = jax.sharding.PartitionSpec(aot.DATA_AXIS)
  per_chip = jax.shard_map(
    _double_with_estimate, mesh=target.mesh, in_specs=spec, out_specs=spec, check_vma=False
  )
  compiled = _compile(target, per_chip, x)
  priced = aot.analyze(compiled, {'double_kernel': hlo.CustomCallCost(1000, flops=678_000)})
  (call,) = traffic.custom_calls(compiled.as_text())
  assert [a.dims for a in call.operands] == [(64, 256)]  # one chip's share
  if target.platform == 'tpu':
    assert priced.xla_flops >= 678_000  # libtpu counted the kernel's estimate
    assert priced.flops == priced.xla_flops
  else:
    assert priced.flops == priced.matmul_flops + 678_000


def test_custom_calls_lists_kernels_with_their_shapes_not_annotations():
  text = """HloModule calls

ENTRY %main (x: f32[8,128]) -> f32[8,128] {
  %x = f32[8,128]{1,0} parameter(0)
  %s = f32[8,128]{1,0} custom-call(%x), custom_call_target="Sharding"
  %k = (f32[8,128]{1,0}, f32[2]{0}) custom-call(%s), custom_call_target="tpu_custom_call", \
metadata={op_name="jit(f)/my_kernel/pallas_call"}
  ROOT %y = f32[8,128]{1,0} get-tuple-element(%k), index=0
}
"""
  (call,) = traffic.custom_calls(text)
  assert (call.name, call.target, call.op_name) == (
    'k',
    'tpu_custom_call',
    'jit(f)/my_kernel/pallas_call',
  )
  assert [a.dims for a in call.operands] == [(8, 128)]
  assert [a.dims for a in call.results] == [(8, 128), (2,)]


# ----------------------------------------------------------------------------- roofline


def _analysis(flops: float, hbm_bytes: float) -> aot.Analysis:
  return aot.Analysis(
    flops=flops,
    hbm_bytes=hbm_bytes,
    onchip_bytes=0,
    matmul_flops=flops,
    argument_bytes=0,
    output_bytes=0,
    temp_bytes=0,
    alias_bytes=0,
    code_bytes=0,
    xla_flops=None,
    xla_bytes=None,
    unpriced_custom_calls=(),
    unknown_trip_counts=0,
    collectives={},
  )


def test_roofline_of_a_compute_bound_and_a_memory_bound_step():
  target = aot.get_target('tpu-v5e:2x2')  # 197 TFLOP/s and 819 GB/s per chip, 4 chips
  compute = aot.roofline(
    _analysis(197e12 * 0.004, 819e9 * 0.001),
    target,
    batch_per_chip=32,
    model_flops_per_example=197e12 * 0.004 / 32 / 2,  # half the executed FLOPs
  )
  assert compute.bound == 'compute'
  assert compute.step_seconds == pytest.approx(0.004)
  assert compute.examples_per_second == pytest.approx(32 * 4 / 0.004)
  assert compute.mfu == pytest.approx(0.5)

  memory = aot.roofline(_analysis(197e12 * 0.001, 819e9 * 0.003), target, batch_per_chip=8)
  assert memory.bound == 'memory'
  assert memory.step_seconds == pytest.approx(0.003)
  assert memory.examples_per_second == pytest.approx(8 * 4 / 0.003)
  assert memory.mfu is None


def test_roofline_counts_kernel_flops_as_the_chips_units_take_them():
  """A TPU's kernel dots at their MXU-padded FLOPs (the chip's MXU width); a GPU's kernel
  work on the CUDA cores at their float32 peak; everything else at the bf16 peak."""
  kernels = dict(kernel_flops=1e12, kernel_padded_flops={128: 4e12, 256: 9e12})
  analysis = dataclasses.replace(_analysis(3e12, 0.0), **kernels)
  for name, padded in (('tpu-v5e:2x2', 4e12), ('tpu-v6e:2x2', 9e12)):
    target = aot.get_target(name)
    roof = aot.roofline(analysis, target)
    assert roof.compute_seconds == pytest.approx((3e12 - 1e12 + padded) / target.chip.peak_flops)
  assert analysis.mxu_occupancy(128) == pytest.approx(0.25)
  h100 = aot.get_target('h100')  # 989 TFLOP/s bf16 on tensor cores, 67 float32 on CUDA cores
  gpu = dataclasses.replace(_analysis(3e12, 0.0), kernel_flops=1e12, kernel_vector_flops=6.7e11)
  roof = aot.roofline(gpu, h100)
  assert roof.compute_seconds == pytest.approx((3e12 - 6.7e11) / 989e12 + 6.7e11 / 67e12)


def test_analysis_hbm_needed_is_arguments_outputs_temporaries_less_donated_plus_code():
  analysis = aot.Analysis(
    **{
      **vars(_analysis(0, 0)),
      'argument_bytes': 1000,
      'output_bytes': 300,
      'temp_bytes': 50,
      'alias_bytes': 200,
      'code_bytes': 7,
    }
  )
  assert analysis.hbm_needed == 1000 + 300 + 50 - 200 + 7


# ----------------------------------------------------------------------------- batch fit


def _planned(argument: int, temp: int):
  """Something with the memory plan of a compiled program (all fit_batch reads)."""
  stats = types.SimpleNamespace(
    argument_size_in_bytes=argument,
    output_size_in_bytes=0,
    temp_size_in_bytes=temp,
    alias_size_in_bytes=0,
    generated_code_size_in_bytes=0,
  )
  return types.SimpleNamespace(memory_analysis=lambda: stats)


def test_fit_batch_solves_an_affine_memory_need_for_the_chip():
  fixed, per_example = 3 * 2**30, 150 * 2**20
  chip = aot.Chip('test chip', 16 * 2**30, 1e12, 1e14)
  fit = aot.fit_batch(lambda b: _planned(fixed, per_example * b), chip, (8, 16, 32), multiple=8)
  assert fit.fixed_bytes == pytest.approx(fixed)
  assert fit.bytes_per_example == pytest.approx(per_example)
  assert fit.max_residual_bytes == pytest.approx(0, abs=1)
  largest = int((16 * 2**30 * 0.95 - fixed) // per_example)  # 83
  assert fit.largest_batch == largest - largest % 8 == 80
  assert fit.predict(fit.largest_batch) <= fit.usable_bytes < fit.predict(fit.largest_batch + 8)


def test_fit_batch_reports_memory_that_is_not_affine():
  chip = aot.Chip('test chip', 2**30, 1e12, 1e14)
  fit = aot.fit_batch(lambda b: _planned(2**20, 2**10 * b * b), chip, (8, 16, 32))
  # The least-squares line misses the quadratic points by a quarter of the middle one.
  points = np.array([8, 16, 32]) ** 2 * 2**10
  line = np.polyval(np.polyfit([8, 16, 32], points, 1), [8, 16, 32])
  assert fit.max_residual_bytes == pytest.approx(np.abs(points - line).max())
  assert fit.max_residual_bytes > 0.1 * points[1]


def test_fit_batch_on_real_compiles_matches_the_buffers():
  target = aot.get_target('tpu-v5e:2x2')
  row = 128 * 1024  # float32 elements per example: 512 KiB, so the code's few KiB are noise

  def compile_at(batch: int):
    x = _input(target, (batch, row), jnp.float32)
    return _compile(target, lambda x: x * 2.0, x)

  fit = aot.fit_batch(compile_at, target.chip, (8, 16, 32))
  per_example = 2 * row * 4  # one input row, one output row
  assert fit.bytes_per_example == pytest.approx(per_example, rel=1e-3)
  assert fit.max_residual_bytes < 1e-2 * per_example  # (generated code grows a little)
  expected = int((target.chip.hbm_bytes * 0.95 - fit.fixed_bytes) // per_example)
  assert abs(fit.largest_batch - expected) <= 1e-3 * expected


def test_fit_batch_refuses_memory_that_does_not_grow():
  chip = aot.Chip('test chip', 2**30, 1e12, 1e14)
  with pytest.raises(ValueError, match='does not grow with the batch'):
    aot.fit_batch(lambda b: _planned(2**20, 0), chip, (8, 16))
  with pytest.raises(ValueError, match='two or more distinct batches'):
    aot.fit_batch(lambda b: _planned(2**20, b), chip, (8, 8))
