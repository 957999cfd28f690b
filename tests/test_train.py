"""train_and_evaluate for real: digits, mocked cifar100/imagenet2012, resume, devices, hosts."""

import functools
import glob
import os
import shutil
import socket
import subprocess

import jax
import numpy as np
import pytest
import tensorflow as tf
from flax import traverse_util
from helpers import (
  DIGITS_IMAGE_SIZE,
  DIGITS_TEST_EXAMPLES,
  MOCK_EXAMPLES,
  main_command,
  mock_data,
  tiny_config,
)

from gsa_flax.data import datasets, input_pipeline
from gsa_flax.tools.events import read_scalars
from gsa_flax.train import evaluators, experiment, restore, trainer
from gsa_flax.train import state as state_lib

FOUR_STEPS = dict(num_train_steps=4, eval_every_steps=4, checkpoint_every_steps=4)


def count_writes(workdir, tag: str) -> dict[int, int]:
  """How many times each step of ``tag`` was written (a resumed run must not repeat steps)."""
  counts = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          counts[event.step] = counts.get(event.step, 0) + 1
  return counts


def _params(state):
  return jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope='module')
def digits_run(digits_dir, tmp_path_factory):
  """The tiny digits run (8 devices, in this process): its workdir and final parameters."""
  workdir = tmp_path_factory.mktemp('digits')
  state = trainer.train_and_evaluate(tiny_config(digits_dir), str(workdir))
  assert int(state.step) == 6
  return workdir, _params(state)


def test_digits_train_evaluate_and_resume(digits_run, digits_dir, tmp_path):
  workdir, final_params = digits_run
  scalars = read_scalars(str(workdir))
  for tag in ('train_loss', 'train_accuracy', 'learning_rate', 'eval_loss', 'eval_accuracy'):
    assert tag in scalars, tag
  assert 'eval_top5_accuracy' in scalars
  # Every test example evaluated exactly once, whatever the batch.
  assert scalars['eval_examples'][6] == DIGITS_TEST_EXAMPLES
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [3, 6]
  assert (workdir / 'config.json').exists()

  # A copy of the run that lost its last checkpoint resumes at step 3 (it does not start
  # over) and ends exactly where the uninterrupted run ended.
  shutil.copytree(workdir, tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '6')
  resumed = trainer.train_and_evaluate(tiny_config(digits_dir), str(tmp_path / 'b'))
  assert count_writes(str(tmp_path / 'b'), 'train_loss')[2] == 1  # step 2 was not rerun
  assert count_writes(str(tmp_path / 'b'), 'train_loss')[4] == 2  # steps 4-6 were rerun
  jax.tree.map(np.testing.assert_array_equal, _params(resumed), final_params)

  # eval_only evaluates the latest checkpoint and changes nothing.
  config = tiny_config(digits_dir, eval_only=True)
  evaluated = trainer.train_and_evaluate(config, str(tmp_path / 'b'))
  jax.tree.map(np.testing.assert_array_equal, _params(evaluated), final_params)


# ----------------------------------------------------------------------------- strong recipe

# RandAugment, Mixup and CutMix on (each batch mixed, by either), and a moving average of
# the parameters with a decay small enough to move visibly in six steps.
STRONG = {
  'augment.num_layers': 2,
  'augment.magnitude': 9.0,
  'augment.mixup_alpha': 0.2,
  'augment.cutmix_alpha': 1.0,
  'ema_decay': 0.5,
  'learning_rate': 4.0,  # steps large enough that the average lags visibly
  'checkpoint_every_steps': 1,  # every step's raw parameters and average are kept
  'keep_checkpoints': 6,
}


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep='/')


@pytest.fixture(scope='module')
def strong_run(digits_dir, tmp_path_factory):
  """The tiny digits run with augmentation and averaging: its workdir and final state."""
  workdir = tmp_path_factory.mktemp('strong')
  state = trainer.train_and_evaluate(tiny_config(digits_dir, **STRONG), str(workdir))
  return workdir, state


def test_strong_augmentation_and_averaging_resume_exactly(
  strong_run, digits_run, digits_dir, tmp_path
):
  workdir, state = strong_run
  scalars = read_scalars(str(workdir))
  # Augmented batches: the same run without augmentation (same seed, same initialisation)
  # trained on other images.
  plain = read_scalars(str(digits_run[0]))
  assert scalars['train_loss'][2] != plain['train_loss'][2]
  # Both the raw parameters and their average were evaluated on the whole test split.
  for prefix in ('', evaluators.EMA_PREFIX):
    assert scalars[f'{prefix}eval_examples'][6] == DIGITS_TEST_EXAMPLES
    for name in ('eval_loss', 'eval_accuracy', 'eval_top5_accuracy'):
      assert 6 in scalars[prefix + name], prefix + name
  # A copy of the run that lost its last three checkpoints resumes at step 3 and ends
  # bit-identical to the uninterrupted run: parameters, statistics and average.
  shutil.copytree(workdir, tmp_path / 'b')
  for step in (4, 5, 6):
    shutil.rmtree(tmp_path / 'b' / 'checkpoints' / str(step))
  resumed = trainer.train_and_evaluate(tiny_config(digits_dir, **STRONG), str(tmp_path / 'b'))
  assert count_writes(str(tmp_path / 'b'), 'train_loss')[2] == 1  # not rerun
  for name in ('params', 'batch_stats', 'ema_params'):
    got, want = _flat(getattr(resumed, name)), _flat(getattr(state, name))
    assert got.keys() == want.keys()
    for path in want:
      np.testing.assert_array_equal(got[path], want[path], err_msg=f'{name}/{path}')
  resumed_scalars = read_scalars(str(tmp_path / 'b'))
  for name in ('eval_loss', 'ema_eval_loss', 'ema_eval_accuracy'):
    assert resumed_scalars[name][6] == scalars[name][6], name


def test_the_average_follows_its_recursion_from_the_initial_parameters(strong_run, digits_dir):
  """ema_k = d ema_{k-1} + (1 - d) params_k, checked on the checkpoint of every step, from
  ema_0 = the initial parameters."""
  workdir, _ = strong_run
  decay = STRONG['ema_decay']
  config = tiny_config(digits_dir, **STRONG)
  pieces = experiment.setup(config, 10)
  # The run's initialisation (compiled like the trainer's: eager is much slower).
  create = jax.jit(functools.partial(state_lib.create, pieces, image_size=DIGITS_IMAGE_SIZE))
  initial = _flat(create(jax.random.key(config.seed)).params)
  previous = initial
  for step in range(1, 7):
    loaded = restore.load(workdir / 'checkpoints' / str(step), raw=True)
    assert loaded.step == step and not loaded.averaged
    params, ema = _flat(loaded.variables['params']), _flat(loaded.ema_params)
    for path, value in params.items():
      expected = decay * previous[path].astype(np.float64) + (1 - decay) * value
      np.testing.assert_allclose(ema[path], expected, rtol=1e-6, atol=1e-7, err_msg=path)
    assert any(not np.array_equal(ema[p], params[p]) for p in params)  # it lags behind
    previous = ema


def test_load_gives_the_average_unless_asked_for_the_raw_parameters(strong_run):
  workdir, state = strong_run
  averaged, raw = restore.load(workdir), restore.load(workdir, raw=True)
  assert averaged.averaged and not raw.averaged and averaged.step == raw.step == 6
  for got, want in (
    (averaged.variables['params'], state.ema_params),
    (raw.variables['params'], state.params),
    (averaged.variables['batch_stats'], state.batch_stats),
  ):
    jax.tree.map(np.testing.assert_array_equal, _flat(got), _flat(want))
  assert 'moving average' in averaged.origin and 'raw parameters' in raw.origin


def test_each_set_of_weights_is_evaluated_under_its_own_name(strong_run, digits_dir):
  """eval_* of the raw parameters and ema_eval_* of their average: the logged losses are
  those of the test split classified by hand with each set."""
  workdir, state = strong_run
  scalars = read_scalars(str(workdir))
  spec = datasets.get('digits')
  builder = input_pipeline.get_builder(spec, digits_dir, image_size=DIGITS_IMAGE_SIZE)
  batches, count = input_pipeline.create_eval_iterator(
    builder, spec=spec, global_batch_size=DIGITS_TEST_EXAMPLES, image_size=DIGITS_IMAGE_SIZE
  )
  batch = next(batches)
  assert count == 1 and batch['mask'].all()
  # The batch leaves the pipeline as uint8 on 0..255; the eval step normalises it.
  images = (batch['image'].astype(np.float32) - np.float32(spec.mean_rgb)) / np.float32(
    spec.stddev_rgb
  )
  model = experiment.setup(tiny_config(digits_dir, **STRONG), 10).model
  apply = jax.jit(functools.partial(model.apply, train=False))
  losses = {}
  for prefix, variables in (
    ('', state_lib.variables(state)),
    (evaluators.EMA_PREFIX, state_lib.ema_variables(state)),
  ):
    logits = np.asarray(apply(jax.device_get(variables), images), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    losses[prefix] = -np.mean(log_softmax[np.arange(len(logits)), batch['label']])
    assert scalars[f'{prefix}eval_loss'][6] == pytest.approx(losses[prefix], rel=1e-5), prefix
  # The two sets are told apart: their losses differ by far more than the tolerance.
  assert abs(losses[''] - losses[evaluators.EMA_PREFIX]) > 10 * 1e-5 * losses['']


@pytest.mark.parametrize(
  'dataset,image_size,small_stem', [('cifar100', 16, True), ('imagenet2012', 32, False)]
)
def test_mocked_datasets(mock_data_dir, tmp_path, dataset, image_size, small_stem):
  config = tiny_config(
    '/ignored/by/the/mock',
    dataset=dataset,
    image_size=image_size,
    small_stem=small_stem,
    batch_size=8,
    eval_batch_size=8,
    num_train_steps=2,
    eval_every_steps=2,
  )
  with mock_data(mock_data_dir):
    state = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  scalars = read_scalars(str(tmp_path))
  assert scalars['eval_examples'][2] == MOCK_EXAMPLES
  assert np.isfinite(scalars['train_loss'][2])


# ----------------------------------------------------------------------------- devices, hosts


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _assert_same_metrics(got: dict, want: dict):
  for tag in ('train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy', 'eval_examples'):
    assert got[tag].keys() == want[tag].keys(), tag
    for step in want[tag]:
      np.testing.assert_allclose(got[tag][step], want[tag][step], rtol=2e-5, atol=1e-6, err_msg=tag)


def test_one_device_matches_eight(digits_dir, digits_run, tmp_path):
  """The same global batches on 1 device (a subprocess) and 8 devices (digits_run)."""
  command, env = main_command(digits_dir, tmp_path, devices=1)
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_same_metrics(read_scalars(str(tmp_path)), read_scalars(str(digits_run[0])))


def test_two_processes_match_one(digits_dir, tmp_path):
  """Two main.py processes (4 CPU devices each, gloo) train together like one of 8 devices."""
  port = _free_port()
  command, env = main_command(digits_dir, tmp_path / 'multi', devices=4, **FOUR_STEPS)
  procs = [
    subprocess.Popen(
      [
        *command,
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  # Meanwhile, the reference in this process: 8 devices, fed the global batches the two
  # processes assemble (process 0's shard, then process 1's), each read as that process.
  config = tiny_config(digits_dir, **FOUR_STEPS)
  spec = datasets.get('digits')
  builder = input_pipeline.get_builder(spec, digits_dir, image_size=DIGITS_IMAGE_SIZE)

  def two_process_batches(start_step):
    shards = [
      input_pipeline.create_train_iterator(
        builder,
        spec=spec,
        global_batch_size=config.batch_size,
        image_size=config.image_size,
        seed=config.seed,
        start_step=start_step,
        process=(index, 2),
      )
      for index in range(2)
    ]
    while True:
      parts = [next(shard) for shard in shards]
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  trainer.train_and_evaluate(config, str(tmp_path / 'reference'), train_data=two_process_batches)

  for i, proc in enumerate(procs):
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, f'process {i}:\n{err[-3000:]}'
  multi = read_scalars(str(tmp_path / 'multi'))
  assert multi['eval_examples'][4] == DIGITS_TEST_EXAMPLES
  _assert_same_metrics(multi, read_scalars(str(tmp_path / 'reference')))
