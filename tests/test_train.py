"""train_and_evaluate for real: digits, mocked cifar100/imagenet2012, resume, devices, hosts."""

import glob
import os
import shutil
import socket
import subprocess

import jax
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
  DIGITS_IMAGE_SIZE,
  DIGITS_TEST_EXAMPLES,
  MOCK_EXAMPLES,
  main_command,
  mock_data,
  tiny_config,
)

from gsa_flax import datasets, input_pipeline, train
from gsa_flax.tools.events import read_scalars

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
  state = train.train_and_evaluate(tiny_config(digits_dir), str(workdir))
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
  resumed = train.train_and_evaluate(tiny_config(digits_dir), str(tmp_path / 'b'))
  assert count_writes(str(tmp_path / 'b'), 'train_loss')[2] == 1  # step 2 was not rerun
  assert count_writes(str(tmp_path / 'b'), 'train_loss')[4] == 2  # steps 4-6 were rerun
  jax.tree.map(np.testing.assert_array_equal, _params(resumed), final_params)

  # eval_only evaluates the latest checkpoint and changes nothing.
  config = tiny_config(digits_dir, eval_only=True)
  evaluated = train.train_and_evaluate(config, str(tmp_path / 'b'))
  jax.tree.map(np.testing.assert_array_equal, _params(evaluated), final_params)


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
    state = train.train_and_evaluate(config, str(tmp_path))
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

  train.train_and_evaluate(config, str(tmp_path / 'reference'), train_data=two_process_batches)

  for i, proc in enumerate(procs):
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, f'process {i}:\n{err[-3000:]}'
  multi = read_scalars(str(tmp_path / 'multi'))
  assert multi['eval_examples'][4] == DIGITS_TEST_EXAMPLES
  _assert_same_metrics(multi, read_scalars(str(tmp_path / 'reference')))
