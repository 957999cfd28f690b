"""export: a run's newest checkpoint to one file and back, bit for bit, with its card."""

import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from clu import metric_writers
from helpers import REPO, environment, tiny_config

from gsa_flax import checkpointing, models, weights
from gsa_flax import state as state_lib
from gsa_flax.tools import export

STEP = 7
ACCURACY = 0.875


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  """A workdir as training leaves it: config.json, a checkpoint at STEP with random
  parameters and statistics, and eval_accuracy events at STEP - 1 and STEP. Written with
  training's own save functions; nothing is trained. Returns the workdir, the model and the
  state."""
  workdir = tmp_path_factory.mktemp('run')
  config = tiny_config('')
  pieces = state_lib.setup(config, 10)
  # The state's structure without computing an initialisation; values drawn below.
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state_lib.abstract(pieces, 16))
  rng = np.random.default_rng()
  state = state.replace(
    step=STEP,
    params=jax.tree.map(lambda p: 0.3 * rng.normal(size=p.shape).astype(p.dtype), state.params),
    batch_stats=jax.tree.map(
      lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), state.batch_stats
    ),
  )
  checkpointing.write_config(config, workdir)
  saver = checkpointing.Checkpointer(str(workdir), keep=1)
  saver.save(STEP, checkpointing.state_dict(state), {'step': STEP})
  saver.wait()
  writer = metric_writers.create_default_writer(str(workdir))
  writer.write_scalars(STEP - 1, {'eval_accuracy': 0.5})  # another step: not on the card
  writer.write_scalars(STEP, {'eval_accuracy': ACCURACY, 'eval_loss': 0.25})
  writer.flush()
  return workdir, pieces.model, state


def test_export_then_load_gives_bit_identical_logits(saved_run, tmp_path, capsys):
  workdir, model, state = saved_run
  output = tmp_path / 'exported' / 'tiny.msgpack'
  card = export.run(str(workdir), str(output))
  printed = capsys.readouterr().out.strip().splitlines()
  assert printed == [f'{output}: {weights.describe(card)}']
  parameters = sum(leaf.size for leaf in jax.tree.leaves(state.params))
  assert card == {
    'model': 'gsa_resnet_tiny',
    'dataset': 'digits',
    'resolution': 16,
    'num_classes': 10,
    'parameters': parameters,
    'step': STEP,
    'eval_accuracy': ACCURACY,
  }
  assert f'{parameters:,} parameters' in printed[0] and 'eval_accuracy 0.8750' in printed[0]

  contents = weights.read(output)
  assert contents.card == card and contents.config['model'] == 'gsa_resnet_tiny'
  for name in ('params', 'batch_stats'):
    saved = jax.tree.leaves(jax.tree.map(np.asarray, getattr(state, name)))
    read = jax.tree.leaves(contents.variables[name])
    assert len(saved) == len(read)
    for a, b in zip(saved, read, strict=True):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)

  pretrained = models.load_pretrained(output)
  images = np.random.default_rng().normal(size=(4, 16, 16, 3)).astype(np.float32)
  want = model.apply(state_lib.variables(state), images, train=False)
  got = pretrained.model.apply(pretrained.variables, images, train=False)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_card_without_an_evaluation_has_no_accuracy(saved_run, tmp_path, capsys):
  # The same run without its event files.
  shutil.copytree(saved_run[0], tmp_path / 'run', ignore=shutil.ignore_patterns('events.*'))
  card = export.run(str(tmp_path / 'run'), str(tmp_path / 'w.msgpack'))
  assert 'eval_accuracy' not in card and card['step'] == STEP
  assert 'eval_accuracy' not in capsys.readouterr().out


def test_cli(saved_run, tmp_path):
  workdir = saved_run[0]
  output = tmp_path / 'tiny.msgpack'
  command = [sys.executable, '-m', 'gsa_flax.tools.export', f'--output={output}']
  ok = subprocess.run(
    [*command, f'--workdir={workdir}'],
    env=environment(devices=1),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert ok.stdout.strip() == f'{output}: ' + weights.describe(weights.read(output).card)
  missing = subprocess.run(
    [*command, f'--workdir={tmp_path / "nowhere"}'],
    env=environment(devices=1),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert missing.returncode == 2
  errors = [line for line in missing.stderr.splitlines() if line.startswith('error:')]
  assert errors == [
    f'error: workdir {tmp_path / "nowhere"} does not exist; pass the --workdir of a training run.'
  ]
  assert 'Traceback' not in missing.stderr
