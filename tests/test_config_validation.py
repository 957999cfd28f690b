"""Bad input stops main.py within seconds, before any compile, with one clear line.

Every case runs the real ``main.py`` in a subprocess (8 forced CPU devices); they run
concurrently to keep the suite fast. None of them may leave a traceback, a compiled step
or a file in the workdir behind.
"""

import concurrent.futures
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import pytest
from helpers import DIGITS_IMAGE_SIZE, REPO, environment

from configs import default
from gsa_flax.train import config_validation

# case -> (extra flags, workdir relative to tmp (None: default), words the message must name)
CASES = {
  'unknown_model': (
    ['--config.model=gsa_resnet51'],
    ['config.model', 'gsa_resnet51', 'gsa_resnet50'],
  ),
  'unknown_dataset': (['--config.dataset=mnist'], ['config.dataset', 'mnist', 'cifar100']),
  'batch_not_divisible': (['--config.batch_size=12'], ['config.batch_size=12', '8 devices']),
  'eval_batch_not_divisible': (['--config.eval_batch_size=20'], ['config.eval_batch_size=20']),
  'heads_do_not_divide': (['--config.gsa.num_heads=3'], ['num_heads=3', 'divide']),
  'image_too_small': (['--config.image_size=4'], ['config.image_size=4', 'downsamples by 8']),
  'missing_dataset': (['--config.dataset=cifar100'], ['cifar100', 'tfds build', 'data_dir']),
  'unwritable_workdir': ([], ['--workdir', 'cannot be written']),
  'zero_steps': (['--config.num_train_steps=0', '--config.num_epochs=0'], ['num_train_steps']),
  'negative_learning_rate': (['--config.learning_rate=-0.1'], ['config.learning_rate=-0.1']),
  'bad_dtype': (['--config.dtype=float8'], ['config.dtype', 'bfloat16']),
  'even_rel_length': (['--config.gsa.rel_length=4'], ['rel_length', 'odd']),
  'attention_stages_length': (['--config.gsa.attention_stages=(True,)'], ['attention_stages']),
  'bad_label_smoothing': (['--config.label_smoothing=1.5'], ['config.label_smoothing=1.5']),
  'batch_larger_than_data': (['--config.batch_size=2048'], ['batch_size=2048', '1437']),
  'bad_positional_mode': (["--config.gsa.positional='row'"], ['positional', 'axial']),
  'bad_order': (['--config.gsa.order=keys'], ['order', 'logits', 'values']),
  'values_order_with_softmax': (
    ['--config.gsa.order=values', '--config.gsa.positional_softmax=True'],
    ['values', 'softmax'],
  ),
  'eval_interval_twice': (['--config.eval_every_steps=10'], ['eval_every_steps=10', 'exactly one']),
  # A number that cannot train, caught before TensorFlow is imported (more in NUMBERS).
  'infinite_learning_rate': (
    ['--config.learning_rate=inf'],
    ['config.learning_rate=inf', 'finite'],
  ),
  'warmup_longer_than_run': (
    ['--config.warmup_epochs=1.0'],
    ['config.warmup_epochs=1.0', '22 steps of warmup', '(5 steps)', 'warmup_epochs <= 0.181'],
  ),
  'bad_flag_value': (['--config.batch_size=many'], ['config.batch_size', 'many']),
  # The config file itself.
  'config_file_missing': (['--config={tmp}/nowhere.py'], ['--config=', 'nowhere.py: no such file']),
  'config_syntax_error': (
    ['--config={tmp}/syntax.py'],
    ['syntax.py', "'{' was never closed", 'line 2'],
  ),
  'get_config_raises': (
    ['--config={tmp}/raises.py', '--config.batch_size=8'],
    ['raises.py: loading it raised ValueError: no such experiment'],
  ),
  'get_config_raises_key_error': (
    ['--config={tmp}/key_error.py'],
    ["key_error.py: loading it raised KeyError: 'imagenet21k'"],
  ),
  # Evaluating a workdir without checkpoints creates nothing, not even the workdir.
  'eval_only_without_checkpoints': (['--config.eval_only=True'], ['eval_only', 'no checkpoint']),
}

CONFIG_FILES = {
  'syntax.py': 'def get_config():\n  return {\n',
  'raises.py': 'def get_config():\n  raise ValueError("no such experiment")\n',
  'key_error.py': 'def get_config():\n  return {}["imagenet21k"]\n',
}


def _run(case: str, data_dir: str, tmp: Path):
  flags = [flag.format(tmp=tmp) for flag in CASES[case][0]]
  workdir = tmp / case
  if case == 'unwritable_workdir':
    (tmp / 'a_file').write_text('not a directory')
    workdir = tmp / 'a_file' / 'run'
  if case == 'missing_dataset':
    data_dir = str(tmp / 'empty_data_dir')
  config_file = [f'--config={REPO / "configs" / "default.py"}']
  if flags and flags[0].startswith('--config='):
    config_file, flags = flags[:1], flags[1:]
  command = [
    sys.executable,
    str(REPO / 'main.py'),
    *config_file,
    f'--workdir={workdir}',
    f'--config.data_dir={data_dir}',
    f'--config.image_size={DIGITS_IMAGE_SIZE}',
    '--config.num_train_steps=5',
    *flags,
  ]
  result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
  return result, workdir


@pytest.fixture(scope='module')
def results(digits_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp('bad_input')
  for name, text in CONFIG_FILES.items():
    (tmp / name).write_text(text)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = {case: pool.submit(_run, case, digits_dir, tmp) for case in CASES}
    return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_one_clear_line(results, case):
  result, workdir = results[case]
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), result.stderr[-2000:]
  for word in CASES[case][1]:
    assert word in last, f'{word!r} not in {last!r}'
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  # Stopped before training: nothing compiled, nothing written in the workdir.
  assert 'Training from step' not in result.stderr
  if case == 'eval_only_without_checkpoints':
    assert not workdir.exists()
  elif workdir.exists():
    assert [p.name for p in workdir.iterdir()] == []


def test_unknown_config_field_is_rejected(digits_dir, tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      str(REPO / 'main.py'),
      f'--config={REPO / "configs" / "default.py"}',
      f'--workdir={tmp_path}',
      '--config.batchsize=64',
    ],
    env=environment(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: a --config.FIELD override failed:'), result.stderr[-2000:]
  assert "'batchsize'" in last and 'batch_size' in last


# field -> (value, words the message must name): checked in this process, as main.py does
# before anything else (one of them through main.py: see 'infinite_learning_rate').
NUMBERS = {
  'weight_decay': (float('nan'), ['config.weight_decay=nan', 'finite number >= 0']),
  'momentum': (1.0, ['config.momentum=1.0', 'in [0, 1)']),
  'label_smoothing': (-0.1, ['config.label_smoothing=-0.1', 'in [0, 1)']),
  'gsa.key_ratio': (1.5, ['config.gsa.key_ratio=1.5', 'in (0, 1]']),
  'seed': (2**32, ['config.seed=4294967296', '[0, 2**32)']),
  'num_filters': (0, ['config.num_filters=0', 'an int in [1, 1024]']),
  'num_epochs': (float('-inf'), ['config.num_epochs=-inf', 'finite number >= 0']),
  'image_size': ('16', ["config.image_size='16'", 'an int in [1, 4096] (got str)']),
  'batch_size': (64.0, ['config.batch_size=64.0', 'an int > 0']),
  'nesterov': (1, ['config.nesterov=1', 'True or False']),
  'stage_sizes': ((2, 0), ['config.stage_sizes=(2, 0)', 'ints in [1, 64]']),
  'gsa.attention_stages': ((1, 0), ['config.gsa.attention_stages=(1, 0)', 'bools']),
  'keep_checkpoints': (0, ['config.keep_checkpoints=0', '> 0']),
  'allow_config_changes': (
    'batchsize',
    ['allow_config_changes', "'batchsize'", 'not a config field'],
  ),
  'ema_decay': (1.0, ['config.ema_decay=1.0', 'in [0, 1)']),
  'remat': ('all', ["config.remat='all'", "'', 'block', 'dots'"]),
  'augment.prob': (1.5, ['config.augment.prob=1.5', '0..1']),
}


@pytest.mark.parametrize('field', sorted(NUMBERS))
def test_a_value_that_cannot_train_is_named(field):
  value, words = NUMBERS[field]
  tree = default.get_config().to_dict()  # plain values: no type is enforced, as in a JSON file
  *parents, leaf = field.split('.')
  target = tree
  for parent in parents:
    target = target[parent]
  target[leaf] = value
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate(ml_collections.ConfigDict(tree))
  for word in words:
    assert word in str(error.value), str(error.value)


# What has no natural bound is bounded by what a real network, the data or the step counter
# allows: each refused at once, in one line (overrides -> words).
BEYOND = {
  'a network no file or run could hold': (
    {'stage_sizes': (3000, 1, 1, 1)},
    ['config.stage_sizes=(3000, 1, 1, 1)', 'ints in [1, 64]'],
  ),
  'heads': ({'gsa.num_heads': 4096}, ['config.gsa.num_heads=4096', 'an int in [1, 64]']),
  'a run the int32 step counter never ends': (
    {'num_train_steps': 10**15},
    ['config.num_train_steps=1000000000000000', 'an int in [-1, 2**31 - 1]'],
  ),
  'digits at 4096x4096': (
    {'image_size': 4096},
    ['config.image_size=4096 is beyond what digits holds', 'use image_size <= 256'],
  ),
  'digits at 4x4 behind a small network': (
    {'image_size': 4, 'stage_sizes': (1, 1), 'num_filters': 8, 'gsa.num_heads': 2},
    ['config.image_size=4 is smaller than digits can be stored at', 'image_size >= 8'],
  ),
  'a data_dir that is a file': ({'data_dir': __file__}, ['is not a directory']),
}


@pytest.mark.parametrize('case', sorted(BEYOND))
def test_what_has_no_natural_bound_is_bounded_in_one_line(case):
  overrides, words = BEYOND[case]
  config = default.get_config()
  for name, value in overrides.items():
    *parents, leaf = name.split('.')
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  started = time.perf_counter()
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate(config)
  assert time.perf_counter() - started < 2
  message = str(error.value)
  assert '\n' not in message and all(word in message for word in words), message


def test_a_run_of_more_epochs_than_the_step_counter_holds_is_refused():
  config = default.get_config()
  config.num_epochs = 1e9
  with pytest.raises(config_validation.ConfigError, match='more than the step counter holds'):
    config_validation.validate_schedule(config, 10, 10**10)


def test_a_key_ratio_that_leaves_no_key_channel_is_rejected():
  config = default.get_config()
  config.gsa.key_ratio = 0.01  # d_k = int(0.01 * 16) = 0 in the first stage
  with pytest.raises(config_validation.ConfigError, match=r'd_k = key_ratio \* 16 = 0'):
    config_validation.validate(config)


def test_the_default_config_passes():
  config_validation.validate(default.get_config())
