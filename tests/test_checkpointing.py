"""Checkpoints are never destroyed: corrupted steps, wrong models and divergence."""

import functools
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import DIGITS_IMAGE_SIZE, tiny_config

from gsa_flax import checkpointing, datasets, input_pipeline, train


def _params(state):
  return jax.tree.map(np.asarray, state.params)


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


@pytest.fixture(scope='module')
def finished_run(digits_dir, tmp_path_factory):
  """A 6-step run with checkpoints at 3 and 6, and its final state."""
  workdir = tmp_path_factory.mktemp('finished')
  state = train.train_and_evaluate(tiny_config(digits_dir), str(workdir))
  return workdir, _params(state)


def _truncate_files(directory):
  corrupted = 0
  for path in directory.rglob('*'):
    if path.is_file() and path.stat().st_size > 64:
      data = path.read_bytes()
      path.write_bytes(data[: len(data) // 3])
      corrupted += 1
  assert corrupted


def test_corrupted_latest_checkpoint_falls_back_and_keeps_it(
  finished_run, digits_dir, tmp_path, caplog
):
  workdir, final_params = finished_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  _truncate_files(copy / 'checkpoints' / '6' / 'state')

  state = train.train_and_evaluate(tiny_config(digits_dir), str(copy))

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


def test_checkpoint_of_another_model_names_the_parameter(finished_run, digits_dir, tmp_path):
  workdir, _ = finished_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  with pytest.raises(checkpointing.CheckpointMismatchError) as info:
    train.train_and_evaluate(tiny_config(digits_dir, num_filters=16), str(copy))
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
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch

  with pytest.raises(FloatingPointError, match=r'(train_loss|grad_norm) became NaN/inf at step 5;'):
    train.train_and_evaluate(config, str(tmp_path), train_data=poisoned)
  assert _steps(tmp_path) == [3]
  # The good checkpoint restores, and is finite.
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'checkpoints' / '3' / 'state')
  assert int(restored['step']) == 3
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored['params']))
