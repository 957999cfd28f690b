r"""Checks the GSA kernels against the einsum ops on this machine's device, for a config.

  python -m gsa_flax.tools.selfcheck --config=configs/imagenet.py

For every distinct GSA layer geometry of the config's network at its image size (batch 2),
the layer on the kernel path is compared with the same layer on the einsum path: forward
(training and evaluation) and gradients, in the config's dtype
(:mod:`gsa_flax.model.selfcheck`). The trainer runs the same check before a run's first
step on a TPU or GPU that takes the kernels. Prints one line per geometry and a summary;
exits with status 2 and one line naming the layer and the fix on a mismatch. On CPU the
kernels run in the Pallas interpreter (slow: tens of seconds per geometry).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from absl import flags, logging
from ml_collections import config_flags

from gsa_flax.data import datasets
from gsa_flax.model import networks, selfcheck
from gsa_flax.tools import cli
from gsa_flax.train import config_validation

FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # the lines below are the output
  cli.check_backend()
  config = FLAGS.config
  config_validation.validate(config)
  model = networks.build(networks.architecture_of(config), datasets.get(config.dataset).num_classes)
  # On CPU the default path is the einsum ops: check the kernels there in the interpreter.
  implementation = (
    'pallas' if jax.default_backend() == 'cpu' else selfcheck.implementation_of(model)
  )
  if implementation == 'xla' or not (
    jax.default_backend() == 'cpu' or selfcheck.kernels_selected(model)
  ):
    print(f'GSA self-check: nothing to check, {jax.devices()[0].device_kind} runs the einsum ops.')
    return
  results = selfcheck.check(
    model, config.image_size, batch=FLAGS.batch, implementation=implementation
  )
  for result in results:
    errors = ', '.join(f'{k} {v:.2g}' for k, v in result.errors.items())
    print(f'{"ok  " if result.ok else "FAIL"} {result.layer.describe()}: {errors}')
  message = selfcheck.failure(results)
  if message:
    raise selfcheck.SelfCheckError(message)
  print(f'{selfcheck.summary(results)} Device: {jax.devices()[0].device_kind}.')


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_integer('batch', 2, 'Batch each layer is checked at.', lower_bound=1)
  cli.run(main)
