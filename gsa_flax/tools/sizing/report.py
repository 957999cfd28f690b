"""Sizing a run on an accelerator before having it: the training step compiled for a target.

:func:`target_summary` compiles the real training step (as
:func:`gsa_flax.train.trainer.train_and_evaluate` builds it: :func:`gsa_flax.train.state.setup`, the
state replicated over the target's ``data`` mesh, the batch sharded on it,
:func:`gsa_flax.train.steps.jit_train_step` with the state donated) for a Cloud TPU slice or an
H100 (:mod:`gsa_flax.tools.sizing.aot`; nothing runs) and reads it per chip: the HBM it needs
against the chip's, the largest batch per chip that fits, FLOPs, the estimated HBM traffic
and the roofline step time with the images/s and MFU it implies. ``python -m
gsa_flax.tools.summary --target=...`` prints it for a network and its counterpart
(:func:`target_summaries`, :func:`format_target_report`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from gsa_flax.data import datasets
from gsa_flax.model import networks
from gsa_flax.tools import tables
from gsa_flax.tools.sizing import aot, traffic
from gsa_flax.train import experiment, steps
from gsa_flax.train import state as state_lib


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
    analysis: :func:`gsa_flax.tools.sizing.aot.analyze` of the compiled step (FLOPs, estimated HBM
      traffic, memory plan).
    roofline: :func:`gsa_flax.tools.sizing.aot.roofline` at ``batch_per_chip``.
    model_flops_per_example: 3x the forward pass's dot and convolution FLOPs in the
      minimal-FLOP order (:func:`model_flops_per_example`), for the MFU.
    fit: the largest batch per chip whose memory fits (:func:`gsa_flax.tools.sizing.aot.fit_batch`),
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
    """Peak HBM the step needs on a chip (:attr:`gsa_flax.tools.sizing.aot.Analysis.hbm_needed`)."""
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

  Built as ``gsa_flax.train.trainer.train_and_evaluate`` builds it:
  :func:`gsa_flax.train.state.setup` and the
  state (abstract here) replicated over the target's ``data`` mesh, the batch of
  ``batch_per_chip`` examples per chip sharded on ``data``, and
  :func:`gsa_flax.train.steps.jit_train_step` (state donated).
  """
  num_classes = datasets.get(config.dataset).num_classes
  pieces = experiment.setup(config, num_classes)
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
  model = networks.build(
    networks.architecture_of(minimal), datasets.get(config.dataset).num_classes
  )
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  variables, x = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), (variables, x)
  )
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  return 3 * traffic.hlo_costs(compiled.as_text())['matmul_flops']


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
      (see :func:`gsa_flax.tools.sizing.aot.get_target`).
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
  table = tables.Table([s.model for s in summaries], '.2f')
  row = table.row
  capacity = summaries[0].chip.hbm_bytes
  row(
    f'HBM needed (of {tables.format_bytes(capacity)})',
    [s.hbm_needed for s in summaries],
    tables.format_bytes,
  )
  row('fits', [s.fits for s in summaries], lambda v: 'yes' if v else 'NO', [None, None])
  largest = [s.fit.largest_batch if s.fit else None for s in summaries]
  row('largest batch / chip', largest, lambda v: '-' if v is None else f'{v}')
  row('temporaries', [s.analysis.temp_bytes for s in summaries], tables.format_bytes)
  row('GFLOPs / step', [s.analysis.flops for s in summaries], lambda v: f'{v / 1e9:,.4g}')
  kernels = [s.analysis.kernel_flops or None for s in summaries]
  if any(kernels):
    row('kernel GFLOPs / step', kernels, lambda v: '-' if v is None else f'{v / 1e9:,.4g}')
    mxu = summaries[0].chip.mxu
    if mxu is not None:
      occupancy = [s.analysis.mxu_occupancy(mxu) for s in summaries]
      row(
        f'kernel MXU occupancy ({mxu}-wide tiles)',
        occupancy,
        lambda v: '-' if v is None else f'{100 * v:.0f}%',
        [None] * len(summaries),
      )
    else:
      vector = [
        s.analysis.kernel_vector_flops if s.analysis.kernel_flops else None for s in summaries
      ]
      row(
        'kernel GFLOPs on CUDA cores',
        vector,
        lambda v: '-' if v is None else f'{v / 1e9:,.4g}',
        [None] * len(summaries),
      )
  row(
    'HBM traffic / step',
    [s.analysis.hbm_bytes for s in summaries],
    lambda v: f'{v / 1e9:.4g} GB',
  )
  times = [s.roofline.step_seconds for s in summaries]
  bounds = [s.roofline.bound for s in summaries]
  row(
    'roofline step',
    list(zip(times, bounds, strict=True)),
    lambda v: f'{1e3 * v[0]:.4g} ms ({v[1]})',
    times,
  )
  row(
    'images/s (slice)',
    [s.roofline.examples_per_second for s in summaries],
    lambda v: f'{v:,.0f}',
  )
  row('MFU', [s.roofline.mfu for s in summaries], lambda v: f'{100 * v:.0f}%')
  return table.render()


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
  if compare and networks.counterpart(config.model) in networks.MODELS:
    configs.append(experiment.counterpart(config))
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
    'the compiled program), roofline step = max(FLOPs / peak, traffic / bandwidth) with the '
    "kernels' FLOPs as the chip's units take them (TPU: each dot padded to the MXU's tiles; "
    'GPU: CUDA-core work at the float32 peak); MFU counts 3x the forward pass in its '
    'minimal-FLOP order.',
    '',
    format_target_table(summaries),
  ]
  return '\n'.join(lines)
