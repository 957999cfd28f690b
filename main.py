r"""Trains and evaluates a (GSA-)ResNet.

  python main.py --config=configs/default.py --workdir=runs/gsa
  python main.py --config=configs/imagenet.py --workdir=gs://bucket/gsa50 --config.batch_size=1024

Every host of a multi-host run (Cloud TPU pod slice, GPU cluster) runs the same command.
A run restarted with the same --workdir resumes from its latest checkpoint (a run started
from trained weights with --config.init_from then continues from its own and does not read
them again); one run at a time holds a workdir, and a restart must keep the config recorded
in its config.json (or list the fields it changes in --config.allow_config_changes).
"""

import os
from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

from gsa_flax.tools import cli
from gsa_flax.train import workdir as workdir_lib

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
  "Default: on when JAX's cluster detection finds more than one process (GCE and GKE TPU "
  'pod slices, SLURM jobs); --nodistributed turns it off.',
)


def multi_process_cluster() -> str | None:
  """The multi-process environment JAX's own cluster detection finds, or None.

  The same detection as ``jax.distributed.initialize()`` without arguments (GCE TPU VMs
  through the metadata server, GKE TPU pods, SLURM, Open MPI, Kubernetes), kept to the
  environments of more than one process: a single TPU VM or a one-task job needs no
  distributed runtime. Without it a pod slice's hosts would each train alone, with no
  sync point to save on SIGTERM. JAX exposes this detection only privately
  (``jax._src.clusters``); if that moves, only the ``TPU_WORKER_HOSTNAMES`` check is left.
  """
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if len(hosts.split(',')) > 1:
    return 'GkeTpuCluster'
  try:
    from jax._src import clusters
  except ImportError:
    return None
  for env in clusters.ClusterEnv._cluster_types:
    if env.opt_in_only_method or not env.is_env_present():
      continue
    try:
      count = env.get_process_count()
    except Exception:  # present but unreadable: let jax.distributed.initialize() say why
      return env.__name__
    return env.__name__ if count and count > 1 else None
  return None


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
  elif FLAGS.distributed or (FLAGS.distributed is None and multi_process_cluster()):
    jax.distributed.initialize()


def main(argv: Sequence[str], **train_kwargs) -> None:
  """Validates the config, then trains; ``train_kwargs`` go to ``train_and_evaluate``."""
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS.config or not FLAGS.workdir:
    cli.fail('--config and --workdir are required: python main.py --config=FILE --workdir=DIR')
  _init_distributed()
  cli.check_backend()
  import jax

  from gsa_flax.train import config_validation

  # Before TensorFlow, the data or any compile: a typo costs seconds.
  config_validation.validate(FLAGS.config)
  workdir_lib.check_workdir(FLAGS.workdir, evaluate_only=FLAGS.config.eval_only)

  from gsa_flax.tools import attention_maps
  from gsa_flax.train import evaluators, trainer

  logging.info(
    'JAX process %d/%d, %d local / %d global devices.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  factories = [evaluators.ClassificationEvaluator]
  if FLAGS.config.attention_maps:
    factories.append(attention_maps.AttentionMapEvaluator)
  trainer.train_and_evaluate(
    FLAGS.config, FLAGS.workdir, **{'evaluators': factories, **train_kwargs}
  )


if __name__ == '__main__':
  cli.run(main)
