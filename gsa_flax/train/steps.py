"""The compiled steps and what they run on: metrics, loss, train and eval steps, the mesh.

One training step, ``jax.jit`` over a one-axis ``Mesh`` of every device of every process
(:func:`make_mesh`): the batch is sharded on ``data``, the state replicated and donated
(:func:`jit_train_step`); BatchNorm statistics are computed over the global batch (XLA
inserts the reductions). The loss is the softmax cross-entropy with the batch's targets
(Mixup/CutMix targets when the pipeline mixes; :func:`soft_targets`). A moving average of
the parameters, when the state keeps one, is updated inside the step.

This is what the trainer (:mod:`gsa_flax.train.trainer`), the evaluators, the sizing tool and the
benchmarks compile; it reads no data and writes nothing.
"""

# No `from __future__ import annotations`: clu's metric collections read their annotations.
import collections
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gsa_flax.train import state as state_lib

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

# A dataset's per-channel (mean, stddev) on the 0..255 scale (its DatasetSpec's mean_rgb and
# stddev_rgb).
ImageStats = tuple[Sequence[float], Sequence[float]]


def normalize_images(images: jax.Array, stats: ImageStats) -> jax.Array:
  """``(images - mean) / std`` in float32: the input pipeline's batches, made model inputs.

  The pipeline hands over ``uint8`` images (float32 on 0..255 when mixed), a quarter of
  the bytes of normalised float32 to copy; normalising here costs the accelerator next to
  nothing, and the model's first layer casts the result to its compute dtype. It is
  ``gsa_flax.data.preprocess.normalize``'s formula, on the device.

  Args:
    images: ``[batch, height, width, 3]`` on the 0..255 scale, any real dtype.
    stats: ``(mean_rgb, stddev_rgb)``.
  """
  mean, std = (jnp.asarray(values, jnp.float32) for values in stats)
  return (images.astype(jnp.float32) - mean) / std


def mix_images(batch: dict[str, jax.Array], groups: int = 1) -> jax.Array:
  """A Mixup/CutMix batch's images, mixed as the input pipeline drew them (float32, 0..255).

  Example ``i`` of each process's part of the batch is paired with example ``local - 1 -
  i`` of the same part (the pipeline's pairing, which set ``mix_label``):
  ``where(in mix_box, partner, mix_blend * image + (1 - mix_blend) * partner)``, as
  ``gsa_flax.data.mixing.apply_mix`` does on the host. The images cross the host-device
  link as ``uint8``; mixing here, where the reversal is one collective permute, spares the
  host a float32 pass over every batch.

  Args:
    batch: ``image [batch, height, width, 3]``, ``mix_blend float32 [batch]``, ``mix_box
      int32 [batch, 4]`` (``y0, y1, x0, x1``).
    groups: the number of process-local parts the global batch is made of
      (``jax.process_count()``).
  """
  images = batch['image'].astype(jnp.float32)
  size, height, width, channels = images.shape
  partners = images.reshape(groups, size // groups, height, width, channels)[:, ::-1]
  partners = partners.reshape(images.shape)
  box = batch['mix_box'][:, :, None, None]
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  in_box = (rows >= box[:, 0]) & (rows < box[:, 1]) & (cols >= box[:, 2]) & (cols < box[:, 3])
  weight = batch['mix_blend'][:, None, None, None]
  mixed = weight * images + (1.0 - weight) * partners
  return jnp.where(in_box[..., None], partners, mixed)


def _model_inputs(batch: dict[str, jax.Array], image_stats: ImageStats | None) -> jax.Array:
  images = batch['image']
  if 'mix_box' in batch:
    images = mix_images(batch, groups=jax.process_count())
  return images if image_stats is None else normalize_images(images, image_stats)


def soft_targets(
  batch: dict[str, jax.Array], num_classes: int, label_smoothing: float
) -> jax.Array:
  """The training targets of a batch, ``[batch, num_classes]``.

  ``onehot(label)``, or for a mixed batch (Mixup/CutMix: the batch carries ``mix_label`` and
  ``mix_weight``) ``w * onehot(label) + (1 - w) * onehot(mix_label)``; then label smoothing,
  ``(1 - s) * target + s / num_classes``.
  """
  targets = jax.nn.one_hot(batch['label'], num_classes)
  if 'mix_label' in batch:
    weight = batch['mix_weight'][:, None].astype(targets.dtype)
    targets = weight * targets + (1.0 - weight) * jax.nn.one_hot(batch['mix_label'], num_classes)
  return optax.smooth_labels(targets, label_smoothing)


def cross_entropy(
  logits: jax.Array, batch: dict[str, jax.Array], num_classes: int, label_smoothing: float
) -> jax.Array:
  """The training loss: mean softmax cross-entropy of ``logits`` with :func:`soft_targets`."""
  targets = soft_targets(batch, num_classes, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def train_step(
  state: state_lib.TrainState,
  batch: dict[str, jax.Array],
  *,
  schedule: optax.Schedule,
  num_classes: int,
  label_smoothing: float,
  image_stats: ImageStats | None = None,
) -> tuple[state_lib.TrainState, TrainMetrics]:
  """One SGD step on a global batch; returns the new state and this step's metrics.

  With ``image_stats`` the batch's images are the input pipeline's (0..255) and are
  normalised first (:func:`normalize_images`); without, they go to the model as they are.
  A batch with the pipeline's Mixup/CutMix draws (``mix_box``) is mixed first
  (:func:`mix_images`).
  The loss is :func:`cross_entropy` (mixed targets when the batch is mixed); the accuracy
  counts ``label``. The state's moving average, if it keeps one, is updated after the
  parameters (:meth:`gsa_flax.train.state.TrainState.apply_gradients`).
  """

  images = _model_inputs(batch, image_stats)

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    loss = cross_entropy(logits, batch, num_classes, label_smoothing)
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
  model: nn.Module,
  variables: dict[str, Any],
  batch: dict[str, jax.Array],
  image_stats: ImageStats | None = None,
) -> EvalMetrics:
  """Metrics of one (padded) eval batch; padding carries ``mask == 0`` and counts for nothing.

  ``image_stats``: as in :func:`train_step`.
  """
  logits = model.apply(variables, _model_inputs(batch, image_stats), train=False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  return EvalMetrics.single_from_model_output(
    loss=loss, logits=logits, labels=batch['label'], mask=batch['mask']
  )


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A one-axis ``data`` mesh over ``devices`` (default: every device of every process).

  Built by ``jax.make_mesh`` either way, so the batch sharding is visible while tracing:
  the Pallas kernels then run per device on their share of the batch (``shard_map``).
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices)


def jit_train_step(
  mesh: jax.sharding.Mesh,
  schedule: optax.Schedule,
  num_classes: int,
  label_smoothing: float,
  image_stats: ImageStats | None = None,
):
  """The training step as it runs: batch sharded on ``data``, state replicated and donated."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    functools.partial(
      train_step,
      schedule=schedule,
      num_classes=num_classes,
      label_smoothing=label_smoothing,
      image_stats=image_stats,
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
