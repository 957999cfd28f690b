r"""Exports the newest checkpoint of a training workdir as one portable-weights file.

  python -m gsa_flax.tools.export --workdir=runs/gsa --output=runs/gsa.msgpack

The file (:mod:`gsa_flax.model.weights`) holds the run's config, the parameters and BatchNorm
statistics of its newest intact checkpoint (those ``restore.load`` restores: the
moving average of the parameters when the run kept one, else the raw parameters; ``--raw``
exports the raw ones) and a model card: model, dataset, resolution, number of classes and
parameters, the step, the run's evaluation of the exported weights at that step as its
TensorBoard events recorded it (``ema_eval_accuracy`` for an average, written on the card as
``eval_accuracy``), and ``weights: ema (decay D)`` for an average.
``gsa_flax.model.pretrained.load_pretrained`` rebuilds the network from the file alone;
``config.init_from`` starts another run from it. The card is printed as one line.

The file is written atomically (:func:`gsa_flax.files.write_atomically`): a failed export
(a full disk) leaves a file already at ``--output`` byte-identical and no partial file.

Exit status: 0 when the file was written, 2 when the workdir has no usable config or
checkpoint or the file cannot be written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from absl import flags, logging

from gsa_flax import files
from gsa_flax.model import weights
from gsa_flax.tools import cli, events
from gsa_flax.train import evaluators, restore

# The run's evaluation metrics that go on the card, as the trainer names them.
CARD_METRICS = ('eval_accuracy', 'eval_top5_accuracy')


def metrics_at(workdir: str | os.PathLike, step: int, prefix: str = '') -> dict[str, float]:
  """The evaluation metrics the run wrote at ``step`` (:data:`CARD_METRICS` it has).

  Args:
    workdir: the training run.
    step: the step of the evaluation.
    prefix: read ``prefix + name`` (``evaluators.EMA_PREFIX``: the moving average's metrics);
      the result is keyed by the plain name.
  """
  scalars = events.read_scalars(workdir)
  return {
    name: scalars[prefix + name][step]
    for name in CARD_METRICS
    if step in scalars.get(prefix + name, {})
  }


def run(
  workdir: str | os.PathLike, output: str | os.PathLike, *, raw: bool = False
) -> dict[str, Any]:
  """Writes the newest checkpoint of ``workdir`` to ``output`` and prints its card.

  Args:
    workdir: the ``--workdir`` of a training run (local or ``gs://``).
    output: the file to write (local or ``gs://``; replaced if it exists).
    raw: export the raw parameters even when the run kept a moving average of them (which
      is exported by default).

  Returns:
    The model card written.

  Raises:
    WorkdirError: the workdir has no usable config or checkpoint.
    gsa_flax.files.FileError: ``output`` cannot be written (a symbolic link, a directory, a
      full disk); a file already there is left byte-identical.
  """
  if files.is_local(output) and os.path.isdir(os.path.dirname(os.path.abspath(output))):
    files.check_writable(output)  # before the checkpoint is read (a missing directory is made)
  trained = restore.load(workdir, raw=raw)
  prefix = evaluators.EMA_PREFIX if trained.averaged else ''
  metrics = metrics_at(workdir, trained.step, prefix)
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
  if trained.averaged:
    card['weights'] = f'ema (decay {trained.config.ema_decay:g})'
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
  cli.check_backend()
  run(FLAGS.workdir, FLAGS.output, raw=FLAGS.raw)


if __name__ == '__main__':
  # Flags exist only when the module runs as a program: importing it defines none.
  flags.DEFINE_string('workdir', None, 'The training run (config.json, checkpoints, events).')
  flags.DEFINE_string('output', None, 'The portable-weights file to write.')
  flags.DEFINE_bool(
    'raw', False, 'The raw parameters, not their moving average (if the run kept one).'
  )
  cli.run(main)
