"""A workdir is a ledger: one writer, a record that restarts are held to, damaged files as one line.

The lock is held by this process while main.py tries the workdir; the lease (the lock of
a ``gs://`` workdir) is exercised on a local path with leases of a second or two. The
record is tested on a finished tiny run trained in this process; predict and visualize
also through their command lines.
"""

import concurrent.futures
import datetime
import json
import logging
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from helpers import REPO, environment, main_command, tiny_config

from gsa_flax import files
from gsa_flax.tools import predict, visualize
from gsa_flax.train import config_validation, lock, trainer
from gsa_flax.train import workdir as workdir_lib

# ----------------------------------------------------------------------------- one writer


def test_a_second_run_is_refused_naming_the_first_and_writes_nothing(digits_dir, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with lock.FileLock(workdir):  # this process is "the first run"
    command, env = main_command(digits_dir, workdir, devices=1)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(
    f'error: {workdir} is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, '
    'started 20'
  ), last
  assert 'Traceback' not in result.stderr
  assert [p.name for p in workdir.iterdir()] == ['lock.json']  # no config.json, events, checkpoints


def test_a_lease_is_renewed_while_held_and_removed_when_released(tmp_path):
  path = tmp_path / 'lock.json'
  with lock.Lease(path, seconds=1.0, settle=0):
    time.sleep(2.5)  # two and a half lease lengths: only the renewals keep it
    with pytest.raises(workdir_lib.WorkdirBusyError) as refused:
      lock.Lease(path, seconds=1.0, settle=0).acquire()
    assert f'host {socket.gethostname()}, pid {os.getpid()}, started ' in str(refused.value)
    assert 'its lease expires at' in str(refused.value)
  assert not path.exists()
  with lock.Lease(path, seconds=1.0, settle=0):
    assert json.loads(path.read_text())['pid'] == os.getpid()


def test_a_lease_that_is_no_longer_renewed_expires(tmp_path):
  path = tmp_path / 'lock.json'
  # What a preempted VM leaves behind: its lease, which nobody renews any more.
  started = '2026-01-01T00:00:00+00:00'
  expires = time.time() + 2.0
  holder = {
    'host': 'preempted-vm',
    'pid': 4242,
    'started': started,
    'token': 'x',
    'expires': expires,
  }
  path.write_text(json.dumps(holder))
  with pytest.raises(workdir_lib.WorkdirBusyError) as refused:
    lock.Lease(path, seconds=60, settle=0).acquire()
  assert f'(host preempted-vm, pid 4242, started {started}; its lease expires at ' in str(
    refused.value
  )
  time.sleep(max(expires - time.time(), 0) + 0.5)
  with lock.Lease(path, seconds=60, settle=0):
    taken = json.loads(path.read_text())
    assert (taken['host'], taken['pid']) == (socket.gethostname(), os.getpid())
    assert taken['expires'] > time.time() + 50


# ----------------------------------------------------------------------------- the record


@pytest.fixture(scope='module')
def finished(digits_dir, tmp_path_factory):
  """The tiny digits run, finished at step 6 (checkpoints 3 and 6)."""
  workdir = tmp_path_factory.mktemp('finished')
  trainer.train_and_evaluate(tiny_config(digits_dir), str(workdir))
  return workdir


def _copy(workdir, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  return copy


def _contents(workdir) -> dict[str, bytes]:
  """Every file of the workdir but the lock's own (each run rewrites its holder there)."""
  return {
    str(p.relative_to(workdir)): p.read_bytes()
    for p in sorted(workdir.rglob('*'))
    if p.is_file() and p.name != 'lock.json'
  }


def test_a_restart_that_changes_what_is_trained_is_refused(finished, digits_dir, tmp_path):
  run = _copy(finished, tmp_path)
  before = _contents(run)
  changed = tiny_config(digits_dir, batch_size=32, seed=1, eval_every_steps=3)
  with pytest.raises(workdir_lib.ConfigChangedError) as refused:
    trainer.train_and_evaluate(changed, str(run))
  message = str(refused.value)
  assert '\n' not in message
  assert f'differs from {run / "config.json"}' in message
  assert 'batch_size 16 -> 32, seed 0 -> 1.' in message  # every field, with both values
  assert 'eval_every_steps' not in message  # an interval changes nothing that is trained
  assert '--config.allow_config_changes=batch_size,seed' in message
  assert _contents(run) == before


def test_free_fields_and_eval_only_leave_the_record_alone(finished, digits_dir, tmp_path, caplog):
  caplog.set_level(logging.INFO)  # the summary is logged at INFO
  run = _copy(finished, tmp_path)
  before = _contents(run)
  free = dict(eval_every_steps=2, log_every_steps=1, keep_checkpoints=5, eval_batch_size=40)
  state = trainer.train_and_evaluate(tiny_config(digits_dir, **free), str(run))
  assert int(state.step) == 6
  assert 'Nothing to train: the run was complete at step 6' in caplog.text
  assert _contents(run) == before  # nothing trained, nothing written

  trainer.train_and_evaluate(tiny_config(digits_dir, eval_only=True), str(run))
  assert 'Evaluated the checkpoint of step 6: latest eval_loss=' in caplog.text
  after = _contents(run)
  assert {name: after[name] for name in before} == before
  added = set(after) - set(before)
  assert len(added) == 1 and added.pop().startswith('events.out.tfevents')  # the evaluation's


def test_shrinking_a_finished_run_is_refused(finished, digits_dir, tmp_path):
  run = _copy(finished, tmp_path)
  before = _contents(run)
  with pytest.raises(workdir_lib.ConfigChangedError, match='num_train_steps 6 -> 4'):
    trainer.train_and_evaluate(tiny_config(digits_dir, num_train_steps=4), str(run))
  allowed = tiny_config(digits_dir, num_train_steps=4, allow_config_changes='num_train_steps')
  with pytest.raises(config_validation.ConfigError) as refused:
    trainer.train_and_evaluate(allowed, str(run))
  assert 'this run has trained 6 steps' in str(refused.value)
  assert 'more than the 4 the config asks for' in str(refused.value)
  assert _contents(run) == before


def test_extending_a_finished_run_says_what_the_learning_rate_does_and_is_recorded(
  finished, digits_dir, tmp_path, caplog
):
  run = _copy(finished, tmp_path)
  record = json.loads((run / 'config.json').read_text())
  longer = tiny_config(digits_dir, num_train_steps=8, allow_config_changes='num_train_steps')
  state = trainer.train_and_evaluate(longer, str(run))
  assert int(state.step) == 8

  # The tiny config has no warmup: lr(s) = peak * (1 + cos(pi * s / length)) / 2 with
  # peak = learning_rate * batch_size / 256. Step 7 trains at s = 6: the end of the 6-step
  # cosine (0) under the record, well up the 8-step one under the new config.
  peak = 1.0 * 16 / 256
  again = peak * (1 + math.cos(math.pi * 6 / 8)) / 2
  warning = next(
    r.getMessage() for r in caplog.records if 'learning rate of step 7' in r.getMessage()
  )
  assert "changes from 0 (config.json's schedule of 6 steps, which had ended)" in warning
  assert f'to {again:.6g} (the new schedule of 8 steps, peak {peak:.6g})' in warning

  history = [json.loads(line) for line in (run / 'config_history.jsonl').read_text().splitlines()]
  assert len(history) == 1
  assert history[0]['step'] == 6
  assert history[0]['changes'] == {'num_train_steps': {'old': 6, 'new': 8}}
  age = datetime.datetime.now().astimezone() - datetime.datetime.fromisoformat(history[0]['time'])
  assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=10)
  # The record now says 8 steps and nothing else changed in it.
  assert json.loads((run / 'config.json').read_text()) == dict(record, num_train_steps=8)


def test_a_key_the_code_does_not_know_is_reported_once_and_ignored(
  finished, digits_dir, tmp_path, caplog
):
  run = _copy(finished, tmp_path)
  path = run / 'config.json'
  record = json.loads(path.read_text())
  # Written by hand, or by a version whose fields were later removed.
  record['retired_field'] = 3
  record['gsa']['retired_knob'] = 'x'
  path.write_text(json.dumps(record))
  before = _contents(run)
  caplog.set_level(logging.INFO)
  state = trainer.train_and_evaluate(tiny_config(digits_dir), str(run))  # reads it 3 times
  assert int(state.step) == 6 and 'Nothing to train' in caplog.text
  for name in ('retired_field', 'gsa.retired_knob'):
    reports = [r.getMessage() for r in caplog.records if f'holds {name}, which' in r.getMessage()]
    assert reports == [
      f'{path} holds {name}, which this gsa-flax does not know (a field of another version, '
      'or added by hand): ignored.'
    ]
  assert _contents(run) == before
  # An accepted change keeps the record's other keys, known or not.
  workdir_lib.record_changes(run, {'num_train_steps': (6, 8)}, 6, trainer.RULES)
  assert json.loads(path.read_text()) == dict(record, num_train_steps=8)


def test_a_record_older_than_a_field_takes_its_value_from_before(
  finished, digits_dir, tmp_path, caplog
):
  run = _copy(finished, tmp_path)
  path = run / 'config.json'
  record = json.loads(path.read_text())
  del record['remat'], record['augment'], record['gsa']['order']  # added after it was written
  path.write_text(json.dumps(record))
  caplog.set_level(logging.INFO)
  state = trainer.train_and_evaluate(tiny_config(digits_dir), str(run))
  assert int(state.step) == 6 and 'Nothing to train' in caplog.text
  logged = caplog.text
  assert f'{path} has no remat (written before the field existed): it takes the value runs ' in (
    logged
  )
  assert "had without it, ''." in logged
  assert 'has no augment.mixup_alpha (written before the field existed)' in logged
  assert 'has no gsa.order (written before the field existed)' in logged
  # A field every record has always had is still damage (see the seed case below).
  assert config_validation.RECORD_RULES.defaults.get('seed') is None


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_left_alone(digits_dir, tmp_path):
  outside = tmp_path / 'outside.txt'
  outside.write_text('not yours')
  run = tmp_path / 'received'
  run.mkdir()
  (run / 'lock.json').symlink_to(outside)
  with pytest.raises(files.FileError) as refused:
    trainer.train_and_evaluate(tiny_config(digits_dir), str(run))
  assert str(refused.value).startswith(f'{run / "lock.json"} is a symbolic link: it is never ')
  assert outside.read_text() == 'not yours'
  assert sorted(p.name for p in run.iterdir()) == ['lock.json']  # nothing else written


def test_a_lock_file_that_is_a_directory_is_one_line(tmp_path):
  (tmp_path / 'lock.json').mkdir()
  with pytest.raises(files.FileError, match=r'lock.json is a directory, not a file'):
    lock.FileLock(tmp_path).acquire()


@pytest.fixture
def shared_dir():
  """A directory every user can reach (pytest's are private to their owner)."""
  path = tempfile.mkdtemp(prefix='gsa-shared-')
  os.chmod(path, 0o755)
  yield pathlib.Path(path)
  shutil.rmtree(path)


def test_a_read_only_workdir_is_one_line(shared_dir):
  # This process drops to "nobody" to be refused: root may write anywhere.
  run = shared_dir / 'run'
  run.mkdir()
  run.chmod(0o555)
  held = lock.FileLock(run)
  os.seteuid(65534)
  try:
    with pytest.raises(workdir_lib.WorkdirError) as refused:
      held.acquire()
  finally:
    os.seteuid(0)
  message = str(refused.value)
  assert message.startswith(f'{run / "lock.json"} could not be written (Permission denied): a run')
  assert 'use a workdir you can write' in message and '\n' not in message
  assert list(run.iterdir()) == []
  with lock.FileLock(run):  # the refused lock was released
    pass


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / 'run'
  path.write_text('a file')
  with pytest.raises(workdir_lib.WorkdirError, match='is not a directory'):
    workdir_lib.check_workdir(path)
  assert path.read_text() == 'a file'


# ----------------------------------------------------------------------------- damaged files


def _drop_seed(text: str) -> str:
  record = json.loads(text)
  del record['seed']
  return json.dumps(record)


def _image_size_as_text(text: str) -> str:
  return json.dumps(dict(json.loads(text), image_size='16'))


DAMAGE = {
  'truncated': (lambda text: text[: len(text) // 2], 'is not valid JSON ('),
  'empty': (lambda text: '', 'is not valid JSON ('),
  'not_an_object': (lambda text: '[16, 32]', 'holds a JSON list, not a config object'),
  'field_missing': (_drop_seed, 'is not a usable record (config.seed is missing'),
  'wrong_type': (
    _image_size_as_text,
    "(config.image_size='16' must be an int in [1, 4096] (got str))",
  ),
}


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_a_damaged_config_json_is_one_clear_error_everywhere(finished, digits_dir, tmp_path, kind):
  run = _copy(finished, tmp_path)
  damage, words = DAMAGE[kind]
  path = run / 'config.json'
  path.write_text(damage(path.read_text()))
  before = _contents(run)
  attempts = {
    'predict': lambda: predict.run(str(run), ['digit.png']),
    'visualize': lambda: visualize.run(str(run), str(tmp_path / 'maps.png')),
    'resume': lambda: trainer.train_and_evaluate(tiny_config(digits_dir), str(run)),
    'eval_only': lambda: trainer.train_and_evaluate(
      tiny_config(digits_dir, eval_only=True), str(run)
    ),
  }
  for name, attempt in attempts.items():
    with pytest.raises(workdir_lib.WorkdirError) as error:
      attempt()
    message = str(error.value)
    assert message.startswith(str(path)) and words in message, (name, message)
    assert 'meta/metadata' in message and '\n' not in message, (name, message)
  assert _contents(run) == before  # nothing repaired or rewritten behind the user's back


def test_the_tools_report_a_damaged_config_json_in_one_line(finished, tmp_path):
  run = _copy(finished, tmp_path)
  (run / 'config.json').write_text(_drop_seed((run / 'config.json').read_text()))
  commands = {
    'predict': ['gsa_flax.tools.predict', f'--workdir={run}', 'digit.png'],
    'visualize': ['gsa_flax.tools.visualize', f'--workdir={run}', f'--output={tmp_path / "m.png"}'],
  }

  def call(args):
    return subprocess.run(
      [sys.executable, '-m', *args],
      env=environment(devices=1),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = dict(zip(commands, pool.map(call, commands.values()), strict=True))
  for name, result in results.items():
    assert result.returncode == 2, (name, result.stderr[-3000:])
    assert 'Traceback' not in result.stderr, name
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), name
    assert errors[0].startswith(f'error: {run / "config.json"} is not a usable record'), errors
    assert 'config.seed is missing' in errors[0]
