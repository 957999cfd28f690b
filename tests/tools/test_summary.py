"""summary: parameter counts against known totals, FLOPs against a closed form, the CLI."""

import functools
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import REPO, environment, tiny_config

from configs import default, imagenet, imagenet_resnet50
from gsa_flax import datasets, models
from gsa_flax import state as state_lib
from gsa_flax.tools import aot, summary

# torchvision's resnet50: conv1 + bn1, layer1..layer4, fc (1000 classes).
RESNET50_PARTS = {
  'stem': 9_536,
  'stage1': 215_808,
  'stage2': 1_219_584,
  'stage3': 7_098_368,
  'stage4': 14_964_736,
  'head': 2_049_000,
}


def _eval_shape_total(config):
  model = models.build(config, datasets.get(config.dataset).num_classes)
  x = jnp.zeros((1, config.image_size, config.image_size, 3))
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params['params']))


def test_resnet50_parts_match_torchvision():
  result = summary.summarize(imagenet_resnet50.get_config(), flops=False)
  assert result.params == RESNET50_PARTS
  assert result.total_params == 25_557_032


@pytest.mark.parametrize(
  'config',
  [
    imagenet.get_config(),
    default.get_config(),
    tiny_config('', **{'gsa.attention_stages': (False, True)}),
  ],
  ids=['gsa_resnet50', 'gsa_resnet_tiny', 'tiny_mixed'],
)
def test_parts_sum_to_total(config):
  result = summary.summarize(config, flops=False)
  assert list(result.params) == ['stem'] + [
    f'stage{i + 1}' for i in range(len(result.params) - 2)
  ] + ['head']
  assert sum(result.params.values()) == result.total_params == _eval_shape_total(config)
  # The counterpart differs only where the stage is attention in one and convolution in the other.
  other = summary.summarize(summary.counterpart_config(config), flops=False)
  assert other.model == models.counterpart(config.model)
  assert other.params['stem'] == result.params['stem']
  assert other.params['head'] == result.params['head']


def _taps(size, stride, kernel=3):
  """Kernel taps that land inside the image, summed over the outputs of one axis (SAME).

  XLA counts the multiply-adds with real inputs only, not those with the zero padding.
  """
  out = -(-size // stride)
  pad = max((out - 1) * stride + kernel - size, 0) // 2
  return sum(0 <= o * stride + t - pad < size for o in range(out) for t in range(kernel))


def _resnet_macs(stage_sizes, filters, image_size, classes):
  """Multiply-adds of a small-stem bottleneck ResNet's convolutions and classifier."""
  size = image_size
  macs = _taps(size, 1) ** 2 * 3 * filters  # 3x3 stem, stride 1
  channels = filters
  for i, blocks in enumerate(stage_sizes):
    width = filters * 2**i
    for j in range(blocks):
      stride = 2 if i > 0 and j == 0 else 1
      out = size // stride
      macs += size * size * channels * width  # 1x1 reduce, at the input resolution
      macs += _taps(size, stride) ** 2 * width * width  # 3x3, strided
      macs += out * out * width * 4 * width  # 1x1 expand
      if channels != 4 * width or stride > 1:
        macs += out * out * channels * 4 * width  # projection shortcut
      channels, size = 4 * width, out
  return macs + channels * classes


def test_flops_match_closed_form():
  config = tiny_config('', model='resnet26', stage_sizes=(), num_filters=16, image_size=32)
  got = summary.summarize(config, flops=True).gflops * 1e9
  want = 2 * _resnet_macs((1, 2, 4, 1), 16, 32, 10)  # XLA: a multiply-add is 2 FLOPs
  # BatchNorm, ReLU, residual adds and pooling add a few percent on top of the convolutions.
  assert want <= got <= 1.08 * want, got / want


def test_train_step_memory_grows_with_batch():
  config = tiny_config('')
  pieces = state_lib.setup(config, 10)
  temp2, total2 = summary.train_step_memory(config, pieces, 2)
  temp8, total8 = summary.train_step_memory(config, pieces, 8)
  assert 0 < temp2 < temp8 and temp2 < total2 < total8
  # Each example keeps at least its 16x16 feature maps of every stage for the backward pass.
  assert (temp8 - temp2) / 6 > 16 * 16 * (8 + 32) * 4


def test_summary_cli():
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'gsa_flax.tools.summary',
      f'--config={REPO / "configs" / "default.py"}',
      '--config.stage_sizes=(1,1)',
      '--config.num_filters=8',
      '--config.gsa.num_heads=2',
      '--config.batch_size=8',
      '--nocompare',  # the counterpart's numbers are checked in-process above
    ],
    env=environment(devices=2),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert '4 examples per device (batch_size 8 / 2 devices)' in result.stdout
  header = next(line for line in lines if 'gsa_resnet_tiny' in line)
  assert header.split() == ['gsa_resnet_tiny']
  rows = {
    ' '.join(line.split()[:2]): line.split()[2:] for line in lines if line.startswith('params ')
  }
  assert [int(v.replace(',', '')) for v in rows['params total']] == [
    _eval_shape_total(tiny_config(''))
  ]
  assert list(rows) == [
    'params stem',
    'params stage1',
    'params stage2',
    'params head',
    'params total',
  ]
  assert any(line.startswith('GFLOPs / image') for line in lines)
  assert any(line.startswith('train temporaries (b=4)') for line in lines)


# ----------------------------------------------------------------------------- accelerator targets


def test_model_flops_are_three_forward_passes_of_the_closed_form():
  config = tiny_config('', model='resnet26', stage_sizes=(), num_filters=16, image_size=32)
  # Only the convolutions and the classifier multiply; taps on the padding do not count.
  assert summary.model_flops_per_example(config) == 3 * 2 * _resnet_macs((1, 2, 4, 1), 16, 32, 10)


def _table(text):
  """``{row label: cells}`` of the printed table (cells split on runs of 2+ spaces)."""
  lines = text.split('\n\n', 1)[1].splitlines()
  return {
    cells[0]: cells[1:] for cells in (re.split(r'\s{2,}', line.strip()) for line in lines[1:])
  }


# A TPU keeps a tiny network's small batches in on-chip memory, where the HBM plan does not
# follow the batch: there the batch is large enough to spill.
@pytest.mark.parametrize('target_name, batch', [('tpu-v5e:2x2', 256), ('h100', 4)])
def test_target_report_agrees_with_the_compiled_steps(target_name, batch):
  """The tiny network and its counterpart compiled for a TPU slice and an H100 as --target
  does it; what is printed is what aot computes, and consistent with the chip's facts."""
  config = tiny_config('')
  summaries = summary.target_summaries(config, target_name, per_device_batch=batch)
  text = summary.format_target_report(config, summaries, per_device_batch=batch)
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
    compute = s.analysis.flops / chip.peak_flops
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
  traffic = [float(v.split()[0]) for v in rows['HBM traffic / step'][:2]]
  assert traffic == pytest.approx([s.analysis.hbm_bytes / 1e9 for s in summaries], rel=1e-3)
  chips = f'{target.num_chips} chip{"s" if target.num_chips > 1 else ""} on 1 host'
  assert text.startswith(f'{target.name}: {chips}; {chip.name}')
  assert f'{batch} examples per chip (--per_device_batch)' in text


def test_per_chip_batch_defaults_to_the_targets_chips():
  config = tiny_config('', batch_size=64)
  target = aot.get_target('tpu-v5e:4x4')  # 16 chips on 4 hosts
  assert summary.per_chip_batch(config, target) == 4
  assert summary.per_chip_batch(config, target, num_devices=8) == 8
  assert summary.per_chip_batch(config, target, per_device_batch=3, num_devices=8) == 3
