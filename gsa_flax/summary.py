r"""Sizes a run without training: parameters per stage, forward FLOPs, train-step memory.

  python -m gsa_flax.summary --config=configs/imagenet.py
  python -m gsa_flax.summary --config=configs/imagenet.py --config.batch_size=256 --num_devices=8

For the config's network and its counterpart (``gsa_resnetXX`` <-> ``resnetXX``, same
config otherwise, so GSA-ResNet is compared with the convolutional ResNet it replaces):

- trainable parameters of the stem, of each stage and of the classifier head;
- forward GFLOPs per image from XLA's cost analysis of the compiled eval-mode forward
  (batch 1; XLA counts a multiply-add as 2 FLOPs, so GMACs, the unit papers usually call
  "FLOPs", are half of it);
- the memory of one compiled training step (forward, backward, update) at the per-device
  batch, from XLA's memory analysis: the temporaries (activations kept for the backward
  pass and workspace) and the total (temporaries + state + batch). The numbers are those
  XLA plans for *this machine's* backend; GPUs and TPUs fuse and lay out differently, so
  read them as an estimate of the order of magnitude there.

Nothing is downloaded and no dataset is read: the number of classes comes from a table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from gsa_flax import models, train

# Classes of the known datasets, so that sizing a run needs no dataset on disk.
NUM_CLASSES = {'imagenet2012': 1000, 'cifar100': 100, 'digits': 10}

STEM = ('conv_init', 'bn_init')
HEAD = ('Dense_0',)


@dataclasses.dataclass(frozen=True)
class Summary:
  """The sizes of one network under one config.

  Attributes:
    model: the registered model name.
    params: trainable parameters by part: ``stem``, ``stage1`` ... ``stageN``, ``head``.
    total_params: all trainable parameters (the sum of ``params``).
    gflops: forward GFLOPs per image (XLA; a multiply-add is 2), or None if not computed.
    batch: per-device batch of the memory figures.
    temp_bytes: train-step temporaries at ``batch`` (activations and workspace), or None.
    total_bytes: train-step total at ``batch`` (temporaries, state, batch), or None.
  """

  model: str
  params: dict[str, int]
  total_params: int
  gflops: float | None = None
  batch: int = 0
  temp_bytes: int | None = None
  total_bytes: int | None = None


def counterpart(model_name: str) -> str:
  """The convolutional ResNet of a GSA-ResNet and vice versa (``gsa_resnet50`` <-> ``resnet50``)."""
  if model_name.startswith('gsa_'):
    return model_name[len('gsa_') :]
  return 'gsa_' + model_name


def num_classes(config: ml_collections.ConfigDict) -> int:
  if config.dataset not in NUM_CLASSES:
    raise ValueError(
      f'config.dataset={config.dataset!r} has no known number of classes; '
      f'known: {", ".join(NUM_CLASSES)}.'
    )
  return NUM_CLASSES[config.dataset]


def _count(tree: Any) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def stage_parameter_counts(stage_sizes: Sequence[int], params: dict[str, Any]) -> dict[str, int]:
  """Trainable parameters of the stem, each stage and the head of a (GSA-)ResNet.

  Args:
    stage_sizes: blocks per stage (the model's ``stage_sizes``).
    params: the model's ``params`` collection (arrays or shape structs); its blocks are
      ``BottleneckBlock_0 ...`` in order, ``stage_sizes[0]`` of them in stage 1, and so on.

  Returns:
    ``{'stem': n, 'stage1': n, ..., 'head': n}``.
  """
  counts = {'stem': 0, **{f'stage{i + 1}': 0 for i in range(len(stage_sizes))}, 'head': 0}
  first_block = [sum(stage_sizes[:i]) for i in range(len(stage_sizes) + 1)]
  for name, subtree in params.items():
    if name in STEM:
      part = 'stem'
    elif name in HEAD:
      part = 'head'
    elif name.startswith('BottleneckBlock_'):
      block = int(name.rsplit('_', 1)[1])
      stage = next(i for i in range(len(stage_sizes)) if block < first_block[i + 1])
      part = f'stage{stage + 1}'
    else:
      raise ValueError(f'parameter {name!r} belongs to no known part of the network.')
    counts[part] += _count(subtree)
  return counts


def _abstract_state(config: ml_collections.ConfigDict, model) -> train.TrainState:
  # Any schedule gives the optimizer state its structure; its values are not used.
  tx = train.create_optimizer(config, optax.constant_schedule(0.0))
  return jax.eval_shape(
    functools.partial(train.create_train_state, config, model, tx, image_size=config.image_size),
    jax.random.key(0),
  )


def forward_flops(model, variables: Any, image_size: int) -> float:
  """XLA's FLOPs of one image's eval-mode forward pass (a multiply-add counts 2)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older jax: one dict per device
    cost = cost[0]
  return float(cost['flops'])


def train_step_memory(
  config: ml_collections.ConfigDict, model, state: train.TrainState, batch: int
) -> tuple[int, int]:
  """XLA's planned memory of the real training step at ``batch`` examples on one device.

  Returns:
    ``(temporaries, total)`` in bytes: temporaries are the buffers live inside the step
    (activations saved for the backward pass, gradients, workspace); total adds the state
    and the batch, with the state donated as in training.
  """
  step = functools.partial(
    train.train_step,
    schedule=optax.constant_schedule(0.0),
    num_classes=num_classes(config),
    label_smoothing=config.label_smoothing,
  )
  inputs = {
    'image': jax.ShapeDtypeStruct((batch, config.image_size, config.image_size, 3), jnp.float32),
    'label': jax.ShapeDtypeStruct((batch,), jnp.int32),
  }
  compiled = jax.jit(step, donate_argnums=0).lower(state, inputs).compile()
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  return int(m.temp_size_in_bytes), int(total - m.alias_size_in_bytes)


def summarize(
  config: ml_collections.ConfigDict, *, flops: bool = True, memory_batch: int = 0
) -> Summary:
  """Parameters per part, forward GFLOPs and train-step memory of ``config``'s network.

  Args:
    config: an experiment config (``configs/*.py``); nothing of its dataset is read.
    flops: compile the forward pass for XLA's FLOP count.
    memory_batch: per-device batch for the train-step memory; 0 skips it.
  """
  model = train.create_model(config, num_classes(config))
  state = _abstract_state(config, model)
  params = stage_parameter_counts(model.stage_sizes, state.params)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  gflops = forward_flops(model, variables, config.image_size) / 1e9 if flops else None
  temp = total = None
  if memory_batch:
    temp, total = train_step_memory(config, model, state, memory_batch)
  return Summary(
    model=config.model,
    params=params,
    total_params=_count(state.params),
    gflops=gflops,
    batch=memory_batch,
    temp_bytes=temp,
    total_bytes=total,
  )


def counterpart_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same run with the counterpart network (every stage of its own kind)."""
  other = ml_collections.ConfigDict(config.to_dict())
  other.model = counterpart(config.model)
  # An attention_stages override would turn stages of a ResNet into GSA: use the defaults.
  other.gsa.attention_stages = ()
  return other


def _bytes(n: int | None) -> str:
  if n is None:
    return '-'
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def format_table(summaries: Sequence[Summary]) -> str:
  """A plain-text table, one column per network; for two, also the first over the second."""
  rows = [('', *[s.model for s in summaries])]
  ratio = len(summaries) == 2
  if ratio:
    rows[0] += ('ratio',)

  def row(label, values, fmt, numbers=None):
    cells = (label, *[fmt(v) for v in values])
    if ratio:
      a, b = numbers or values
      cells += ('-' if a is None or not b else f'{a / b:.3f}',)
    rows.append(cells)

  for part in summaries[0].params:
    row(f'params {part}', [s.params.get(part, 0) for s in summaries], lambda v: f'{v:,}')
  row('params total', [s.total_params for s in summaries], lambda v: f'{v:,}')
  if summaries[0].gflops is not None:
    row('GFLOPs / image (fwd)', [s.gflops for s in summaries], lambda v: f'{v:.4g}')
    row('GMACs / image (fwd)', [s.gflops / 2 for s in summaries], lambda v: f'{v:.4g}')
  if summaries[0].temp_bytes is not None:
    row(f'train temporaries (b={summaries[0].batch})', [s.temp_bytes for s in summaries], _bytes)
    row(f'train total (b={summaries[0].batch})', [s.total_bytes for s in summaries], _bytes)
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = []
  for r in rows:
    lines.append(
      '  '.join(
        [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
      )
    )
  return '\n'.join(lines)


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_integer(
  'num_devices',
  0,
  "Devices the run will use (0: this machine's): per-device batch = "
  'config.batch_size / num_devices.',
)
flags.DEFINE_integer('per_device_batch', 0, 'Batch for the memory figures (0: from num_devices).')
flags.DEFINE_bool('memory', True, 'Compile the training step for its memory (the slow part).')
flags.DEFINE_bool('compare', True, 'Also summarize the counterpart network (ResNet <-> GSA).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # the table is the output
  config = FLAGS.config
  devices = FLAGS.num_devices or jax.device_count()
  batch = FLAGS.per_device_batch or max(config.batch_size // devices, 1)
  try:
    num_classes(config)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  configs = [config]
  if FLAGS.compare and counterpart(config.model) in models.MODELS:
    configs.append(counterpart_config(config))
  summaries = [summarize(c, memory_batch=batch if FLAGS.memory else 0) for c in configs]
  print(
    f'{config.dataset} ({num_classes(config)} classes), {config.image_size}x{config.image_size}, '
    f'dtype {config.dtype}; FLOPs: XLA cost analysis of the forward pass, batch 1.'
  )
  if FLAGS.memory:
    source = (
      '--per_device_batch'
      if FLAGS.per_device_batch
      else f'batch_size {config.batch_size} / {devices} devices'
    )
    print(
      f'Memory: XLA memory analysis of the compiled train step at {batch} examples per device '
      f'({source}), as compiled for {jax.default_backend()}.'
    )
  print()
  print(format_table(summaries))


if __name__ == '__main__':
  app.run(main)
