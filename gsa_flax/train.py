"""Training and evaluation: ``train_and_evaluate(config, workdir) -> state``.

One compiled step, ``jax.jit`` over a one-axis ``Mesh`` of every device of every process:
the batch is sharded on ``data``, the state replicated, BatchNorm statistics are computed
over the global batch (XLA inserts the reductions). The input position needs no state of
its own: the pipeline is a deterministic function of ``(seed, step)``, so resuming at step
``k`` replays exactly the batches an uninterrupted run would have seen.

What a test, a tool or a notebook may want to vary is a parameter of
:func:`train_and_evaluate`: the training data, the evaluators (small classes with
``run(variables) -> {name: value}``, big_vision style) and the checkpointer.
"""

# No `from __future__ import annotations`: clu's metric collections read their annotations.
import collections
import dataclasses
import functools
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, metrics, parameter_overview, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gsa_flax import checkpointing, config_validation, datasets, input_pipeline
from gsa_flax import state as state_lib

DATA_AXIS = 'data'

Batch = dict[str, np.ndarray]

# ----------------------------------------------------------------------------- metrics


@flax.struct.dataclass
class FirstNonFinite(metrics.Metric):
  """The first step (and which value) at which the loss or gradient norm was not finite."""

  step: jax.Array  # int32; a large sentinel when every step was finite
  which: jax.Array  # 0 loss, 1 grad_norm

  _NONE = np.iinfo(np.int32).max

  @classmethod
  def from_model_output(cls, *, step, loss, grad_norm, **_) -> 'FirstNonFinite':
    bad_loss = ~jnp.isfinite(loss)
    bad = bad_loss | ~jnp.isfinite(grad_norm)
    return cls(
      step=jnp.where(bad, step, cls._NONE).astype(jnp.int32),
      which=jnp.where(bad_loss, 0, 1).astype(jnp.int32),
    )

  def merge(self, other: 'FirstNonFinite') -> 'FirstNonFinite':
    take_other = other.step < self.step
    return type(self)(
      step=jnp.where(take_other, other.step, self.step),
      which=jnp.where(take_other, other.which, self.which),
    )

  def compute(self) -> tuple[int, str] | None:
    step = int(self.step)
    return None if step == self._NONE else (step, ('train_loss', 'grad_norm')[int(self.which)])


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  train_loss: metrics.Average.from_output('loss')
  train_accuracy: metrics.Accuracy
  learning_rate: metrics.LastValue.from_output('learning_rate')
  grad_norm: metrics.Average.from_output('grad_norm')
  nonfinite: FirstNonFinite


def _top5(logits, labels, **_):
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  return (top5 == labels[:, None]).any(axis=-1).astype(jnp.float32)


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  eval_loss: metrics.Average.from_output('loss')
  eval_accuracy: metrics.Accuracy
  eval_top5_accuracy: metrics.Average.from_fun(_top5)


# ----------------------------------------------------------------------------- steps


def _loss(logits, labels, num_classes, label_smoothing):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def train_step(
  state: state_lib.TrainState,
  batch: dict[str, jax.Array],
  *,
  schedule: optax.Schedule,
  num_classes: int,
  label_smoothing: float,
) -> tuple[state_lib.TrainState, TrainMetrics]:
  """One SGD step on a global batch; returns the new state and this step's metrics."""

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
    )
    loss = _loss(logits, batch['label'], num_classes, label_smoothing)
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  step_metrics = TrainMetrics.single_from_model_output(
    loss=loss,
    logits=logits,
    labels=batch['label'],
    learning_rate=schedule(state.step),
    grad_norm=optax.tree.norm(grads),
    step=state.step + 1,
  )
  return new_state, step_metrics


def eval_step(
  model: nn.Module, variables: dict[str, Any], batch: dict[str, jax.Array]
) -> EvalMetrics:
  """Metrics of one (padded) eval batch; padding carries ``mask == 0`` and counts for nothing."""
  logits = model.apply(variables, batch['image'], train=False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  return EvalMetrics.single_from_model_output(
    loss=loss, logits=logits, labels=batch['label'], mask=batch['mask']
  )


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A one-axis ``data`` mesh over ``devices`` (default: every device of every process)."""
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,))
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def jit_train_step(
  mesh: jax.sharding.Mesh, schedule: optax.Schedule, num_classes: int, label_smoothing: float
):
  """The training step as it runs: batch sharded on ``data``, state replicated and donated."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    functools.partial(
      train_step, schedule=schedule, num_classes=num_classes, label_smoothing=label_smoothing
    ),
    in_shardings=(replicated, NamedSharding(mesh, P(DATA_AXIS))),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )


# ----------------------------------------------------------------------------- data on devices


def to_global(batch: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global arrays sharded on ``data``."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), batch)


def prefetch(iterator: Iterator[Batch], sharding: NamedSharding, size: int = 2):
  """Keeps ``size`` batches in flight to the devices (transfers are asynchronous)."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(to_global(batch, sharding))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


# ----------------------------------------------------------------------------- evaluators


@dataclasses.dataclass(frozen=True)
class Context:
  """What evaluators may use of the run they evaluate.

  Attributes:
    config: the run's config.
    spec: its dataset.
    builder: the dataset's TFDS builder.
    model: the network.
    mesh: the devices (batches sharded on ``data``, variables replicated).
  """

  config: ml_collections.ConfigDict
  spec: datasets.DatasetSpec
  builder: Any
  model: nn.Module
  mesh: jax.sharding.Mesh


class Evaluator(Protocol):
  """Evaluates variables; returns scalars and/or ``uint8 [n, h, w, 3]`` images by name."""

  def run(self, variables: dict[str, Any]) -> dict[str, Any]: ...


EvaluatorFactory = Callable[[Context], Evaluator]


class ClassificationEvaluator:
  """Loss, top-1 and top-5 accuracy over every example of the eval split exactly once.

  Returns ``eval_loss``, ``eval_accuracy``, ``eval_top5_accuracy`` and ``eval_examples``
  (the count, so a short eval shows).
  """

  def __init__(self, context: Context):
    self.context = context
    replicated = NamedSharding(context.mesh, P())
    self.data_sharding = NamedSharding(context.mesh, P(DATA_AXIS))
    self.step = jax.jit(
      functools.partial(eval_step, context.model),
      in_shardings=(replicated, self.data_sharding),
      out_shardings=replicated,
    )

  def run(self, variables: dict[str, Any]) -> dict[str, Any]:
    config = self.context.config
    iterator, num_steps = input_pipeline.create_eval_iterator(
      self.context.builder,
      spec=self.context.spec,
      global_batch_size=config.eval_batch_size or config.batch_size,
      image_size=config.image_size,
    )
    collected = None
    for _, batch in zip(range(num_steps), prefetch(iterator, self.data_sharding), strict=False):
      step_metrics = self.step(variables, batch)
      collected = step_metrics if collected is None else collected.merge(step_metrics)
    result = {k: float(v) for k, v in collected.compute().items()}
    result['eval_examples'] = int(collected.eval_loss.count)
    logging.info('Evaluated %d examples in %d batches.', result['eval_examples'], num_steps)
    return result


def _write(writer: metric_writers.MetricWriter, step: int, results: dict[str, Any]) -> None:
  """Scalars as scalars, ``[n, h, w, c]`` arrays as images."""
  images = {k: v for k, v in results.items() if np.ndim(v) == 4}
  scalars = {k: v for k, v in results.items() if k not in images}
  if scalars:
    writer.write_scalars(step, scalars)
  if images:
    writer.write_images(step, images)


# ----------------------------------------------------------------------------- preemption


class _Preemption:
  """Turns SIGTERM into a flag the loop polls; all hosts agree through a sync point."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      return self  # the distributed runtime owns SIGTERM (see should_stop)
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. some notebook runners)
      self._previous = None
    return self

  def _handler(self, signum, frame):
    logging.warning('SIGTERM received: saving a checkpoint at the current step, then exiting.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    # JAX's coordination service catches the SIGTERM on any host and picks one step at
    # which every host sees True, so all of them save the same step.
    return multihost_utils.reached_preemption_sync_point(step)


# ----------------------------------------------------------------------------- the loop


def every(config: ml_collections.ConfigDict, name: str, steps_per_epoch: int) -> int:
  """An interval in steps from ``<name>_epochs`` (if > 0) or ``<name>_steps``.

  In epochs, an interval keeps its meaning when ``batch_size`` changes.
  """
  epochs = config.get(f'{name}_epochs', 0)
  if epochs > 0:
    return max(round(epochs * steps_per_epoch), 1)
  return config[f'{name}_steps']


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  train_data: Callable[[int], Iterator[Batch]] | None = None,
  evaluators: Sequence[EvaluatorFactory] = (ClassificationEvaluator,),
  checkpointer: checkpointing.Checkpointer | None = None,
) -> state_lib.TrainState:
  """Trains (resuming from ``<workdir>/checkpoints`` if any) and evaluates periodically.

  Args:
    config: the experiment (see ``configs/default.py`` for every field).
    workdir: where checkpoints, TensorBoard events and ``config.json`` go (local or
      ``gs://``).
    train_data: this process's training batches from a given step on, ``start_step ->
      iterator`` of ``{'image', 'label'}``; default: the dataset's train pipeline.
    evaluators: built with the run's :class:`Context` and run at every evaluation (and
      alone with ``config.eval_only``); their results go to TensorBoard.
    checkpointer: default: :class:`checkpointing.Checkpointer` of ``workdir``.

  Returns:
    The final train state (replicated over the mesh).
  """
  # Everything a user can get wrong is checked here, before any data is read or compiled.
  config_validation.validate(config)
  checkpointing.check_workdir(workdir)
  workdir = str(checkpointing.workdir_path(workdir))
  spec = datasets.get(config.dataset)
  builder = input_pipeline.get_builder(spec, config.data_dir, image_size=config.image_size)
  config_validation.validate_against_data(config, builder)

  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  steps_per_epoch = input_pipeline.steps_per_epoch(builder, spec, config.batch_size)
  num_train_steps = config.num_train_steps
  if num_train_steps <= 0:
    num_train_steps = int(np.ceil(config.num_epochs * steps_per_epoch))
  pieces = state_lib.setup(
    config, spec.num_classes, steps_per_epoch=steps_per_epoch, num_train_steps=num_train_steps
  )
  context = Context(config, spec, builder, pieces.model, mesh)

  if config.eval_only:
    # The restore path of every tool that applies a trained network; moves and writes nothing.
    trained = checkpointing.load(workdir, config, sharding=replicated)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    with metric_writers.ensure_flushes(writer):
      for factory in evaluators:
        _write(writer, trained.step, factory(context).run(trained.variables))
    return state_lib.TrainState.create(
      apply_fn=pieces.model.apply, tx=pieces.tx, **trained.variables
    ).replace(step=trained.step)

  init = jax.jit(
    functools.partial(state_lib.create, pieces, image_size=config.image_size),
    out_shardings=replicated,
  )
  state = init(jax.random.key(config.seed))
  ckpt = checkpointer or checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  restored = ckpt.restore_latest(checkpointing.state_dict(state))
  if restored is not None:
    state = checkpointing.restore_into(state, restored[0])
    logging.info('Resumed from checkpoint at step %d.', restored[2])
  step_offset = int(state.step)
  checkpointing.write_config(config, workdir)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if step_offset == 0:
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams(_flatten(config.to_dict()))

  p_train_step = jit_train_step(mesh, pieces.schedule, spec.num_classes, config.label_smoothing)
  if train_data is None:
    train_data = functools.partial(
      input_pipeline.create_train_iterator,
      builder,
      spec=spec,
      global_batch_size=config.batch_size,
      image_size=config.image_size,
      seed=config.seed,
    )
  train_iter = prefetch(train_data(start_step=step_offset), NamedSharding(mesh, P(DATA_AXIS)))
  runs = [factory(context) for factory in evaluators]

  hooks = []
  report_progress = periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer)
  if jax.process_index() == 0:
    hooks.append(report_progress)
    if config.profile_steps > 0:
      # After compilation and warm-up: the 10th step of this (possibly resumed) run.
      hooks.append(
        periodic_actions.Profile(
          num_profile_steps=config.profile_steps,
          profile_duration_ms=0,
          first_profile=step_offset + 10,
          logdir=workdir,
        )
      )

  log_every = every(config, 'log_every', steps_per_epoch)
  eval_every = every(config, 'eval_every', steps_per_epoch)
  checkpoint_every = every(config, 'checkpoint_every', steps_per_epoch)
  logging.info(
    'Training from step %d to %d (%d per epoch).', step_offset, num_train_steps, steps_per_epoch
  )
  train_metrics = None
  # ckpt.finally_wait: whatever ends the loop (an error too), saves in flight complete.
  with metric_writers.ensure_flushes(writer), _Preemption() as preemption, ckpt.finally_wait():
    for step in range(step_offset, num_train_steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, step_metrics = p_train_step(state, next(train_iter))
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      done = step + 1
      for hook in hooks:
        hook(done)
      is_last = done == num_train_steps
      stop = not is_last and preemption.should_stop(done)
      log = done % log_every == 0 or is_last
      save = done % checkpoint_every == 0 or is_last or stop
      if train_metrics is not None and (log or save):
        # Never write a checkpoint (or a log line) of a diverged state.
        _check_finite(train_metrics)
        if log:
          summary = train_metrics.compute()
          summary.pop('nonfinite')
          writer.write_scalars(done, {k: float(v) for k, v in summary.items()})
          train_metrics = None
      if not stop and (done % eval_every == 0 or is_last):
        with report_progress.timed('eval'):
          for run in runs:
            _write(writer, done, run.run(state_lib.variables(state)))
      if save:
        with report_progress.timed('checkpoint'):
          ckpt.save(
            done, checkpointing.state_dict(state), {'step': done, 'config': config.to_dict()}
          )
      if stop:
        ckpt.wait()
        logging.warning(
          'Preempted: checkpoint saved at step %d; rerun the same command to resume.', done
        )
        break
  return state


def _check_finite(train_metrics: TrainMetrics) -> None:
  found = train_metrics.nonfinite.compute()
  if found is not None:
    step, name = found
    raise FloatingPointError(
      f'{name} became NaN/inf at step {step}; stopped without saving, so the last checkpoint '
      'is the last good state. Lower learning_rate or check the data, then rerun to resume.'
    )


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      flat.update(_flatten(value, name + '.'))
    else:
      flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
  return flat
