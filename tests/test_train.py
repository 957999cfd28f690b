"""train_and_evaluate for real: digits, mocked cifar100/imagenet2012, resume, devices, hosts."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tfds_mock
from conftest import DIGITS_IMAGE_SIZE
from events import count_writes, read_scalars
from tiny import tiny_config

from gsa_flax import input_pipeline, train

REPO = Path(__file__).resolve().parents[1]
DIGITS_TEST_EXAMPLES = 360


def _params(state):
  return jax.tree.map(np.asarray, state.params)


def test_digits_train_evaluate_and_resume(digits_dir, tmp_path):
  config = tiny_config(digits_dir)
  state = train.train_and_evaluate(config, str(tmp_path / 'a'))
  assert int(state.step) == 6
  scalars = read_scalars(str(tmp_path / 'a'))
  for tag in ('train_loss', 'train_accuracy', 'learning_rate', 'eval_loss', 'eval_accuracy'):
    assert tag in scalars, tag
  assert 'eval_top5_accuracy' in scalars
  # Every test example evaluated exactly once, whatever the batch.
  assert scalars['eval_examples'][6] == DIGITS_TEST_EXAMPLES
  assert sorted(int(p.name) for p in (tmp_path / 'a' / 'checkpoints').iterdir()) == [3, 6]
  assert (tmp_path / 'a' / 'config.json').exists()

  # A copy of the run that lost its last checkpoint resumes at step 3 (it does not start
  # over) and ends exactly where the uninterrupted run ended.
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '6')
  resumed = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert count_writes(str(tmp_path / 'b'), 'train_loss')[2] == 1  # step 2 was not rerun
  assert count_writes(str(tmp_path / 'b'), 'train_loss')[4] == 2  # steps 4-6 were rerun
  jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(state))

  # eval_only evaluates the latest checkpoint and changes nothing.
  evaluated = train.train_and_evaluate(tiny_config(digits_dir, eval_only=True), str(tmp_path / 'b'))
  jax.tree.map(np.testing.assert_array_equal, _params(evaluated), _params(state))


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
  with tfds_mock.mock(mock_data_dir):
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  scalars = read_scalars(str(tmp_path))
  assert scalars['eval_examples'][2] == tfds_mock.MOCK_EXAMPLES
  assert np.isfinite(scalars['train_loss'][2])


# ----------------------------------------------------------------------------- devices, hosts


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['PYTHONPATH'] = str(REPO)
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _main_args(data_dir: str, workdir: str) -> list[str]:
  overrides = dict(
    data_dir=data_dir,
    image_size=DIGITS_IMAGE_SIZE,
    num_filters=8,
    batch_size=16,
    eval_batch_size=48,
    num_train_steps=4,
    log_every_steps=2,
    eval_every_steps=4,
    checkpoint_every_steps=4,
  )
  return [
    sys.executable,
    str(REPO / 'main.py'),
    f'--config={REPO / "configs" / "default.py"}',
    f'--workdir={workdir}',
    '--config.gsa.num_heads=2',
    '--config.stage_sizes=(1,1)',
    *(f'--config.{k}={v}' for k, v in overrides.items()),
  ]


def _assert_same_metrics(got: dict, want: dict):
  for tag in ('train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy', 'eval_examples'):
    assert got[tag].keys() == want[tag].keys(), tag
    for step in want[tag]:
      np.testing.assert_allclose(got[tag][step], want[tag][step], rtol=2e-5, atol=1e-6, err_msg=tag)


@pytest.fixture(scope='module')
def eight_device_run(digits_dir, tmp_path_factory):
  """The reference: one process, 8 devices, the same run as the subprocesses below."""
  workdir = str(tmp_path_factory.mktemp('eight'))
  result = subprocess.run(
    _main_args(digits_dir, workdir), env=_env(8), capture_output=True, text=True, timeout=400
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return read_scalars(workdir)


def test_one_device_matches_eight(digits_dir, tmp_path, eight_device_run):
  result = subprocess.run(
    _main_args(digits_dir, str(tmp_path)), env=_env(1), capture_output=True, text=True, timeout=400
  )
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_same_metrics(read_scalars(str(tmp_path)), eight_device_run)


@contextlib.contextmanager
def _as_process(index: int, count: int):
  saved = jax.process_index, jax.process_count
  jax.process_index, jax.process_count = (lambda: index), (lambda: count)
  try:
    yield
  finally:
    jax.process_index, jax.process_count = saved


def test_two_processes_match_one(digits_dir, tmp_path, monkeypatch):
  """Two main.py processes (4 CPU devices each, gloo) train together like one of 8 devices."""
  port = _free_port()
  procs = [
    subprocess.Popen(
      _main_args(digits_dir, str(tmp_path / 'multi'))
      + [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      env=_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  # Meanwhile, the reference in this process: 8 devices, fed the global batches the two
  # processes assemble (process 0's shard, then process 1's), each read as that process.
  real_iterator = input_pipeline.create_train_iterator

  def two_process_batches(builder, **kwargs):
    shards = []
    for index in range(2):
      with _as_process(index, 2):
        shards.append(real_iterator(builder, **kwargs))
    while True:
      parts = []
      for index, shard in enumerate(shards):
        with _as_process(index, 2):
          parts.append(next(shard))
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  monkeypatch.setattr(input_pipeline, 'create_train_iterator', two_process_batches)
  config = tiny_config(digits_dir, num_train_steps=4, eval_every_steps=4, checkpoint_every_steps=4)
  train.train_and_evaluate(config, str(tmp_path / 'reference'))

  for i, proc in enumerate(procs):
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, f'process {i}:\n{err[-3000:]}'
  multi = read_scalars(str(tmp_path / 'multi'))
  assert multi['eval_examples'][4] == DIGITS_TEST_EXAMPLES
  _assert_same_metrics(multi, read_scalars(str(tmp_path / 'reference')))
