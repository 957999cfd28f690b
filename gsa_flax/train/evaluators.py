"""Evaluators: what a run measures at every evaluation, big_vision style.

An evaluator is built once per run with the run's :class:`Context` and its ``run(variables)``
returns scalars and/or ``uint8 [n, h, w, 3]`` images by name, which the trainer writes to
TensorBoard. :class:`ClassificationEvaluator` is the loss and accuracy over the eval split;
:class:`gsa_flax.tools.attention_maps.AttentionMapEvaluator` draws attention maps. When the
state keeps a moving average of the parameters, every evaluator runs on the raw parameters
and on the average (``ema_`` prefix: :func:`weights_to_evaluate`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from clu import metric_writers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gsa_flax.data import datasets, input_pipeline
from gsa_flax.train.steps import DATA_AXIS, Batch, eval_step, prefetch


def _never() -> bool:
  return False


@dataclasses.dataclass(frozen=True)
class Context:
  """What evaluators may use of the run they evaluate.

  Attributes:
    spec: the run's dataset.
    builder: the dataset's TFDS builder.
    model: the network.
    mesh: the devices (batches sharded on ``data``, variables replicated).
    image_size: the evaluation resolution.
    eval_batch_size: the global evaluation batch.
    stop_requested: whether the run has been asked to stop (SIGTERM, SIGINT). An evaluator
      that loops over batches polls it between them and returns early when it is True;
      whatever it returns then is discarded, and the run saves a checkpoint and exits.
      Always False on multi-host runs, where every host must run the same batches.
  """

  spec: datasets.DatasetSpec
  builder: Any
  model: nn.Module
  mesh: jax.sharding.Mesh
  image_size: int
  eval_batch_size: int
  stop_requested: Callable[[], bool] = _never


class Evaluator(Protocol):
  """Evaluates variables; returns scalars and/or ``uint8 [n, h, w, 3]`` images by name.

  Built once per run with the run's :class:`Context`; ``run`` is called at every
  evaluation. A long ``run`` polls ``context.stop_requested()`` and returns early.
  """

  def run(self, variables: dict[str, Any]) -> dict[str, Any]: ...


EvaluatorFactory = Callable[[Context], Evaluator]


class ClassificationEvaluator:
  """Loss, top-1 and top-5 accuracy over every example of the eval split exactly once.

  Returns ``eval_loss``, ``eval_accuracy``, ``eval_top5_accuracy`` and ``eval_examples``
  (the count, so a short eval shows). Stops between batches when the run is asked to
  stop (``context.stop_requested``), returning ``{}``.

  Args:
    context: the run.
    batches: ``() -> (iterator, count)`` of padded eval batches (``image`` on the 0..255
      scale, normalised in the step with the dataset's statistics, ``label``, ``mask``)
      for one evaluation; default: one pass over the dataset's eval split.
  """

  def __init__(
    self,
    context: Context,
    batches: Callable[[], tuple[Iterator[Batch], int]] | None = None,
  ):
    self.context = context
    self.batches = batches or functools.partial(
      input_pipeline.create_eval_iterator,
      context.builder,
      spec=context.spec,
      global_batch_size=context.eval_batch_size,
      image_size=context.image_size,
    )
    replicated = NamedSharding(context.mesh, P())
    self.data_sharding = NamedSharding(context.mesh, P(DATA_AXIS))
    self.step = jax.jit(
      functools.partial(
        eval_step, context.model, image_stats=(context.spec.mean_rgb, context.spec.stddev_rgb)
      ),
      in_shardings=(replicated, self.data_sharding),
      out_shardings=replicated,
    )

  def run(self, variables: dict[str, Any]) -> dict[str, Any]:
    iterator, num_steps = self.batches()
    collected = None
    for _, batch in zip(range(num_steps), prefetch(iterator, self.data_sharding), strict=False):
      if self.context.stop_requested():
        return {}
      step_metrics = self.step(variables, batch)
      collected = step_metrics if collected is None else collected.merge(step_metrics)
    result = {k: float(v) for k, v in collected.compute().items()}
    result['eval_examples'] = int(collected.eval_loss.count)
    logging.info('Evaluated %d examples in %d batches.', result['eval_examples'], num_steps)
    return result


def write(
  writer: metric_writers.MetricWriter, step: int, results: dict[str, Any], latest: dict[str, Any]
) -> None:
  """Scalars as scalars, ``[n, h, w, c]`` arrays as images; scalars also into ``latest``."""
  images = {k: v for k, v in results.items() if np.ndim(v) == 4}
  scalars = {k: v for k, v in results.items() if k not in images}
  if scalars:
    writer.write_scalars(step, scalars)
    latest.update(scalars)
  if images:
    writer.write_images(step, images)


# Results of evaluating the moving average of the parameters carry this prefix
# (``ema_eval_accuracy``); those of the raw parameters are unprefixed (``eval_accuracy``).
EMA_PREFIX = 'ema_'


def weights_to_evaluate(
  variables: dict[str, Any], ema_params: Any
) -> list[tuple[str, dict[str, Any]]]:
  """``(prefix, variables)``: the raw parameters, then their moving average if kept (with
  the same BatchNorm statistics)."""
  evaluated = [('', variables)]
  if ema_params is not None:
    evaluated.append((EMA_PREFIX, {**variables, 'params': ema_params}))
  return evaluated


def evaluate(
  runs: Sequence[Evaluator],
  evaluated: Sequence[tuple[str, dict[str, Any]]],
  stopped: Callable[[], bool],
) -> dict[str, Any] | None:
  """Every evaluator on every set of weights; None if a stop request cut it short."""
  results = {}
  for prefix, variables in evaluated:
    for run in runs:
      found = run.run(variables)
      if stopped():
        return None
      results.update({prefix + name: value for name, value in found.items()})
  return results
