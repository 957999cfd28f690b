r"""Sizes a run without training: parameters per stage, forward FLOPs, train-step memory.

  python -m gsa_flax.tools.summary --config=configs/imagenet.py
  python -m gsa_flax.tools.summary --config=configs/imagenet.py --config.batch_size=256 \
      --num_devices=8
  python -m gsa_flax.tools.summary --config=configs/imagenet.py --target=tpu-v5e:2x2

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

With ``--target`` (a Cloud TPU slice such as ``tpu-v5e:2x2``, ``tpu-v4:2x2x1``,
``tpu-v5p:2x2x1``, ``tpu-v6e:2x2``, a pod slice such as ``tpu-v5e:4x4``, or an NVIDIA GPU,
``h100``, ``a100``, ``l4`` or ``t4``; see
:mod:`gsa_flax.tools.sizing.aot`) it sizes the run on that accelerator before you have it:
the real training step, as ``gsa_flax.train.trainer.train_and_evaluate`` builds it, is
compiled here for the target
(nothing runs) and, per chip, for the network and its counterpart: the HBM it needs
against the chip's, the largest batch per chip that fits, FLOPs, the estimated HBM
traffic and the roofline step time with the images/s and MFU it implies
(:mod:`gsa_flax.tools.sizing.report`).

Nothing is downloaded and no dataset is read: the number of classes comes from the
dataset's spec.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from gsa_flax.data import datasets
from gsa_flax.model import networks
from gsa_flax.tools import cli, tables
from gsa_flax.tools.sizing import aot, report
from gsa_flax.train import config_validation, experiment, steps
from gsa_flax.train import state as state_lib


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


def _count(tree: Any) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def stage_parameter_counts(model: networks.ResNet, params: dict[str, Any]) -> dict[str, int]:
  """Trainable parameters of the stem, each stage and the head of a (GSA-)ResNet.

  Args:
    model: the network.
    params: its ``params`` collection (arrays or shape structs).

  Returns:
    ``{'stem': n, 'stage1': n, ..., 'head': n}``.
  """
  counts = {'stem': 0, **{f'stage{i + 1}': 0 for i in range(len(model.stage_sizes))}, 'head': 0}
  for name, subtree in params.items():
    counts[networks.part_of(model, name)] += _count(subtree)
  return counts


def forward_flops(model, variables: Any, image_size: int) -> float:
  """XLA's FLOPs of one image's eval-mode forward pass (a multiply-add counts 2)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older jax: one dict per device
    cost = cost[0]
  return float(cost['flops'])


def train_step_memory(
  config: ml_collections.ConfigDict, pieces: state_lib.Setup, batch: int
) -> tuple[int, int]:
  """XLA's planned memory of the real training step at ``batch`` examples on one device.

  The step is the trainer's (:func:`gsa_flax.train.steps.jit_train_step`: same shardings, state
  donated), compiled for this machine's first device.

  Returns:
    ``(temporaries, total)`` in bytes: temporaries are the buffers live inside the step
    (activations saved for the backward pass, gradients, workspace); total adds the state
    and the batch, less what donation lets the step reuse.
  """
  mesh = steps.make_mesh(jax.devices()[:1])
  step = steps.jit_train_step(
    mesh, pieces.schedule, datasets.get(config.dataset).num_classes, config.label_smoothing
  )
  inputs = {
    'image': jax.ShapeDtypeStruct((batch, config.image_size, config.image_size, 3), jnp.float32),
    'label': jax.ShapeDtypeStruct((batch,), jnp.int32),
  }
  compiled = step.lower(state_lib.abstract(pieces, config.image_size), inputs).compile()
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
  pieces = experiment.setup(config, datasets.get(config.dataset).num_classes)
  state = state_lib.abstract(pieces, config.image_size)
  params = stage_parameter_counts(pieces.model, state.params)
  variables = state_lib.variables(state)
  gflops = forward_flops(pieces.model, variables, config.image_size) / 1e9 if flops else None
  temp = total = None
  if memory_batch:
    temp, total = train_step_memory(config, pieces, memory_batch)
  return Summary(
    model=config.model,
    params=params,
    total_params=_count(state.params),
    gflops=gflops,
    batch=memory_batch,
    temp_bytes=temp,
    total_bytes=total,
  )


def format_table(summaries: Sequence[Summary]) -> str:
  """A plain-text table, one column per network; for two, also the first over the second."""
  table = tables.Table([s.model for s in summaries], '.3f')
  row = table.row
  for part in summaries[0].params:
    row(f'params {part}', [s.params.get(part, 0) for s in summaries], lambda v: f'{v:,}')
  row('params total', [s.total_params for s in summaries], lambda v: f'{v:,}')
  if summaries[0].gflops is not None:
    row('GFLOPs / image (fwd)', [s.gflops for s in summaries], lambda v: f'{v:.4g}')
    row('GMACs / image (fwd)', [s.gflops / 2 for s in summaries], lambda v: f'{v:.4g}')
  if summaries[0].temp_bytes is not None:
    row(
      f'train temporaries (b={summaries[0].batch})',
      [s.temp_bytes for s in summaries],
      tables.format_bytes,
    )
    row(
      f'train total (b={summaries[0].batch})',
      [s.total_bytes for s in summaries],
      tables.format_bytes,
    )
  return table.render()


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # the table is the output
  cli.check_backend()
  config = FLAGS.config
  config_validation.validate(config)
  if FLAGS.target:
    try:
      aot.get_target(FLAGS.target)
    except ValueError as e:
      cli.fail(str(e))
    sizes = {'per_device_batch': FLAGS.per_device_batch, 'num_devices': FLAGS.num_devices}
    summaries = report.target_summaries(
      config, FLAGS.target, compare=FLAGS.compare, fit=FLAGS.memory, **sizes
    )
    print(report.format_target_report(config, summaries, **sizes))
    return
  devices = FLAGS.num_devices or jax.device_count()
  batch = FLAGS.per_device_batch or max(config.batch_size // devices, 1)
  configs = [config]
  if FLAGS.compare and networks.counterpart(config.model) in networks.MODELS:
    configs.append(experiment.counterpart(config))
  summaries = [summarize(c, memory_batch=batch if FLAGS.memory else 0) for c in configs]
  classes = datasets.get(config.dataset).num_classes
  print(
    f'{config.dataset} ({classes} classes), {config.image_size}x{config.image_size}, '
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
  # Flags exist only when the module runs as a program: importing it defines none.
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_integer(
    'num_devices',
    0,
    "Devices the run will use (0: this machine's): per-device batch = "
    'config.batch_size / num_devices.',
    lower_bound=0,
  )
  flags.DEFINE_integer(
    'per_device_batch', 0, 'Batch for the memory figures (0: from num_devices).', lower_bound=0
  )
  flags.DEFINE_bool('memory', True, 'Compile the training step for its memory (the slow part).')
  flags.DEFINE_bool('compare', True, 'Also summarize the counterpart network (ResNet <-> GSA).')
  flags.DEFINE_string(
    'target',
    '',
    'Size the run on an accelerator without it: compile the training step for a Cloud TPU '
    f'slice or an NVIDIA GPU ({", ".join(aot.TARGETS)}, or a pod slice such as tpu-v5e:4x4). '
    'Per-device batch: --per_device_batch, or batch_size / --num_devices (default: the '
    "target's chips). --nomemory skips the largest-batch fit.",
  )
  cli.run(main)
