"""sizing: the training step compiled for a TPU slice and an H100, read per chip; what
--target prints is what the compiled programs say, the MFU against a closed-form count."""

import re

import pytest
from helpers import resnet_macs, tiny_config

from gsa_flax.model import networks
from gsa_flax.tools.sizing import aot, report, traffic


def test_model_flops_are_three_forward_passes_of_the_closed_form():
  config = tiny_config('', model='resnet26', stage_sizes=(), num_filters=16, image_size=32)
  # Only the convolutions and the classifier multiply; taps on the padding do not count.
  assert report.model_flops_per_example(config) == 3 * 2 * resnet_macs((1, 2, 4, 1), 16, 32, 10)


def _table(text):
  """``{row label: cells}`` of the printed table (cells split on runs of 2+ spaces)."""
  lines = text.split('\n\n', 1)[1].splitlines()
  return {
    cells[0]: cells[1:] for cells in (re.split(r'\s{2,}', line.strip()) for line in lines[1:])
  }


def test_a_tiny_train_step_compiles_for_a_tpu_slice_with_its_kernels_priced():
  """The trainer's step for a v5e slice: the Mosaic kernels in it (four calls per GSA
  layer), every one priced, and the memory plan within the chip."""
  config = tiny_config('')
  target = aot.get_target('tpu-v5e:2x2')
  compiled = report.compile_train_step(config, target, 8)
  kernels = [c for c in traffic.custom_calls(compiled.as_text()) if c.target == 'tpu_custom_call']
  num_gsa_layers = sum(networks.build(networks.architecture_of(config), 10).stage_sizes)
  assert len(kernels) == 4 * num_gsa_layers
  analysis = aot.analyze(compiled)
  assert analysis.unpriced_custom_calls == ()
  assert 0 < analysis.hbm_needed <= target.chip.hbm_bytes


# The H100's step is compiled by the report test below.
@pytest.mark.parametrize('target_name, calls_per_layer', [('t4', 0), ('a100', 4), ('l4', 4)])
def test_a_tiny_train_step_compiles_for_each_gpu_with_the_kernels_it_supports(
  target_name, calls_per_layer
):
  """The trainer's step for a T4 (Colab's free GPU, compute capability 7.5) runs the
  einsum ops; for an A100 or an L4 the Triton kernels, four calls per GSA layer."""
  config = tiny_config('')
  target = aot.get_target(target_name)
  compiled = report.compile_train_step(config, target, 4)
  kernels = [c for c in traffic.custom_calls(compiled.as_text()) if 'triton' in c.target]
  num_gsa_layers = sum(networks.build(networks.architecture_of(config), 10).stage_sizes)
  assert len(kernels) == calls_per_layer * num_gsa_layers
  assert 0 < aot.analyze(compiled).hbm_needed <= target.chip.hbm_bytes


@pytest.mark.parametrize('target_name, batch', [('h100', 4)])
def test_target_report_agrees_with_the_compiled_steps(target_name, batch):
  """The tiny network and its counterpart compiled for a TPU slice and an H100 as --target
  does it; what is printed is what aot computes, and consistent with the chip's facts."""
  config = tiny_config('')
  summaries = report.target_summaries(config, target_name, per_device_batch=batch)
  text = report.format_target_report(config, summaries, per_device_batch=batch)
  target = aot.get_target(target_name)
  chip = target.chip
  assert [s.model for s in summaries] == ['gsa_resnet_tiny', 'resnet_tiny']
  for s in summaries:
    assert (s.num_chips, s.num_hosts, s.batch_per_chip) == (target.num_chips, 1, batch)
    assert s.analysis.unpriced_custom_calls == ()
    assert s.fits == (s.analysis.hbm_needed <= chip.hbm_bytes)
    fit = s.fit
    assert fit.hbm_needed[fit.batches.index(batch)] == s.hbm_needed  # the step compiled
    largest = fit.largest_batch
    assert largest % 8 == 0 and fit.predict(largest) <= fit.usable_bytes < fit.predict(largest + 8)
    memory = s.analysis.hbm_bytes / chip.hbm_bandwidth
    # The GPU's kernels: their CUDA-core work at the float32 peak, the rest at bf16's.
    vector = s.analysis.kernel_vector_flops
    compute = (s.analysis.flops - vector) / chip.peak_flops + vector / chip.vector_flops
    assert s.roofline.step_seconds == pytest.approx(max(memory, compute))
    assert s.roofline.examples_per_second == pytest.approx(
      batch * target.num_chips / max(memory, compute)
    )
    assert s.roofline.mfu == pytest.approx(
      s.model_flops_per_example * batch / max(memory, compute) / chip.peak_flops
    )
  gsa, resnet = summaries
  rows = _table(text)
  assert rows['largest batch / chip'] == [
    str(gsa.fit.largest_batch),
    str(resnet.fit.largest_batch),
    f'{gsa.fit.largest_batch / resnet.fit.largest_batch:.2f}',
  ]
  assert rows['fits'][:2] == ['yes', 'yes']
  gflops = [float(v.replace(',', '')) for v in rows['GFLOPs / step'][:2]]
  assert gflops == pytest.approx([s.analysis.flops / 1e9 for s in summaries], rel=1e-3)
  # (the tiny network computes in float32: all its kernel work is on the CUDA cores)
  assert 0 < gsa.analysis.kernel_vector_flops <= gsa.analysis.kernel_flops <= gsa.analysis.flops
  assert resnet.analysis.kernel_flops == 0
  kernel = rows['kernel GFLOPs / step'][:2]
  assert float(kernel[0]) == pytest.approx(gsa.analysis.kernel_flops / 1e9, rel=1e-3)
  assert kernel[1] == '-'
  vector = rows['kernel GFLOPs on CUDA cores'][0]
  assert float(vector) == pytest.approx(gsa.analysis.kernel_vector_flops / 1e9, rel=1e-3)
  traffic = [float(v.split()[0]) for v in rows['HBM traffic / step'][:2]]
  assert traffic == pytest.approx([s.analysis.hbm_bytes / 1e9 for s in summaries], rel=1e-3)
  chips = f'{target.num_chips} chip{"s" if target.num_chips > 1 else ""} on 1 host'
  assert text.startswith(f'{target.name}: {chips}; {chip.name}')
  assert f'{batch} examples per chip (--per_device_batch)' in text


def test_per_chip_batch_defaults_to_the_targets_chips():
  config = tiny_config('', batch_size=64)
  target = aot.get_target('tpu-v5e:4x4')  # 16 chips on 4 hosts
  assert report.per_chip_batch(config, target) == 4
  assert report.per_chip_batch(config, target, num_devices=8) == 8
  assert report.per_chip_batch(config, target, per_device_batch=3, num_devices=8) == 3
