"""Training and evaluation: ``train_and_evaluate(config, workdir) -> state``.

One compiled step, ``jax.jit`` over a one-axis ``Mesh`` of every device of every process:
the batch is sharded on ``data``, the state replicated, BatchNorm statistics are computed
over the global batch (XLA inserts the reductions). The input position needs no state of
its own: the pipeline is a deterministic function of ``(seed, step)``, so resuming at step
``k`` replays exactly the batches an uninterrupted run would have seen.

The step, its loss and metrics are :mod:`gsa_flax.train.steps`; what is measured at every
evaluation, :mod:`gsa_flax.train.evaluators`. A moving average of the parameters, when the config
keeps one, is updated inside the step and evaluated next to the raw parameters
(``ema_eval_*`` next to ``eval_*``). A new run may start from trained weights
(``config.init_from``, :mod:`gsa_flax.train.finetune`); a run that has checkpoints resumes from its
own and never reads them.

What a test, a tool or a notebook may want to vary is a parameter of
:func:`train_and_evaluate`: the training data, the evaluators (small classes with
``run(variables) -> {name: value}``, big_vision style) and the checkpointer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gsa_flax.data import datasets, input_pipeline
from gsa_flax.model import selfcheck
from gsa_flax.train import (
  checkpoints,
  config_validation,
  experiment,
  finetune,
  lock,
  preemption,
  restore,
  steps,
)
from gsa_flax.train import evaluators as evaluators_lib
from gsa_flax.train import state as state_lib
from gsa_flax.train import workdir as workdir_lib

RULES = config_validation.RECORD_RULES


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  train_data: Callable[[int], Iterator[steps.Batch]] | None = None,
  evaluators: Sequence[evaluators_lib.EvaluatorFactory] = (evaluators_lib.ClassificationEvaluator,),
  checkpointer: checkpoints.Checkpointer | None = None,
) -> state_lib.TrainState:
  """Trains (resuming from ``<workdir>/checkpoints`` if any) and evaluates periodically.

  The run holds the workdir's lock (:func:`lock.lock`, process 0) from start to
  end, compares ``config`` with the workdir's record (``config.json``; see
  :mod:`gsa_flax.train.workdir`) before anything is written, and ends with one summary
  line: the final metrics, the checkpoint and the TensorBoard command. SIGTERM or SIGINT
  saves the current step and returns.

  Args:
    config: the experiment (see ``configs/default.py`` for every field).
    workdir: where checkpoints, TensorBoard events and ``config.json`` go (local or
      ``gs://``).
    train_data: this process's training batches from a given step on, ``start_step ->
      iterator`` of ``{'image', 'label'}`` with images on the 0..255 scale (normalised in
      the step with the dataset's statistics); default: the dataset's train pipeline.
    evaluators: built with the run's :class:`gsa_flax.train.evaluators.Context` and run at every
      evaluation (and alone with ``config.eval_only``); their results go to TensorBoard.
    checkpointer: default: :class:`checkpoints.Checkpointer` of ``workdir``.

  Returns:
    The final train state (replicated over the mesh).
  """
  # Everything a user can get wrong is checked here, before any data is read or compiled.
  config_validation.validate(config)
  workdir_lib.check_workdir(workdir, evaluate_only=config.eval_only)
  workdir = str(workdir_lib.workdir_path(workdir))
  spec = datasets.get(config.dataset)
  builder = input_pipeline.get_builder(spec, config.data_dir, image_size=config.image_size)
  config_validation.validate_against_data(config, builder)
  steps_per_epoch = input_pipeline.steps_per_epoch(builder, spec, config.batch_size)
  num_train_steps = experiment.run_length(config, steps_per_epoch)
  config_validation.validate_schedule(config, steps_per_epoch, num_train_steps)
  pieces = experiment.setup(
    config, spec.num_classes, steps_per_epoch=steps_per_epoch, num_train_steps=num_train_steps
  )
  # A run's own checkpoints take precedence: init_from is read only by a run that has none.
  start = None
  if config.init_from and not config.eval_only and not workdir_lib.has_checkpoints(workdir):
    start = finetune.read_init_from(
      config.init_from, pieces.model, config.image_size, name=config.model
    )
  with contextlib.ExitStack() as stack:
    stop = stack.enter_context(preemption.StopRequests())
    # One writer: a second run refuses here, having written nothing.
    preemption.on_process_0(lambda: stack.enter_context(lock.lock(workdir)))
    changes = preemption.on_process_0(
      lambda: workdir_lib.check_against_record(config, workdir, RULES)
    )
    mesh = steps.make_mesh()
    context = evaluators_lib.Context(
      spec,
      builder,
      pieces.model,
      mesh,
      image_size=config.image_size,
      eval_batch_size=config.eval_batch_size or config.batch_size,
      stop_requested=stop.during_evaluation,
    )
    if config.eval_only:
      return _evaluate_only(config, context, workdir, pieces, evaluators, stop)
    return _train(
      config,
      context,
      workdir,
      pieces,
      stop,
      changes=changes or {},
      steps_per_epoch=steps_per_epoch,
      num_train_steps=num_train_steps,
      train_data=train_data,
      evaluators=evaluators,
      checkpointer=checkpointer,
      start=start,
    )


def _evaluate_only(
  config: ml_collections.ConfigDict,
  context: evaluators_lib.Context,
  workdir: str,
  pieces: state_lib.Setup,
  evaluators: Sequence[evaluators_lib.EvaluatorFactory],
  stop: preemption.StopRequests,
) -> state_lib.TrainState:
  """Evaluates the newest intact checkpoint (its raw parameters and, if it has one, their
  moving average); moves nothing and never writes config.json."""
  trained = restore.load(workdir, config, sharding=NamedSharding(context.mesh, P()), raw=True)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  latest = {}
  runs = [factory(context) for factory in evaluators]
  with metric_writers.ensure_flushes(writer):
    results = evaluators_lib.evaluate(
      runs,
      evaluators_lib.weights_to_evaluate(trained.variables, trained.ema_params),
      stop.during_evaluation,
    )
    if results is not None:
      evaluators_lib.write(writer, trained.step, results, latest)
  if stop.requested:
    ending = f'Evaluation of step {trained.step} stopped by {stop.requested}'
  else:
    ending = f'Evaluated the checkpoint of step {trained.step}'
  _log_summary(f'{ending}: {_metrics(latest)}.', workdir)
  return state_lib.TrainState.create(
    apply_fn=pieces.model.apply,
    tx=pieces.tx,
    **trained.variables,
    ema_params=trained.ema_params,
    ema_decay=pieces.ema_decay,
  ).replace(step=trained.step)


def _train(
  config: ml_collections.ConfigDict,
  context: evaluators_lib.Context,
  workdir: str,
  pieces: state_lib.Setup,
  stop: preemption.StopRequests,
  *,
  changes: dict[str, tuple[Any, Any]],
  steps_per_epoch: int,
  num_train_steps: int,
  train_data: Callable[[int], Iterator[steps.Batch]] | None,
  evaluators: Sequence[evaluators_lib.EvaluatorFactory],
  checkpointer: checkpoints.Checkpointer | None,
  start: finetune.Start | None,
) -> state_lib.TrainState:
  """The loop of :func:`train_and_evaluate` (the workdir is locked and checked)."""
  spec, mesh = context.spec, context.mesh
  replicated = NamedSharding(mesh, P())
  ckpt = checkpointer or checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
  for path in ckpt.discard_partial():
    logging.warning('Removed %s, left by a save that did not finish.', path)
  if config.init_from and start is None and not ckpt.steps():
    start = finetune.read_init_from(
      config.init_from, pieces.model, config.image_size, name=config.model
    )  # only unfinished saves were there
  init = jax.jit(
    functools.partial(state_lib.create, pieces, image_size=config.image_size),
    out_shardings=replicated,
  )
  state = init(jax.random.key(config.seed))
  restored = ckpt.restore_latest(state_lib.state_dict(state))
  origin = ''
  if restored is not None:
    state = state_lib.restore_into(state, restored[0])
    origin = restored[1].get('init_from', '')
    logging.info('Resumed from checkpoint at step %d.', restored[2])
    if config.init_from:
      logging.info(
        'config.init_from=%s is not read: the run continues from its own checkpoint.',
        config.init_from,
      )
  elif start is not None:
    state = finetune.start_from(state, start, replicated)
    origin = start.origin
    logging.info(
      'config.init_from: starting from %s; the optimizer and the step start fresh.', origin
    )
  step_offset = int(state.step)
  if step_offset > num_train_steps:
    raise config_validation.ConfigError(
      f'this run has trained {step_offset} steps (its newest checkpoint), more than the '
      f'{num_train_steps} the config asks for (num_train_steps={config.num_train_steps}, '
      f'num_epochs={config.num_epochs}): a run cannot be shortened; use a new --workdir to '
      'train a shorter one.'
    )
  preemption.on_process_0(
    lambda: _update_record(config, workdir, changes, step_offset, pieces, context.builder)
  )
  started_from = f' Started from {origin}.' if origin else ''
  path = ckpt.directory / str(step_offset)
  if step_offset == num_train_steps:
    _log_summary(
      f'Nothing to train: the run was complete at step {step_offset} ({path}).{started_from}',
      workdir,
    )
    return state

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if step_offset == 0:
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams(_flatten(config.to_dict()))

  p_train_step = steps.jit_train_step(
    mesh,
    pieces.schedule,
    spec.num_classes,
    config.label_smoothing,
    image_stats=(spec.mean_rgb, spec.stddev_rgb),
  )
  if train_data is None:
    train_data = functools.partial(
      input_pipeline.create_train_iterator,
      context.builder,
      spec=spec,
      global_batch_size=config.batch_size,
      image_size=config.image_size,
      seed=config.seed,
      augment=input_pipeline.Augment(**config.augment),
    )
  train_iter = steps.prefetch(
    train_data(start_step=step_offset), NamedSharding(mesh, P(steps.DATA_AXIS))
  )
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

  log_every = experiment.every(config, 'log_every', steps_per_epoch)
  eval_every = experiment.every(config, 'eval_every', steps_per_epoch)
  checkpoint_every = experiment.every(config, 'checkpoint_every', steps_per_epoch)
  logging.info(
    'Training from step %d to %d (%d per epoch).', step_offset, num_train_steps, steps_per_epoch
  )
  if selfcheck.kernels_selected(pieces.model):
    # The kernels' first execution on this device is checked against the einsum ops here,
    # before the first step, not found out from a run that learns worse.
    checked = selfcheck.verify(
      pieces.model, config.image_size, implementation=selfcheck.implementation_of(pieces.model)
    )
    if checked:
      logging.info('%s', selfcheck.summary(checked))
  meta = {'config': config.to_dict()}
  if origin:
    meta['init_from'] = origin
  train_metrics, latest, done, stopped = None, {}, step_offset, False
  # ckpt.finally_wait: whatever ends the loop (an error too), saves in flight complete.
  with metric_writers.ensure_flushes(writer), ckpt.finally_wait():
    for step in range(step_offset, num_train_steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, step_metrics = p_train_step(state, next(train_iter))
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      done = step + 1
      for hook in hooks:
        hook(done)
      ckpt.check()  # a save that failed in the background stops the run now
      is_last = done == num_train_steps
      stopped = not is_last and stop.should_stop(done)
      log = done % log_every == 0 or is_last
      save = done % checkpoint_every == 0 or is_last or stopped
      if train_metrics is not None and (log or save):
        # Never write a checkpoint (or a log line) of a diverged state.
        _check_finite(train_metrics)
        if log:
          summary = train_metrics.compute()
          summary.pop('nonfinite')
          evaluators_lib.write(writer, done, {k: float(v) for k, v in summary.items()}, latest)
          train_metrics = None
      if not stopped and (done % eval_every == 0 or is_last):
        logging.info('Evaluating at step %d.', done)
        with report_progress.timed('eval'):
          results = evaluators_lib.evaluate(
            runs,
            evaluators_lib.weights_to_evaluate(state_lib.variables(state), state.ema_params),
            stop.during_evaluation,
          )
        if results is None:
          logging.warning('Evaluation at step %d stopped early; nothing of it is written.', done)
          stopped = save = True
        else:
          evaluators_lib.write(writer, done, results, latest)
      if save:
        with report_progress.timed('checkpoint'):
          tree = state_lib.state_dict(state)
          try:
            ckpt.save(done, tree, {'step': done, **meta})
          except checkpoints.SaveError:
            raise
          except Exception as error:  # noqa: BLE001  any failure to save is one line
            raise ckpt.save_failed(done, error, checkpoints.nbytes(tree)) from None
      if stopped:
        ckpt.wait()
        break
  path = ckpt.directory / str(done)
  if stopped:
    ending = (
      f'Stopped by {stop.requested or "preemption"}: checkpoint saved at step {done} ({path}); '
      'rerun the same command to resume'
    )
  else:
    ending = f'Training complete at step {done}, checkpoint {path}'
  if stopped and jax.process_index() > 0:
    logging.warning('%s.', ending)  # every host says which step it saved
  _log_summary(f'{ending}. {_metrics(latest)}.{started_from}', workdir)
  return state


def _update_record(
  config: ml_collections.ConfigDict,
  workdir: str,
  changes: dict[str, tuple[Any, Any]],
  step: int,
  pieces: state_lib.Setup,
  builder: Any,
) -> None:
  """Writes the record of a new run, or the accepted changes of a resumed one (process 0).

  A change to the schedule is announced with the learning rate of the next step under the
  recorded schedule and under the new one (extending a finished run restarts the cosine
  from near its peak).
  """
  if not workdir_lib.has_config(workdir):
    if step > 0:
      logging.warning('%s had no config.json; recording this config.', workdir)
    workdir_lib.write_config(config, workdir)
    return
  if not changes:
    return
  if step > 0:
    record = workdir_lib.read_config(workdir, RULES)
    spec = datasets.get(config.dataset)
    recorded_steps_per_epoch = input_pipeline.steps_per_epoch(builder, spec, record.batch_size)
    recorded_length = experiment.run_length(record, recorded_steps_per_epoch)
    recorded = state_lib.learning_rate_schedule(
      experiment.optimizer(record), recorded_steps_per_epoch, recorded_length
    )
    before, after = float(recorded(step)), float(pieces.schedule(step))
    if not np.isclose(before, after, rtol=1e-6, atol=0.0):
      ended = ', which had ended' if step >= recorded_length else ''
      new_length = experiment.run_length(
        config, input_pipeline.steps_per_epoch(builder, spec, config.batch_size)
      )
      logging.warning(
        "The learning rate of step %d changes from %.6g (config.json's schedule of %d steps%s) "
        'to %.6g (the new schedule of %d steps, peak %.6g).',
        step + 1,
        before,
        recorded_length,
        ended,
        after,
        new_length,
        config.learning_rate * config.batch_size / 256,
      )
  logging.warning(
    'Accepted config changes (recorded in %s): %s.',
    workdir_lib.HISTORY_FILE,
    ', '.join(f'{name} {old!r} -> {new!r}' for name, (old, new) in changes.items()),
  )
  workdir_lib.record_changes(workdir, changes, step, RULES)


def _metrics(latest: dict[str, Any]) -> str:
  names = ('train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy', 'eval_top5_accuracy')
  shown = [k for k in names if k in latest]
  shown += [evaluators_lib.EMA_PREFIX + k for k in names if evaluators_lib.EMA_PREFIX + k in latest]
  if not shown:
    return 'no metrics written'
  return 'latest ' + ', '.join(f'{k}={latest[k]:.4g}' for k in shown)


def _log_summary(text: str, workdir: str) -> None:
  """The run's last line (process 0): what it produced and how to look at it."""
  if jax.process_index() == 0:
    logging.info('%s TensorBoard: tensorboard --logdir=%s', text, workdir)


def _check_finite(train_metrics: steps.TrainMetrics) -> None:
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
