"""The training state and what it is made of: model, learning-rate schedule, optimizer.

:func:`setup` turns a network and the optimisation settings into the pieces every user of
a train state needs (the trainer, the checkpoint readers, the tools that size or restore a
run); :func:`create` initialises a state and :func:`abstract` is its shape-only twin
(nothing computed), the target a checkpoint is restored into. :func:`state_dict` is the
layout a checkpoint stores, :func:`restore_into` its inverse.

With ``ema_decay > 0`` the state also keeps an exponential moving average of the
parameters (``ema_params``), updated by every :meth:`TrainState.apply_gradients`; with 0
``ema_params`` is None and the state is what it was without averaging.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import optax
from flax import serialization, struct
from flax.training import train_state

from gsa_flax.model import networks


class TrainState(train_state.TrainState):
  """Parameters, optimizer state and step, the BatchNorm running statistics and, when on,
  the moving average of the parameters.

  Attributes:
    batch_stats: BatchNorm running statistics (updated by the forward pass, not averaged:
      the average of the parameters is evaluated with these statistics).
    ema_params: ``ema = ema_decay * ema + (1 - ema_decay) * params`` after every update,
      started from the parameters the run starts with (its initialisation, or the weights
      of ``init_from``); None when averaging is off.
    ema_decay: the decay of the average (0 when off); a constant of the state, not an array.
  """

  batch_stats: Any
  ema_params: Any = None
  ema_decay: float = struct.field(pytree_node=False, default=0.0)

  def apply_gradients(self, *, grads, **kwargs) -> TrainState:
    """One optimizer update (``train_state.TrainState``'s), then the moving average's."""
    new = super().apply_gradients(grads=grads, **kwargs)
    if self.ema_params is None:
      return new
    decay = self.ema_decay
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, self.ema_params, new.params)
    return new.replace(ema_params=ema)


@dataclasses.dataclass(frozen=True)
class Setup:
  """A config's network, schedule and optimizer.

  Attributes:
    model: the network (:func:`gsa_flax.model.networks.build`).
    schedule: learning rate by step.
    tx: the optimizer (uses ``schedule``).
    ema_decay: the decay of the parameters' moving average; 0 keeps none.
  """

  model: nn.Module
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  ema_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The optimisation fields of an experiment (``configs/default.py`` documents them).

  Attributes:
    learning_rate: peak learning rate per 256 examples.
    batch_size: the global batch (the peak is ``learning_rate * batch_size / 256``).
    warmup_epochs: linear warmup, then cosine decay to zero.
    momentum: SGD momentum.
    nesterov: Nesterov momentum.
    weight_decay: L2 on kernels and embeddings (not on BatchNorm or biases).
  """

  learning_rate: float
  batch_size: int
  warmup_epochs: float
  momentum: float
  nesterov: bool
  weight_decay: float


def learning_rate_schedule(
  optimizer: Optimizer, steps_per_epoch: int, num_train_steps: int
) -> optax.Schedule:
  """Linear warmup to ``learning_rate * batch_size / 256``, then cosine decay to zero.

  Args:
    optimizer: the peak (``learning_rate``, ``batch_size``) and ``warmup_epochs``.
    steps_per_epoch: training steps per epoch of the train split.
    num_train_steps: length of the whole run in steps (the end of the cosine).
  """
  peak = optimizer.learning_rate * optimizer.batch_size / 256.0
  warmup = warmup_steps(optimizer.warmup_epochs, steps_per_epoch, num_train_steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(num_train_steps, 1)
  )


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, num_train_steps: int) -> int:
  """Steps of linear warmup: ``warmup_epochs`` of steps, at most the run's length minus one."""
  return min(int(warmup_epochs * steps_per_epoch), max(num_train_steps - 1, 0))


def create_optimizer(
  optimizer: Optimizer, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum; weight decay on kernels and embeddings, not on BN or biases."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
    optax.add_decayed_weights(optimizer.weight_decay, mask=decay_mask),
    optax.sgd(schedule, momentum=optimizer.momentum, nesterov=optimizer.nesterov),
  )


def setup(
  architecture: networks.Architecture,
  optimizer: Optimizer,
  num_classes: int,
  *,
  ema_decay: float = 0.0,
  steps_per_epoch: int | None = None,
  num_train_steps: int | None = None,
) -> Setup:
  """The model, schedule and optimizer of a run.

  Args:
    architecture: the network.
    optimizer: the optimisation settings.
    num_classes: the dataset's number of classes.
    ema_decay: the decay of the parameters' moving average; 0 keeps none.
    steps_per_epoch, num_train_steps: the run's length, for the schedule; without them
      (tools that only restore or size a state) the schedule is a constant zero, which
      gives the optimizer state the same structure.
  """
  if steps_per_epoch is None or num_train_steps is None:
    schedule = optax.constant_schedule(0.0)
  else:
    schedule = learning_rate_schedule(optimizer, steps_per_epoch, num_train_steps)
  return Setup(
    networks.build(architecture, num_classes),
    schedule,
    create_optimizer(optimizer, schedule),
    ema_decay=float(ema_decay),
  )


def create(pieces: Setup, rng: jax.Array, image_size: int) -> TrainState:
  """Initialises parameters, BatchNorm statistics and optimizer state (float32), and the
  parameters' moving average (equal to the parameters) when ``pieces.ema_decay > 0``.

  Args:
    pieces: from :func:`setup`.
    rng: the initialisation key.
    image_size: the training resolution (global position tables are sized from it).
  """
  variables = networks.init_variables(pieces.model, rng, image_size)
  return TrainState.create(
    apply_fn=pieces.model.apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    tx=pieces.tx,
    ema_params=variables['params'] if pieces.ema_decay > 0 else None,
    ema_decay=pieces.ema_decay,
  )


def abstract(pieces: Setup, image_size: int) -> TrainState:
  """The shapes and dtypes of :func:`create`'s state (``jax.ShapeDtypeStruct`` leaves)."""
  return jax.eval_shape(lambda rng: create(pieces, rng, image_size), jax.random.key(0))


def variables(state: TrainState) -> dict[str, Any]:
  """What applying the model needs: ``{'params': ..., 'batch_stats': ...}``."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


def ema_variables(state: TrainState) -> dict[str, Any] | None:
  """The moving average with the run's BatchNorm statistics, or None when averaging is off.

  The statistics are the run's own running averages: BatchNorm keeps them per step of the
  raw parameters, and no separate statistics of the averaged network are computed.
  """
  if state.ema_params is None:
    return None
  return {'params': state.ema_params, 'batch_stats': state.batch_stats}


# The moving average of the parameters, when the run keeps one; a tree like ``params``.
EMA = 'ema_params'


def state_dict(state: TrainState) -> dict[str, Any]:
  """The checkpoint layout of a train state: step, params, batch_stats, opt_state, and
  ``ema_params`` (the parameters' moving average, a tree like ``params``) when it has one."""
  tree = {
    'step': state.step,
    'params': state.params,
    'batch_stats': state.batch_stats,
    'opt_state': state.opt_state,
  }
  if state.ema_params is not None:
    tree[EMA] = state.ema_params
  return serialization.to_state_dict(tree)


def restore_into(state: TrainState, restored: dict[str, Any]) -> TrainState:
  """``state`` with the values of a restored :func:`state_dict`.

  The moving average follows ``state``: a state that keeps one takes the checkpoint's or,
  from a checkpoint without one (averaging turned on in a restart), starts it at the
  restored parameters; a state without one ignores the checkpoint's.
  """
  params = serialization.from_state_dict(state.params, restored['params'])
  ema = None
  if state.ema_params is not None:
    # A copy: params and their average are separate buffers (the train step donates both).
    ema = serialization.from_state_dict(state.ema_params, restored.get(EMA, restored['params']))
    ema = jax.tree.map(lambda a: a.copy(), ema)
  return state.replace(
    step=restored['step'],
    params=params,
    batch_stats=serialization.from_state_dict(state.batch_stats, restored['batch_stats']),
    opt_state=serialization.from_state_dict(state.opt_state, restored['opt_state']),
    ema_params=ema,
  )
