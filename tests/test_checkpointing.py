"""Checkpoints are never destroyed: corrupted steps, wrong models, divergence, full disks."""

import errno
import functools
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import DIGITS_IMAGE_SIZE, main_command, tiny_config

from gsa_flax.data import datasets, input_pipeline
from gsa_flax.train import checkpoints, experiment, trainer
from gsa_flax.train import state as state_lib
from gsa_flax.train import workdir as workdir_lib


def _params(state):
  return jax.tree.map(np.asarray, state.params)


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


@pytest.fixture(scope='module')
def finished_run(digits_dir, tmp_path_factory):
  """A 6-step run with checkpoints at 3 and 6, and its final state."""
  workdir = tmp_path_factory.mktemp('finished')
  state = trainer.train_and_evaluate(tiny_config(digits_dir), str(workdir))
  return workdir, _params(state)


def _truncate_files(directory, pattern='*'):
  corrupted = 0
  for path in directory.rglob(pattern):
    if path.is_file() and path.stat().st_size > 64:
      data = path.read_bytes()
      path.write_bytes(data[: len(data) // 3])
      corrupted += 1
  assert corrupted


def _tree(directory) -> dict[str, bytes]:
  return {
    str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob('*') if p.is_file()
  }


def test_corrupted_latest_checkpoint_falls_back_and_keeps_it(
  finished_run, digits_dir, tmp_path, caplog
):
  workdir, final_params = finished_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  _truncate_files(copy / 'checkpoints' / '6' / 'state')

  state = trainer.train_and_evaluate(tiny_config(digits_dir), str(copy))

  assert 'unreadable' in caplog.text
  # Nothing deleted: the bad step was moved aside, byte for byte as it was.
  kept = copy / 'checkpoints_unreadable' / '6'
  assert kept.is_dir()
  assert sorted(p.name for p in kept.rglob('*')) == sorted(
    p.name for p in (workdir / 'checkpoints' / '6').rglob('*')
  )
  # Resumed from step 3 and redid steps 4-6 exactly.
  assert _steps(copy) == [3, 6]
  jax.tree.map(np.testing.assert_array_equal, _params(state), final_params)


OTHER_FILE_SYSTEM = '/dev/shm'


@pytest.mark.skipif(
  not os.path.isdir(OTHER_FILE_SYSTEM)
  or os.stat(OTHER_FILE_SYSTEM).st_dev == os.stat(os.path.dirname(__file__)).st_dev,
  reason='needs /dev/shm on another file system than the tests',
)
@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_an_unreadable_step_on_another_file_system_is_set_aside_quietly(
  finished_run, digits_dir, tmp_path, tmp_path_factory
):
  """checkpoints/ is a mount of its own; only the arrays of step 6 are damaged."""
  workdir, final_params = finished_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  mounted = tmp_path_factory.mktemp('mount', numbered=True)
  elsewhere = os.path.join(OTHER_FILE_SYSTEM, f'gsa_test_{os.getpid()}_{mounted.name}')
  shutil.move(copy / 'checkpoints', elsewhere)
  try:
    (copy / 'checkpoints').symlink_to(elsewhere)
    # TensorStore's array data only: the metadata reads, the arrays do not (orbax abandons
    # the other reads in flight, each of which used to print a traceback).
    _truncate_files(copy / 'checkpoints' / '6' / 'state', 'd/*')
    damaged = _tree(copy / 'checkpoints' / '6')

    state = trainer.train_and_evaluate(tiny_config(digits_dir), str(copy))

    # Copied to the workdir's file system, then deleted: byte for byte as it was.
    assert _tree(copy / 'checkpoints_unreadable' / '6') == damaged
    assert _steps(copy) == [3, 6]  # step 6 trained again
    jax.tree.map(np.testing.assert_array_equal, _params(state), final_params)
  finally:
    shutil.rmtree(elsewhere, ignore_errors=True)


class FullDisk(checkpoints.Checkpointer):
  """A disk that fills up in the middle of the save of step ``full_at``.

  Orbax's temporary directory of the step is half written when the write fails with
  ENOSPC, as it would be on a full disk.
  """

  def __init__(self, workdir: str, keep: int, full_at: int):
    super().__init__(workdir, keep=keep)
    self.full_at = full_at

  def save(self, step, state, meta):
    if step != self.full_at:
      return super().save(step, state, meta)
    partial = self.directory / f'{step}.orbax-checkpoint-tmp-1764400000'
    (partial / 'state').mkdir(parents=True)
    (partial / 'state' / 'manifest.ocdbt').write_bytes(b'\0' * 100)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_stops_the_run_at_that_save_in_one_line(finished_run, digits_dir, tmp_path):
  workdir, _ = finished_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'checkpoints' / '6')  # resumes at 3; the save of 6 hits the full disk
  kept = _tree(copy / 'checkpoints' / '3')
  restored = ocp.StandardCheckpointer().restore(copy / 'checkpoints' / '3' / 'state')
  size = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(restored))

  with pytest.raises(checkpoints.SaveError) as failed:
    trainer.train_and_evaluate(
      tiny_config(digits_dir), str(copy), checkpointer=FullDisk(str(copy), keep=3, full_at=6)
    )
  message = str(failed.value)
  assert '\n' not in message
  assert message.startswith(
    f'saving checkpoint step 6 in {copy / "checkpoints"} failed: No space left on device '
    f'(errno 28); a checkpoint needs about {size / 2**20:.1f} MiB, '
  ), message
  assert 'the newest complete checkpoint (step 3) is untouched: free some space' in message
  # The partial directory is gone, the last good checkpoint is as it was.
  assert sorted(p.name for p in (copy / 'checkpoints').iterdir()) == ['3']
  assert _tree(copy / 'checkpoints' / '3') == kept


def test_a_save_failing_in_the_background_stops_the_run_at_once_in_one_line(digits_dir, tmp_path):
  """A real failure: no file may grow past 20 kB, so TensorStore's writes of the first
  checkpoint (step 4) fail in orbax's background thread, as on a full disk."""
  workdir = tmp_path / 'run'
  command, env = main_command(
    digits_dir,
    workdir,
    devices=2,
    script='tests/train_program.py',
    num_train_steps=12,
    log_every_steps=1,
    checkpoint_every_steps=4,
    eval_every_steps=12,
  )
  env.update(GSA_TEST_FILE_SIZE_LIMIT='20000', GSA_TEST_STEP_PAUSE='0.5')
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr and 'Event loop is closed' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(
    f'error: saving checkpoint step 4 in {workdir / "checkpoints"} failed: File too large '
    '(errno 27); a checkpoint needs about '
  ), last
  assert 'there is no complete checkpoint yet' in last
  # Stopped before the next save would have found it, and no partial directory is left.
  assert '[4] grad_norm=' in result.stderr  # training reached the save
  assert '[8] ' not in result.stderr
  assert list((workdir / 'checkpoints').iterdir()) == []


def test_checkpoint_of_another_model_names_the_parameter(finished_run, digits_dir, tmp_path):
  workdir, _ = finished_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  wider = tiny_config(digits_dir, num_filters=16)
  with pytest.raises(workdir_lib.ConfigChangedError, match='num_filters 8 -> 16'):
    trainer.train_and_evaluate(wider, str(copy))  # config.json stops it first
  wider.allow_config_changes = 'num_filters'
  with pytest.raises(checkpoints.CheckpointMismatchError) as info:
    trainer.train_and_evaluate(wider, str(copy))
  message = str(info.value)
  assert "['params']" in message and 'shape' in message
  # The first parameter (in tree order) and both of its shapes.
  assert "['params']['BottleneckBlock_0']['BatchNorm_0']['bias']" in message
  assert 'shape (8,) in the checkpoint but (16,) in this model' in message
  assert _steps(copy) == [3, 6]


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(digits_dir, tmp_path):
  config = tiny_config(digits_dir)
  spec = datasets.get('digits')
  real = functools.partial(
    input_pipeline.create_train_iterator,
    input_pipeline.get_builder(spec, digits_dir, image_size=DIGITS_IMAGE_SIZE),
    spec=spec,
    global_batch_size=config.batch_size,
    image_size=config.image_size,
    seed=config.seed,
  )

  def poisoned(start_step):
    for index, batch in enumerate(real(start_step=start_step), start=start_step):
      if index == 4:  # the 5th step sees NaN images
        batch = dict(batch, image=np.full(batch['image'].shape, np.nan, np.float32))
      yield batch

  with pytest.raises(FloatingPointError, match=r'(train_loss|grad_norm) became NaN/inf at step 5;'):
    trainer.train_and_evaluate(config, str(tmp_path), train_data=poisoned)
  assert _steps(tmp_path) == [3]
  # The good checkpoint restores, and is finite.
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'checkpoints' / '3' / 'state')
  assert int(restored['step']) == 3
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored['params']))


def test_a_moving_average_turned_on_in_a_restart_starts_at_the_restored_parameters(
  finished_run, digits_dir
):
  """A checkpoint without an average restores into a state that keeps one (ema_decay
  turned on with allow_config_changes): the average starts at the restored parameters; a
  state without one ignores a checkpoint's."""
  workdir, final_params = finished_run
  averaging = state_lib.abstract(
    experiment.setup(tiny_config(digits_dir, ema_decay=0.9), 10), DIGITS_IMAGE_SIZE
  )
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
    state_lib.state_dict(averaging),
  )
  reader = checkpoints.Checkpointer(str(workdir), keep=1, read_only=True)
  restored, _, step = reader.restore_latest(target)
  assert step == 6 and state_lib.EMA not in restored  # the run kept no average
  zeros = lambda state: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
  resumed = state_lib.restore_into(zeros(averaging), restored)
  for tree in (resumed.params, resumed.ema_params):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, tree), final_params)
  assert int(resumed.step) == 6 and resumed.ema_decay == 0.9

  plain = state_lib.abstract(experiment.setup(tiny_config(digits_dir), 10), DIGITS_IMAGE_SIZE)
  with_average = dict(restored, ema_params=restored['params'])
  assert state_lib.restore_into(zeros(plain), with_average).ema_params is None
