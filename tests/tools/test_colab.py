"""The notebook's install on each Colab runtime: TensorFlow added only where it is missing."""

from gsa_flax.tools import colab


def _runtime(*modules):
  return lambda name: name in modules


def test_a_tpu_runtime_without_tensorflow_gets_the_tf_extra():
  command = colab.install_command('/content/gsa-flax', python='py', has=_runtime('jax'))
  assert command == ['py', '-m', 'pip', 'install', '-q', '/content/gsa-flax[tf]']


def test_cpu_and_gpu_runtimes_keep_their_own_tensorflow():
  has = _runtime('jax', 'tensorflow', 'tensorflow_datasets')
  command = colab.install_command('/content/gsa-flax', python='py', has=has)
  assert command == ['py', '-m', 'pip', 'install', '-q', '/content/gsa-flax']


def test_the_real_check_sees_this_environment():
  assert colab.has_module('json') and not colab.has_module('no_such_module_here')
