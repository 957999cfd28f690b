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
``tpu-v5p:2x2x1``, ``tpu-v6e:2x2``, a pod slice such as ``tpu-v5e:4x4``, or ``h100``; see
:mod:`gsa_flax.tools.aot`) it sizes the run on that accelerator before you have it: the real
training step, as ``gsa_flax.train.train_and_evaluate`` builds it, is compiled here for the target
(nothing runs) and, per chip, for the network and its counterpart: the HBM it needs
against the chip's, the largest batch per chip that fits, FLOPs, the estimated HBM
traffic and the roofline step time with the images/s and MFU it implies
(:func:`target_summary`).

Nothing is downloaded and no dataset is read: the number of classes comes from the
dataset's spec.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from gsa_flax import config_validation, datasets, models, steps
from gsa_flax import state as state_lib
from gsa_flax.tools import aot, cli, hlo


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


def stage_parameter_counts(model: models.ResNet, params: dict[str, Any]) -> dict[str, int]:
  """Trainable parameters of the stem, each stage and the head of a (GSA-)ResNet.

  Args:
    model: the network.
    params: its ``params`` collection (arrays or shape structs).

  Returns:
    ``{'stem': n, 'stage1': n, ..., 'head': n}``.
  """
  counts = {'stem': 0, **{f'stage{i + 1}': 0 for i in range(len(model.stage_sizes))}, 'head': 0}
  for name, subtree in params.items():
    counts[models.part_of(model, name)] += _count(subtree)
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

  The step is the trainer's (:func:`gsa_flax.steps.jit_train_step`: same shardings, state
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
  pieces = state_lib.setup(config, datasets.get(config.dataset).num_classes)
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


def counterpart_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same run with the counterpart network (every stage of its own kind)."""
  other = ml_collections.ConfigDict(config.to_dict())
  other.model = models.counterpart(config.model)
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


# ----------------------------------------------------------------------------- accelerator targets


@dataclasses.dataclass(frozen=True)
class TargetSummary:
  """One network's training step compiled for an accelerator target; per chip unless noted.

  Attributes:
    model: the registered model name.
    target: the target's name (``'tpu-v5e:2x2'``, ``'h100'``, ...).
    chip: the chip's facts (HBM, bandwidth, peak FLOP/s).
    num_chips: chips in the slice.
    num_hosts: hosts (processes) driving them.
    batch_per_chip: examples per chip per step.
    analysis: :func:`gsa_flax.tools.aot.analyze` of the compiled step (FLOPs, estimated HBM
      traffic, memory plan).
    roofline: :func:`gsa_flax.tools.aot.roofline` at ``batch_per_chip``.
    model_flops_per_example: 3x the forward pass's dot and convolution FLOPs in the
      minimal-FLOP order (:func:`model_flops_per_example`), for the MFU.
    fit: the largest batch per chip whose memory fits (:func:`gsa_flax.tools.aot.fit_batch`),
      or None if not computed.
    compile_seconds: the compile at ``batch_per_chip``, on this machine.
  """

  model: str
  target: str
  chip: aot.Chip
  num_chips: int
  num_hosts: int
  batch_per_chip: int
  analysis: aot.Analysis
  roofline: aot.Roofline
  model_flops_per_example: float
  fit: aot.BatchFit | None
  compile_seconds: float

  @property
  def hbm_needed(self) -> int:
    """Peak HBM the step needs on a chip (:attr:`gsa_flax.tools.aot.Analysis.hbm_needed`)."""
    return self.analysis.hbm_needed

  @property
  def fits(self) -> bool:
    """Whether that need is within the chip's HBM."""
    return self.hbm_needed <= self.chip.hbm_bytes


def per_chip_batch(
  config: ml_collections.ConfigDict,
  target: aot.Target,
  *,
  per_device_batch: int = 0,
  num_devices: int = 0,
) -> int:
  """``per_device_batch``, or ``config.batch_size`` over ``num_devices`` (default: the
  target's chips), at least 1."""
  if per_device_batch:
    return per_device_batch
  return max(config.batch_size // (num_devices or target.num_chips), 1)


def compile_train_step(
  config: ml_collections.ConfigDict, target: aot.Target, batch_per_chip: int
) -> jax.stages.Compiled:
  """The training step of ``config`` compiled for ``target`` (nothing runs).

  Built as ``gsa_flax.train.train_and_evaluate`` builds it: :func:`gsa_flax.state.setup` and the
  state (abstract here) replicated over the target's ``data`` mesh, the batch of
  ``batch_per_chip`` examples per chip sharded on ``data``, and
  :func:`gsa_flax.steps.jit_train_step` (state donated).
  """
  num_classes = datasets.get(config.dataset).num_classes
  pieces = state_lib.setup(config, num_classes)
  replicated, sharded = target.sharding(), target.sharding(aot.DATA_AXIS)
  state = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
    state_lib.abstract(pieces, config.image_size),
  )
  n, size = batch_per_chip * target.num_chips, config.image_size
  batch = {
    'image': jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32, sharding=sharded),
    'label': jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharded),
  }
  step = steps.jit_train_step(target.mesh, pieces.schedule, num_classes, config.label_smoothing)
  return step.lower(state, batch).compile()


def model_flops_per_example(config: ml_collections.ConfigDict) -> float:
  """The model FLOPs of one training example: 3x the forward pass's.

  The forward pass (eval mode, batch 1) is compiled for this machine's CPU with the
  attention in its minimal-FLOP form (``order='logits'``, ``implementation='xla'``) and
  its dot and convolution FLOPs are counted from the HLO (a multiply-add is 2; taps on
  padding are not counted). The backward pass is taken as twice the forward.
  """
  minimal = ml_collections.ConfigDict(config.to_dict())
  minimal.gsa.order = 'logits'
  minimal.gsa.implementation = 'xla'
  minimal.remat = ''
  model = models.build(minimal, datasets.get(config.dataset).num_classes)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  variables, x = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), (variables, x)
  )
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  return 3 * hlo.hlo_costs(compiled.as_text())['matmul_flops']


def _fit_batches(batch: int) -> tuple[int, ...]:
  """Second batches to try for the memory fit (the deviceless GPU compiler rejects a few
  shapes: then the next one)."""
  return tuple(dict.fromkeys(b for b in (2 * batch, batch + max(batch // 2, 1), batch // 2) if b))


def target_summary(
  config: ml_collections.ConfigDict,
  target_name: str,
  *,
  batch_per_chip: int | None = None,
  fit: bool = True,
) -> TargetSummary:
  """Compiles ``config``'s training step for an accelerator target and reads it per chip.

  Args:
    config: an experiment config.
    target_name: e.g. ``'tpu-v5e:2x2'``, ``'tpu-v5e:4x4'`` (a pod slice) or ``'h100'``
      (see :func:`gsa_flax.tools.aot.get_target`).
    batch_per_chip: examples per chip; default ``config.batch_size`` over the target's
      chips.
    fit: also find the largest batch per chip that fits (one or two more compiles).

  Returns:
    The summary.
  """
  target = aot.get_target(target_name)
  batch = batch_per_chip or per_chip_batch(config, target)
  start = time.perf_counter()
  compiled = compile_train_step(config, target, batch)
  seconds = time.perf_counter() - start
  analysis = aot.analyze(compiled)
  model_flops = model_flops_per_example(config)
  roof = aot.roofline(analysis, target, batch_per_chip=batch, model_flops_per_example=model_flops)
  batch_fit = None
  if fit:
    for second in _fit_batches(batch):
      try:
        other = compile_train_step(config, target, second)
      except jax.errors.JaxRuntimeError as e:  # a shape the GPU compiler has no tiling for
        logging.warning('%s at %d per chip did not compile (%s)', config.model, second, e)
        continue
      known = {batch: compiled, second: other}
      try:
        batch_fit = aot.fit_batch(known.__getitem__, target.chip, tuple(known), multiple=8)
      except ValueError as e:  # a program too small for its memory to follow the batch
        logging.warning('%s: no batch fit (%s)', config.model, e)
      break
  return TargetSummary(
    model=config.model,
    target=target.name,
    chip=target.chip,
    num_chips=target.num_chips,
    num_hosts=target.num_hosts,
    batch_per_chip=batch,
    analysis=analysis,
    roofline=roof,
    model_flops_per_example=model_flops,
    fit=batch_fit,
    compile_seconds=seconds,
  )


def format_target_table(summaries: Sequence[TargetSummary]) -> str:
  """A plain-text table of target summaries, one column per network; for two, the ratio."""
  rows = [('', *[s.model for s in summaries])]
  ratio = len(summaries) == 2
  if ratio:
    rows[0] += ('ratio',)

  def row(label, values, fmt, numbers=None):
    cells = (label, *[fmt(v) for v in values])
    if ratio:
      a, b = numbers or values
      cells += ('-' if a is None or b is None or not b else f'{a / b:.2f}',)
    rows.append(cells)

  capacity = summaries[0].chip.hbm_bytes
  row(f'HBM needed (of {_bytes(capacity)})', [s.hbm_needed for s in summaries], _bytes)
  row('fits', [s.fits for s in summaries], lambda v: 'yes' if v else 'NO', [None, None])
  largest = [s.fit.largest_batch if s.fit else None for s in summaries]
  row('largest batch / chip', largest, lambda v: '-' if v is None else f'{v}')
  row('temporaries', [s.analysis.temp_bytes for s in summaries], _bytes)
  row('GFLOPs / step', [s.analysis.flops for s in summaries], lambda v: f'{v / 1e9:,.4g}')
  row(
    'HBM traffic / step', [s.analysis.hbm_bytes for s in summaries], lambda v: f'{v / 1e9:.4g} GB'
  )
  steps = [s.roofline.step_seconds for s in summaries]
  bounds = [s.roofline.bound for s in summaries]
  row(
    'roofline step',
    list(zip(steps, bounds, strict=True)),
    lambda v: f'{1e3 * v[0]:.4g} ms ({v[1]})',
    steps,
  )
  row(
    'images/s (slice)',
    [s.roofline.examples_per_second for s in summaries],
    lambda v: f'{v:,.0f}',
  )
  row('MFU', [s.roofline.mfu for s in summaries], lambda v: f'{100 * v:.0f}%')
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return '\n'.join(
    '  '.join(
      [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
    )
    for r in rows
  )


def target_summaries(
  config: ml_collections.ConfigDict,
  target_name: str,
  *,
  per_device_batch: int = 0,
  num_devices: int = 0,
  compare: bool = True,
  fit: bool = True,
) -> list[TargetSummary]:
  """What ``--target`` compiles: :func:`target_summary` of the network and (``compare``)
  of its counterpart, at the per-chip batch of :func:`per_chip_batch`."""
  target = aot.get_target(target_name)
  batch = per_chip_batch(config, target, per_device_batch=per_device_batch, num_devices=num_devices)
  configs = [config]
  if compare and models.counterpart(config.model) in models.MODELS:
    configs.append(counterpart_config(config))
  return [target_summary(c, target_name, batch_per_chip=batch, fit=fit) for c in configs]


def format_target_report(
  config: ml_collections.ConfigDict,
  summaries: Sequence[TargetSummary],
  *,
  per_device_batch: int = 0,
  num_devices: int = 0,
) -> str:
  """What ``--target`` prints: the slice, the run and :func:`format_target_table`."""
  first = summaries[0]
  chip = first.chip
  if per_device_batch:
    source = '--per_device_batch'
  else:
    source = f'batch_size {config.batch_size} / {num_devices or first.num_chips} devices'
  hosts = f'{first.num_hosts} host{"s" if first.num_hosts > 1 else ""}'
  lines = [
    f'{first.target}: {first.num_chips} chip{"s" if first.num_chips > 1 else ""} on {hosts}; '
    f'{chip.name}: '
    f'{chip.hbm_bytes / 2**30:.1f} GiB HBM at {chip.hbm_bandwidth / 1e9:,.0f} GB/s, '
    f'{chip.peak_flops / 1e12:,.0f} TFLOP/s bf16.',
    f'{config.dataset}, {config.image_size}x{config.image_size}, dtype {config.dtype}, '
    f"remat '{config.remat}'; {first.batch_per_chip} examples per chip ({source}).",
    'Per chip, from the training step compiled for the target on this machine (nothing '
    "runs): HBM needed (XLA's memory plan), FLOPs (executed), HBM traffic (estimated from "
    'the compiled program), roofline step = max(FLOPs / peak, traffic / bandwidth); MFU '
    'counts 3x the forward pass in its minimal-FLOP order.',
    '',
    format_target_table(summaries),
  ]
  return '\n'.join(lines)


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # the table is the output
  config = FLAGS.config
  config_validation.validate(config)
  if FLAGS.target:
    try:
      aot.get_target(FLAGS.target)
    except ValueError as e:
      cli.fail(str(e))
    sizes = {'per_device_batch': FLAGS.per_device_batch, 'num_devices': FLAGS.num_devices}
    summaries = target_summaries(
      config, FLAGS.target, compare=FLAGS.compare, fit=FLAGS.memory, **sizes
    )
    print(format_target_report(config, summaries, **sizes))
    return
  devices = FLAGS.num_devices or jax.device_count()
  batch = FLAGS.per_device_batch or max(config.batch_size // devices, 1)
  configs = [config]
  if FLAGS.compare and models.counterpart(config.model) in models.MODELS:
    configs.append(counterpart_config(config))
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
  )
  flags.DEFINE_integer('per_device_batch', 0, 'Batch for the memory figures (0: from num_devices).')
  flags.DEFINE_bool('memory', True, 'Compile the training step for its memory (the slow part).')
  flags.DEFINE_bool('compare', True, 'Also summarize the counterpart network (ResNet <-> GSA).')
  flags.DEFINE_string(
    'target',
    '',
    'Size the run on an accelerator without it: compile the training step for a Cloud TPU '
    f'slice or an H100 ({", ".join(aot.TARGETS)}, or a pod slice such as tpu-v5e:4x4). '
    'Per-device batch: --per_device_batch, or batch_size / --num_devices (default: the '
    "target's chips). --nomemory skips the largest-batch fit.",
  )
  cli.run(main)
