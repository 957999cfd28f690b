r"""Trains and evaluates a (GSA-)ResNet.

  python main.py --config=configs/default.py --workdir=/tmp/gsa
  python main.py --config=configs/imagenet.py --workdir=gs://bucket/gsa50 --config.batch_size=1024

Every host of a multi-host run (Cloud TPU pod slice, GPU cluster) runs the same command.
A run restarted with the same --workdir resumes from its latest checkpoint.
"""

import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events, config.json.')
flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0, for multi-process runs started by hand.'
)
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process (0..num_processes-1).')
flags.DEFINE_bool(
  'distributed',
  None,
  'Call jax.distributed.initialize() to auto-detect the cluster (Cloud TPU pods, SLURM). '
  'Default: on when a Cloud TPU multi-host environment or --coordinator_address is seen.',
)
flags.mark_flags_as_required(['config', 'workdir'])


def _init_distributed() -> None:
  import jax

  if FLAGS.coordinator_address:
    # CPU-only clusters (and tests) need a collectives backend; GPUs and TPUs ignore this.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  elif FLAGS.distributed or (
    FLAGS.distributed is None and len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1
  ):
    jax.distributed.initialize()


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax (dozens of lines per save); keeps its warnings."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or '/orbax/' not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  _init_distributed()
  import jax

  from gsa_flax import config_validation

  try:
    # Before TensorFlow, the data or any compile: a typo costs seconds.
    config_validation.validate(FLAGS.config, FLAGS.workdir)
  except config_validation.ConfigError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  from gsa_flax import checkpointing, input_pipeline, train

  # Mistakes in the input, and a diverged run: one line, no traceback.
  user_errors = (
    config_validation.ConfigError,
    input_pipeline.DatasetNotFoundError,
    checkpointing.CheckpointError,
    FloatingPointError,
  )

  logging.info(
    'JAX process %d/%d, %d local / %d global devices.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except user_errors as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
