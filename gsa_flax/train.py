"""Training and evaluation: ``train_and_evaluate(config, workdir) -> state``.

One compiled step, ``jax.jit`` over a one-axis ``Mesh`` of every device of every process:
the batch is sharded on ``data``, the state replicated, BatchNorm statistics are computed
over the global batch (XLA inserts the reductions). The input position needs no state of
its own: the pipeline is a deterministic function of ``(seed, step)``, so resuming at step
``k`` replays exactly the batches an uninterrupted run would have seen.
"""

import collections
import functools
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, metrics, parameter_overview, periodic_actions
from etils import epath
from flax import serialization
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gsa_flax import checkpointing, config_validation, input_pipeline, models, visualize

DATA_AXIS = 'data'


class TrainState(train_state.TrainState):
  """Parameters, optimizer state and step, plus the BatchNorm running statistics."""

  batch_stats: Any


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


# ----------------------------------------------------------------------------- model + optimizer


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The network named by ``config.model`` with every knob of the config applied."""
  gsa = config.gsa
  kwargs = dict(
    num_classes=num_classes,
    num_filters=config.num_filters,
    small_stem=config.small_stem,
    dtype=jnp.dtype(config.dtype),
    num_heads=gsa.num_heads,
    key_ratio=gsa.key_ratio,
    rel_length=gsa.rel_length or None,
    content=gsa.content,
    positional=gsa.positional,
    position_embedding=gsa.position_embedding,
    normalize_queries=gsa.normalize_queries,
    positional_softmax=gsa.positional_softmax,
  )
  if config.stage_sizes:
    kwargs['stage_sizes'] = tuple(config.stage_sizes)
  if gsa.attention_stages:
    kwargs['attention_stages'] = tuple(gsa.attention_stages)
  return models.create_model(config.model, **kwargs)


def learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> optax.Schedule:
  """Linear warmup to ``learning_rate * batch_size / 256``, then cosine decay to zero."""
  peak = config.learning_rate * config.batch_size / 256.0
  warmup = min(int(config.warmup_epochs * steps_per_epoch), max(num_train_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(num_train_steps, 1)
  )


def create_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule):
  """SGD with (Nesterov) momentum; weight decay on kernels and embeddings, not on BN or biases."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
    optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
  )


def create_train_state(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  image_size: int,
) -> TrainState:
  """Initialises parameters, BatchNorm statistics and optimizer state (float32)."""
  variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    tx=tx,
  )


# ----------------------------------------------------------------------------- steps


def _loss(logits, labels, num_classes, label_smoothing, mask=None):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  losses = optax.softmax_cross_entropy(logits, targets)
  if mask is None:
    return losses.mean()
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  schedule: optax.Schedule,
  num_classes: int,
  label_smoothing: float,
) -> tuple[TrainState, TrainMetrics]:
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


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, num_classes: int) -> EvalMetrics:
  """Metrics of one (padded) eval batch; padding carries ``mask == 0`` and counts for nothing."""
  logits = state.apply_fn(
    {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False
  )
  mask = batch['mask']
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  return EvalMetrics.single_from_model_output(
    loss=loss, logits=logits, labels=batch['label'], mask=mask
  )


# ----------------------------------------------------------------------------- data on devices


def make_mesh() -> jax.sharding.Mesh:
  """A one-axis mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,))


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global arrays sharded on ``data``."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), batch)


def prefetch(iterator: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, size: int = 2):
  """Keeps ``size`` batches in flight to the devices (transfers are asynchronous)."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(to_global(batch, sharding))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def evaluate(
  eval_step_fn, state: TrainState, builder, config, data_sharding: NamedSharding
) -> dict[str, float]:
  """Evaluates on every example of the eval split exactly once."""
  iterator, num_steps = input_pipeline.create_eval_iterator(
    builder,
    dataset=config.dataset,
    global_batch_size=config.eval_batch_size or config.batch_size,
    image_size=config.image_size,
  )
  collected = None
  for _, batch in zip(range(num_steps), prefetch(iterator, data_sharding), strict=False):
    step_metrics = eval_step_fn(state, batch)
    collected = step_metrics if collected is None else collected.merge(step_metrics)
  result = {k: float(v) for k, v in collected.compute().items()}
  result['eval_examples'] = int(collected.eval_loss.count)
  logging.info('Evaluated %d examples in %d batches.', result['eval_examples'], num_steps)
  return result


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


def state_dict(state: TrainState) -> dict[str, Any]:
  """The checkpoint layout of a train state: step, params, batch_stats, opt_state."""
  return serialization.to_state_dict(
    {
      'step': state.step,
      'params': state.params,
      'batch_stats': state.batch_stats,
      'opt_state': state.opt_state,
    }
  )


def _restore_into(state: TrainState, restored: dict[str, Any]) -> TrainState:
  return state.replace(
    step=restored['step'],
    params=serialization.from_state_dict(state.params, restored['params']),
    batch_stats=serialization.from_state_dict(state.batch_stats, restored['batch_stats']),
    opt_state=serialization.from_state_dict(state.opt_state, restored['opt_state']),
  )


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    path = epath.Path(workdir) / 'config.json'
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from ``<workdir>/checkpoints`` if any) and evaluates periodically.

  Args:
    config: the experiment (see ``configs/default.py`` for every field).
    workdir: where checkpoints, TensorBoard events and ``config.json`` go.

  Returns:
    The final train state (replicated over the mesh).
  """
  # Everything a user can get wrong is checked here, before any data is read or compiled.
  config_validation.validate(config, workdir)
  if not str(workdir).startswith(('gs://', 's3://')):
    workdir = os.path.abspath(workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  builder = input_pipeline.get_builder(
    config.dataset, config.data_dir, image_size=config.image_size
  )
  config_validation.validate_against_data(config, builder)
  num_classes = input_pipeline.num_classes(builder)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P(DATA_AXIS))

  steps_per_epoch = input_pipeline.steps_per_epoch(builder, config.dataset, config.batch_size)
  num_train_steps = config.num_train_steps
  if num_train_steps <= 0:
    num_train_steps = int(np.ceil(config.num_epochs * steps_per_epoch))
  schedule = learning_rate_schedule(config, steps_per_epoch, num_train_steps)
  model = create_model(config, num_classes)
  tx = create_optimizer(config, schedule)

  init = jax.jit(
    functools.partial(create_train_state, config, model, tx, image_size=config.image_size),
    out_shardings=replicated,
  )
  state = init(jax.random.key(config.seed))

  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  restored = ckpt.restore_latest(state_dict(state))
  if restored is not None:
    state = _restore_into(state, restored[0])
    logging.info('Resumed from checkpoint at step %d.', restored[2])
  step_offset = int(state.step)
  _save_config(config, workdir)

  p_eval_step = jax.jit(
    functools.partial(eval_step, num_classes=num_classes),
    in_shardings=(replicated, data_sharding),
    out_shardings=replicated,
  )
  if config.eval_only:
    if restored is None:
      raise FileNotFoundError(
        f'eval_only=True but {ckpt.directory} holds no checkpoint; train first or fix --workdir.'
      )
    results = evaluate(p_eval_step, state, builder, config, data_sharding)
    writer.write_scalars(step_offset, results)
    if config.attention_maps and jax.process_index() == 0:
      visualize.write_attention_maps(writer, step_offset, state, model, builder, config)
    writer.flush()
    return state

  if step_offset == 0:
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams(_flatten(config.to_dict()))

  p_train_step = jax.jit(
    functools.partial(
      train_step,
      schedule=schedule,
      num_classes=num_classes,
      label_smoothing=config.label_smoothing,
    ),
    in_shardings=(replicated, data_sharding),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
  train_iter = input_pipeline.create_train_iterator(
    builder,
    dataset=config.dataset,
    global_batch_size=config.batch_size,
    image_size=config.image_size,
    seed=config.seed,
    start_step=step_offset,
  )
  train_iter = prefetch(train_iter, data_sharding)

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

  def save(step: int) -> None:
    ckpt.save(step, state_dict(state), {'step': step, 'config': config.to_dict()})

  logging.info(
    'Training from step %d to %d (%d per epoch).', step_offset, num_train_steps, steps_per_epoch
  )
  train_metrics = None
  # ckpt.finally_wait: whatever ends the loop (an error too), saves in flight complete.
  with metric_writers.ensure_flushes(writer), _Preemption() as preemption, ckpt.finally_wait():
    for step in range(step_offset, num_train_steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = next(train_iter)
        state, step_metrics = p_train_step(state, batch)
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      done = step + 1
      for hook in hooks:
        hook(done)
      is_last = done == num_train_steps
      must_save = done % config.checkpoint_every_steps == 0 or is_last
      if done % config.log_every_steps == 0 or is_last or must_save:
        # Never write a checkpoint (or a log line) of a diverged state.
        _check_finite(train_metrics)
        if done % config.log_every_steps == 0 or is_last:
          summary = train_metrics.compute()
          summary.pop('nonfinite')
          writer.write_scalars(done, {k: float(v) for k, v in summary.items()})
          train_metrics = None
      if done % config.eval_every_steps == 0 or is_last:
        with report_progress.timed('eval'):
          writer.write_scalars(done, evaluate(p_eval_step, state, builder, config, data_sharding))
          if config.attention_maps and jax.process_index() == 0:
            visualize.write_attention_maps(writer, done, state, model, builder, config)
      if must_save:
        with report_progress.timed('checkpoint'):
          save(done)
      if not is_last and preemption.should_stop(done):
        if not must_save:  # (a periodic save of this step is already under way)
          if train_metrics is not None:
            _check_finite(train_metrics)
          save(done)
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
