"""summary: parameter counts against known totals, FLOPs against a closed form, the CLI."""

import functools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import REPO, environment, resnet_macs, tiny_config

from configs import default, imagenet, imagenet_resnet50
from gsa_flax.data import datasets
from gsa_flax.model import networks
from gsa_flax.tools import summary
from gsa_flax.train import experiment

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
  model = networks.build(networks.architecture_of(config), datasets.get(config.dataset).num_classes)
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
  other = summary.summarize(experiment.counterpart(config), flops=False)
  assert other.model == networks.counterpart(config.model)
  assert other.params['stem'] == result.params['stem']
  assert other.params['head'] == result.params['head']


def test_flops_match_closed_form():
  config = tiny_config('', model='resnet26', stage_sizes=(), num_filters=16, image_size=32)
  got = summary.summarize(config, flops=True).gflops * 1e9
  want = 2 * resnet_macs((1, 2, 4, 1), 16, 32, 10)  # XLA: a multiply-add is 2 FLOPs
  # BatchNorm, ReLU, residual adds and pooling add a few percent on top of the convolutions.
  assert want <= got <= 1.08 * want, got / want


def test_train_step_memory_grows_with_batch():
  config = tiny_config('')
  pieces = experiment.setup(config, 10)
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
