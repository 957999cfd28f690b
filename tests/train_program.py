"""main.py with timing and failure hooks for the interruption tests, set by environment variables.

GSA_TEST_KILL_AT_SAVE=N: SIGKILL this process as soon as the save of step N has started
  (its files are being written in the background), i.e. a crash in the middle of a save.
GSA_TEST_STEP_PAUSE=S: sleep S seconds after every training batch is read, so a signal
  sent by a test lands while training is still under way.
GSA_TEST_EVAL_PAUSE=S: the same for every evaluation batch, so a signal lands during an
  evaluation.
GSA_TEST_FILE_SIZE_LIMIT=B: no file this process writes may grow past B bytes (the
  kernel's RLIMIT_FSIZE; writes beyond it fail with EFBIG), so checkpoint saves fail in the
  background like on a full disk, while the small files (config.json, events) are written.

The hooks go in through ``train_and_evaluate``'s parameters (the checkpointer, the training
data, the evaluators) or the process's own limits; everything else is main.py as users run it.
"""

import functools
import os
import resource
import signal
import time

import main
from gsa_flax.data import datasets, input_pipeline
from gsa_flax.tools import cli
from gsa_flax.train import checkpoints, evaluators

FLAGS = main.FLAGS


class KillingCheckpointer(checkpoints.Checkpointer):
  """Starts the save of step ``kill_at``, then SIGKILLs its own process."""

  def __init__(self, workdir: str, keep: int, kill_at: int):
    super().__init__(workdir, keep=keep)
    self.kill_at = kill_at

  def save(self, step, state, meta):
    super().save(step, state, meta)
    if step == self.kill_at:
      os.kill(os.getpid(), signal.SIGKILL)


def _slow(batches, pause: float):
  for batch in batches:
    time.sleep(pause)
    yield batch


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
    augment=input_pipeline.Augment(**config.augment),
  )
  return lambda start_step: _slow(real(start_step=start_step), pause)


def slow_evaluator(config, pause: float):
  """The classification evaluator on the real eval batches, each ``pause`` seconds late."""
  spec = datasets.get(config.dataset)

  def batches():
    iterator, count = input_pipeline.create_eval_iterator(
      input_pipeline.get_builder(spec, config.data_dir, image_size=config.image_size),
      spec=spec,
      global_batch_size=config.eval_batch_size or config.batch_size,
      image_size=config.image_size,
    )
    return _slow(iterator, pause), count

  return functools.partial(evaluators.ClassificationEvaluator, batches=batches)


def run(argv):
  hooks = {}
  if os.environ.get('GSA_TEST_KILL_AT_SAVE'):
    hooks['checkpointer'] = KillingCheckpointer(
      FLAGS.workdir, FLAGS.config.keep_checkpoints, int(os.environ['GSA_TEST_KILL_AT_SAVE'])
    )
  if os.environ.get('GSA_TEST_STEP_PAUSE'):
    hooks['train_data'] = slow_train_data(FLAGS.config, float(os.environ['GSA_TEST_STEP_PAUSE']))
  if os.environ.get('GSA_TEST_EVAL_PAUSE'):
    pause = float(os.environ['GSA_TEST_EVAL_PAUSE'])
    hooks['evaluators'] = [slow_evaluator(FLAGS.config, pause)]
  if os.environ.get('GSA_TEST_FILE_SIZE_LIMIT'):
    limit = int(os.environ['GSA_TEST_FILE_SIZE_LIMIT'])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  main.main(argv, **hooks)


if __name__ == '__main__':
  cli.run(run)
