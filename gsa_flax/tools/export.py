r"""Exports the newest checkpoint of a training workdir as one portable-weights file.

  python -m gsa_flax.tools.export --workdir=/tmp/gsa --output=/tmp/gsa.msgpack

The file (:mod:`gsa_flax.weights`) holds the run's config, the parameters and BatchNorm
statistics of its newest intact checkpoint (those ``checkpointing.load`` restores: the
weights every evaluation of the run used) and a model card: model, dataset, resolution,
number of classes and parameters, the step, and the run's evaluation at that step as its
TensorBoard events recorded it. ``gsa_flax.models.load_pretrained`` rebuilds the network
from the file alone; ``config.init_from`` starts another run from it. The card is printed
as one line.

Exit status: 0 when the file was written, 2 when the workdir has no usable config or
checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from absl import flags, logging

from gsa_flax import checkpointing, weights
from gsa_flax.tools import cli, events

# The run's evaluation metrics that go on the card, as the trainer names them.
CARD_METRICS = ('eval_accuracy', 'eval_top5_accuracy')


def metrics_at(workdir: str | os.PathLike, step: int) -> dict[str, float]:
  """The evaluation metrics the run wrote at ``step`` (:data:`CARD_METRICS` it has)."""
  scalars = events.read_scalars(workdir)
  return {name: scalars[name][step] for name in CARD_METRICS if step in scalars.get(name, {})}


def run(workdir: str | os.PathLike, output: str | os.PathLike) -> dict[str, Any]:
  """Writes the newest checkpoint of ``workdir`` to ``output`` and prints its card.

  Args:
    workdir: the ``--workdir`` of a training run (local or ``gs://``).
    output: the file to write (local or ``gs://``; replaced if it exists).

  Returns:
    The model card written.

  Raises:
    CheckpointError: the workdir has no usable config or checkpoint.
  """
  trained = checkpointing.load(workdir)
  metrics = metrics_at(workdir, trained.step)
  if not metrics:
    logging.warning(
      'No evaluation at step %d in the events of %s: the card has no accuracy.',
      trained.step,
      workdir,
    )
  card = weights.make_card(
    trained.config,
    trained.variables,
    num_classes=trained.model.num_classes,
    step=trained.step,
    metrics=metrics,
  )
  weights.export(output, trained.config, trained.variables, card)
  print(f'{output}: {weights.describe(card)}')
  return card


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {" ".join(argv[1:])}; usage: --workdir=DIR --output=FILE.')
  if not FLAGS.workdir:
    cli.fail('--workdir is required: the workdir of a training run.')
  if not FLAGS.output:
    cli.fail('--output is required: the weights file to write (local or gs://).')
  run(FLAGS.workdir, FLAGS.output)


if __name__ == '__main__':
  # Flags exist only when the module runs as a program: importing it defines none.
  flags.DEFINE_string('workdir', None, 'The training run (config.json, checkpoints, events).')
  flags.DEFINE_string('output', None, 'The portable-weights file to write.')
  cli.run(main)
