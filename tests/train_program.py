"""main.py with timing hooks for the interruption tests, set by environment variables.

GSA_TEST_KILL_AT_SAVE=N: SIGKILL this process as soon as the save of step N has started
  (its files are being written in the background), i.e. a crash in the middle of a save.
GSA_TEST_STEP_PAUSE=S: sleep S seconds after every training batch is read, so a signal
  sent by a test lands while training is still under way.

The hooks go in through ``train_and_evaluate``'s parameters (the checkpointer, the training
data); everything else is main.py as users run it.
"""

import functools
import os
import signal
import time

import main
from gsa_flax import checkpointing, datasets, input_pipeline
from gsa_flax.tools import cli

FLAGS = main.FLAGS


class KillingCheckpointer(checkpointing.Checkpointer):
  """Starts the save of step ``kill_at``, then SIGKILLs its own process."""

  def __init__(self, workdir: str, keep: int, kill_at: int):
    super().__init__(workdir, keep=keep)
    self.kill_at = kill_at

  def save(self, step, state, meta):
    super().save(step, state, meta)
    if step == self.kill_at:
      os.kill(os.getpid(), signal.SIGKILL)


def slow_train_data(config, pause: float):
  """The real training batches, each ``pause`` seconds late."""
  spec = datasets.get(config.dataset)
  real = functools.partial(
    input_pipeline.create_train_iterator,
    input_pipeline.get_builder(spec, config.data_dir, image_size=config.image_size),
    spec=spec,
    global_batch_size=config.batch_size,
    image_size=config.image_size,
    seed=config.seed,
  )

  def batches(start_step):
    for batch in real(start_step=start_step):
      time.sleep(pause)
      yield batch

  return batches


def run(argv):
  hooks = {}
  if os.environ.get('GSA_TEST_KILL_AT_SAVE'):
    hooks['checkpointer'] = KillingCheckpointer(
      FLAGS.workdir, FLAGS.config.keep_checkpoints, int(os.environ['GSA_TEST_KILL_AT_SAVE'])
    )
  if os.environ.get('GSA_TEST_STEP_PAUSE'):
    hooks['train_data'] = slow_train_data(FLAGS.config, float(os.environ['GSA_TEST_STEP_PAUSE']))
  main.main(argv, **hooks)


if __name__ == '__main__':
  cli.run(run)
