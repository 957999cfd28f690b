"""Fine-tuning from trained weights (``config.init_from``): a new resolution, new classes, an
exported file, a clear refusal of what does not fit, and a restart that ignores the source.

One source run (the tiny network on digits at 16x16) serves every test; it is fine-tuned at
32x32 from its exported weights file, and compared with the same steps from scratch.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import time

import jax
import numpy as np
import pytest
from flax import traverse_util
from helpers import main_command, mock_data, tiny_config

from gsa_flax.model import networks, transfer, weights
from gsa_flax.tools import export
from gsa_flax.tools.events import read_scalars
from gsa_flax.train import checkpoints, finetune, restore, trainer

# The source: about 80% test accuracy after 100 steps (chance: 10%).
SOURCE = dict(
  num_train_steps=100,
  eval_every_steps=100,
  checkpoint_every_steps=100,
  batch_size=32,
  learning_rate=4.0,
)
# The fine-tune (and the from-scratch baseline): 40 steps at twice the resolution, at a
# quarter of the source's peak learning rate (the usual for fine-tuning: the source's peak
# for a fresh optimizer undoes part of what was learnt before the cosine brings it down).
FINETUNE = dict(
  SOURCE,
  learning_rate=1.0,
  image_size=32,
  num_train_steps=40,
  eval_every_steps=40,
  checkpoint_every_steps=20,
)
# The global L of both GSA layers of the tiny network at 16x16 and at 32x32: both attend at
# the full map (the strided block pools after its GSA module), 2 * 16 - 1 and 2 * 32 - 1.
SOURCE_L, TARGET_L = 31, 63
# Tolerance of "at least the source's accuracy": two standard errors of an accuracy near
# 0.76 measured on the 360 test digits, 2 * sqrt(0.76 * 0.24 / 360) = 0.045.
NOISE = 0.045


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep='/')


@pytest.fixture(scope='module')
def source(digits_dir, tmp_path_factory):
  """The source run, its exported weights file and its final test accuracy."""
  workdir = tmp_path_factory.mktemp('source')
  trainer.train_and_evaluate(tiny_config(digits_dir, **SOURCE), str(workdir))
  weights_file = tmp_path_factory.mktemp('exported') / 'source.msgpack'
  export.run(str(workdir), str(weights_file))
  accuracy = read_scalars(str(workdir))['eval_accuracy'][SOURCE['num_train_steps']]
  return workdir, weights_file, accuracy


@pytest.fixture(scope='module')
def finetuned(source, digits_dir, tmp_path_factory):
  """The source fine-tuned at 32x32 from a copy of its weights file (a copy: the restart
  test deletes it), and the same run from scratch."""
  weights_file = tmp_path_factory.mktemp('finetune_source') / 'source.msgpack'
  shutil.copy(source[1], weights_file)
  workdir = tmp_path_factory.mktemp('finetuned')
  config = tiny_config(digits_dir, init_from=str(weights_file), **FINETUNE)
  state = trainer.train_and_evaluate(config, str(workdir))
  scratch = tmp_path_factory.mktemp('scratch')
  trainer.train_and_evaluate(tiny_config(digits_dir, **FINETUNE), str(scratch))
  return workdir, weights_file, state, scratch


def test_finetuning_at_twice_the_resolution_keeps_the_accuracy(source, finetuned):
  _, _, source_accuracy = source
  workdir, weights_file, state, scratch = finetuned
  step = FINETUNE['num_train_steps']
  accuracy = read_scalars(str(workdir))['eval_accuracy'][step]
  from_scratch = read_scalars(str(scratch))['eval_accuracy'][step]
  print(f'source {source_accuracy:.3f}, fine-tuned {accuracy:.3f}, scratch {from_scratch:.3f}')
  assert source_accuracy > 0.6  # well above chance (0.1): there is something to transfer
  assert accuracy >= source_accuracy - NOISE
  assert accuracy > from_scratch + 0.3  # the same 40 steps from scratch stay far below

  # Every position table has the global length at 32x32.
  tables = {
    p: v.shape for p, v in _flat(state.params).items() if p.endswith(('rel_col', 'rel_row'))
  }
  assert len(tables) == 4 and all(shape[0] == TARGET_L for shape in tables.values()), tables
  # Where the weights came from is recorded with every checkpoint.
  for saved in (20, 40):
    meta = json.loads((workdir / 'checkpoints' / str(saved) / 'meta' / 'metadata').read_text())
    assert meta['init_from'].startswith(f'weights file {weights_file} (gsa_resnet_tiny on digits')


def test_the_source_is_resized_and_its_head_kept(source, digits_dir):
  """What a fine-tune at 32x32 starts from: the source's tables at the new length, by
  :func:`transfer.resize_table`, every other variable as it was."""
  workdir, weights_file, _ = source
  config = tiny_config(digits_dir, init_from=str(weights_file), **FINETUNE)
  model = networks.build(networks.architecture_of(config), 10)
  start = finetune.read_init_from(config.init_from, model, config.image_size)
  assert start.adapted.reinitialized == ()
  assert sorted(length for _, *length in start.adapted.resized) == [[SOURCE_L, TARGET_L]] * 4
  assert start.origin.startswith(f'weights file {weights_file} (')
  trained = _flat(restore.load(workdir).variables)
  adapted = _flat(start.adapted.variables)
  assert adapted.keys() == trained.keys()
  for path, value in trained.items():
    if path.endswith(('rel_col', 'rel_row')):
      np.testing.assert_array_equal(adapted[path], transfer.resize_table(value, TARGET_L))
    else:
      np.testing.assert_array_equal(adapted[path], value)


def test_a_digits_checkpoint_gives_a_100_class_run_a_new_head(source, mock_data_dir, tmp_path):
  workdir, _, _ = source
  config = tiny_config(
    '/ignored/by/the/mock',
    dataset='cifar100',
    image_size=16,
    batch_size=8,
    eval_batch_size=8,
    num_train_steps=2,
    eval_every_steps=2,
    checkpoint_every_steps=2,
    # Small enough that two steps leave the copied parameters where they were (to 1e-5).
    learning_rate=1e-5,
    init_from=str(workdir / 'checkpoints'),  # a run's checkpoints directory
    ema_decay=0.5,  # an average started at the copied parameters stays there too
  )
  with mock_data(mock_data_dir):
    state = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2 and np.isfinite(read_scalars(str(tmp_path))['train_loss'][2])
  params = _flat(state.params)
  source_params = _flat(restore.load(workdir).variables['params'])
  assert params['head/kernel'].shape == (source_params['head/kernel'].shape[0], 100)
  assert params['head/bias'].shape == (100,)
  ema = _flat(state.ema_params)
  for path, value in source_params.items():
    if not path.startswith('head/'):
      np.testing.assert_allclose(params[path], value, atol=1e-5, err_msg=path)
      np.testing.assert_allclose(ema[path], value, atol=1e-5, err_msg=path)


def test_restore_load_reads_a_run_its_checkpoints_or_one_step(source):
  workdir, _, _ = source
  step = SOURCE['num_train_steps']
  newest = restore.load(workdir)
  for path in (workdir / 'checkpoints', workdir / 'checkpoints' / str(step)):
    loaded = restore.load(path)
    assert loaded.step == step
    jax.tree.map(np.testing.assert_array_equal, _flat(loaded.variables), _flat(newest.variables))
  with pytest.raises(checkpoints.CheckpointError, match='has no checkpoint of step 7'):
    restore.load(workdir / 'checkpoints' / '7')


def _fifo(root):
  os.mkfifo(root / 'fifo')
  return root / 'fifo'


def _claiming_3000_blocks(root):
  """A small weights file whose config claims 3000 blocks in its first stage."""
  config = tiny_config('', stage_sizes=(1, 1))
  model = networks.build(networks.architecture_of(config), 10)
  variables = jax.tree.map(
    lambda s: np.zeros(s.shape, s.dtype), networks.abstract_variables(model, 16)
  )
  config.stage_sizes = (3000, 1, 1, 1)
  return weights.export(root / 'huge.msgpack', config, variables, {})


@pytest.mark.parametrize(
  'make,words',
  [
    (lambda root: root / 'nowhere', 'does not exist'),
    (lambda root: root / 'notes.txt', 'is not a gsa-flax weights file'),
    (lambda root: root, 'config.json is missing: ... is not a training workdir'),
    (_fifo, 'is a FIFO, not an exported weights file'),  # would block for ever
    (
      _claiming_3000_blocks,  # would build for minutes
      'its config does not describe ... stage_sizes=(3000, 1, 1, 1) is beyond any real network',
    ),
  ],
)
def test_an_unusable_source_is_one_clear_error(digits_dir, tmp_path, make, words):
  (tmp_path / 'notes.txt').write_text('not weights')
  init_from = make(tmp_path)
  config = tiny_config(digits_dir, init_from=str(init_from))
  started = time.perf_counter()
  with pytest.raises(transfer.TransferError) as refused:
    model = networks.build(networks.architecture_of(config), 10)
    finetune.read_init_from(config.init_from, model, config.image_size)
  assert time.perf_counter() - started < 10
  message = str(refused.value)
  assert message.startswith(f'config.init_from={init_from}: ') and '\n' not in message
  for part in words.split(' ... '):
    assert part in message


def test_another_architecture_is_one_error_line_from_main_before_any_compile(
  source, digits_dir, tmp_path
):
  workdir, _, _ = source
  command, env = main_command(
    digits_dir, tmp_path / 'run', devices=1, model='resnet_tiny', init_from=str(workdir)
  )
  env['JAX_LOG_COMPILES'] = '1'  # JAX logs every compile: "Compiling jit(f) with ... shapes"

  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr[-3000:]
  assert errors[0].startswith(f"error: config.init_from={workdir} does not fit this run's network")
  assert 'another architecture' in errors[0]
  assert 'Traceback' not in result.stderr
  # Nothing of the network was compiled (no `create`, `train_step`, ...): only the random
  # key of the shape-only initialisation, `jax.random.key(0)`.
  compiled = set(re.findall(r'Compiling jit\((\w+)\)', result.stderr))
  assert compiled <= {'stage', '_threefry_seed'}, compiled
  assert not (tmp_path / 'run' / 'config.json').exists()


def test_a_preempted_finetune_resumes_from_its_own_checkpoint(
  finetuned, digits_dir, tmp_path, caplog
):
  workdir, weights_file, state, _ = finetuned
  # The run as preemption leaves it: its checkpoint of step 20, not yet that of step 40.
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  shutil.rmtree(run / 'checkpoints' / '40')
  weights_file.unlink()  # the source is gone: a restart that read it would stop
  caplog.set_level(logging.INFO)
  config = tiny_config(digits_dir, init_from=str(weights_file), **FINETUNE)
  resumed = trainer.train_and_evaluate(config, str(run))
  assert 'Resumed from checkpoint at step 20.' in caplog.text
  assert f'config.init_from={weights_file} is not read' in caplog.text
  assert f'Started from weights file {weights_file} (' in caplog.text  # the summary says so
  # Exactly where the uninterrupted fine-tune ended.
  jax.tree.map(np.testing.assert_array_equal, _flat(resumed.params), _flat(state.params))
  jax.tree.map(np.testing.assert_array_equal, _flat(resumed.batch_stats), _flat(state.batch_stats))
