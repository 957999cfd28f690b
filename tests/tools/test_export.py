"""export: a run's newest checkpoint to one file and back, bit for bit, with its card."""

import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from clu import metric_writers
from helpers import REPO, environment, tiny_config

from gsa_flax.model import pretrained, weights
from gsa_flax.tools import export
from gsa_flax.train import checkpoints, experiment
from gsa_flax.train import state as state_lib
from gsa_flax.train import workdir as workdir_lib

STEP = 7
ACCURACY = 0.875


def _save_run(workdir, config, metrics):
  """A workdir as training leaves it: config.json, a checkpoint at STEP with random
  parameters, statistics (and moving average, if the config keeps one), and ``metrics``
  events at STEP (eval_accuracy 0.5 at STEP - 1, not on any card). Written with training's
  own save functions; nothing is trained. Returns the model and the state."""
  pieces = experiment.setup(config, 10)
  # The state's structure without computing an initialisation; values drawn below.
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state_lib.abstract(pieces, 16))
  rng = np.random.default_rng(156)
  draw = lambda tree: jax.tree.map(lambda p: 0.3 * rng.normal(size=p.shape).astype(p.dtype), tree)
  state = state.replace(
    step=STEP,
    params=draw(state.params),
    batch_stats=jax.tree.map(
      lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), state.batch_stats
    ),
    ema_params=None if state.ema_params is None else draw(state.ema_params),
  )
  workdir_lib.write_config(config, workdir)
  saver = checkpoints.Checkpointer(str(workdir), keep=1)
  saver.save(STEP, state_lib.state_dict(state), {'step': STEP})
  saver.wait()
  writer = metric_writers.create_default_writer(str(workdir))
  writer.write_scalars(STEP - 1, {'eval_accuracy': 0.5})  # another step: not on the card
  writer.write_scalars(STEP, metrics)
  writer.flush()
  return pieces.model, state


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  """A run without a moving average: the workdir, the model and the state."""
  workdir = tmp_path_factory.mktemp('run')
  model, state = _save_run(workdir, tiny_config(''), {'eval_accuracy': ACCURACY, 'eval_loss': 0.25})
  return workdir, model, state


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

  loaded = pretrained.load_pretrained(output)
  images = np.random.default_rng(157).normal(size=(4, 16, 16, 3)).astype(np.float32)
  want = model.apply(state_lib.variables(state), images, train=False)
  got = loaded.model.apply(loaded.variables, images, train=False)
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


def test_a_run_with_a_moving_average_exports_it_unless_asked_for_the_raw_parameters(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  metrics = {'eval_accuracy': 0.625, 'ema_eval_accuracy': ACCURACY, 'ema_eval_top5_accuracy': 1.0}
  _, state = _save_run(workdir, tiny_config('', ema_decay=0.999), metrics)
  for raw, params, card_metrics in (
    (False, state.ema_params, {'eval_accuracy': ACCURACY, 'eval_top5_accuracy': 1.0}),
    (True, state.params, {'eval_accuracy': 0.625}),
  ):
    output = tmp_path / f'raw{raw}.msgpack'
    card = export.run(str(workdir), str(output), raw=raw)
    contents = weights.read(output)
    # The card's accuracy is that of the weights in the file, and it says which they are.
    assert {k: card[k] for k in ('eval_accuracy', 'eval_top5_accuracy') if k in card} == (
      card_metrics
    )
    assert card.get('weights') == (None if raw else 'ema (decay 0.999)')
    assert contents.card == card
    for a, b in zip(
      jax.tree.leaves(jax.tree.map(np.asarray, params)),
      jax.tree.leaves(contents.variables['params']),
      strict=True,
    ):
      np.testing.assert_array_equal(a, b)
