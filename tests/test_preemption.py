"""Killed, crashed, preempted or interrupted runs save what they can and resume exactly.

Each run is a real ``main.py`` subprocess on the embedded digits set, keeping a moving
average of its parameters (``ema_decay``), which must resume exactly too.
``tests/train_program.py`` wraps it to make the timing of the interruption deterministic (a
kill in the middle of a chosen checkpoint save; a pause per training or evaluation batch so
a signal lands mid-run).
"""

import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import main_command

from gsa_flax.tools.events import read_scalars

STEPS, EVERY = 16, 4
EMA_DECAY = 0.75


def _command(data_dir: str, workdir: Path, **env_hooks) -> tuple[list[str], dict]:
  command, env = main_command(
    data_dir,
    workdir,
    devices=2,
    script='tests/train_program.py',
    num_train_steps=STEPS,
    eval_every_steps=STEPS,
    checkpoint_every_steps=EVERY,
    ema_decay=EMA_DECAY,
  )
  env.update({k: str(v) for k, v in env_hooks.items()})
  return command, env


def _run(data_dir, workdir, **hooks) -> subprocess.CompletedProcess:
  command, env = _command(data_dir, workdir, **hooks)
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _final_params(workdir: Path) -> dict:
  """The parameters and their moving average in the final checkpoint."""
  restored = ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / str(STEPS) / 'state')
  return jax.tree.map(np.asarray, {k: restored[k] for k in ('params', 'ema_params')})


def _steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _saved_step(log: str) -> int:
  """The step of the checkpoint a stopped run says it saved."""
  return int(log.split(': checkpoint saved at step ')[1].split(' ')[0])


def _wait_for(log: Path, text: str, proc: subprocess.Popen) -> None:
  deadline = time.time() + 300
  while text not in log.read_text():
    assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
    time.sleep(0.05)


@pytest.fixture(scope='module')
def uninterrupted(digits_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  result = _run(digits_dir, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  scalars = read_scalars(str(workdir))
  # The run ends with one summary: what it produced and how to look at it.
  summary = [line for line in result.stderr.splitlines() if 'Training complete at step' in line]
  assert len(summary) == 1
  assert (
    f'Training complete at step {STEPS}, checkpoint {workdir}/checkpoints/{STEPS}.' in (summary[0])
  )
  assert f'eval_accuracy={scalars["eval_accuracy"][STEPS]:.4g}' in summary[0]
  assert f'train_loss={scalars["train_loss"][STEPS]:.4g}' in summary[0]
  assert summary[0].endswith(f'TensorBoard: tensorboard --logdir={workdir}')
  final = _final_params(workdir)
  # The average lags behind the parameters: comparing it compares something of its own.
  differ = jax.tree.map(lambda a, b: not np.array_equal(a, b), final['params'], final['ema_params'])
  assert any(jax.tree.leaves(differ))
  return final, scalars


def _assert_same_run(workdir: Path, uninterrupted):
  params, scalars = uninterrupted
  jax.tree.map(np.testing.assert_array_equal, _final_params(workdir), params)
  resumed = read_scalars(str(workdir))
  for tag in ('eval_loss', 'eval_accuracy', 'eval_top5_accuracy'):
    for name in (tag, f'ema_{tag}'):  # the raw parameters' and their average's
      assert resumed[name][STEPS] == scalars[name][STEPS], name


def test_sigkill_during_a_save_then_restart_is_exact(digits_dir, tmp_path, uninterrupted):
  # Killed (SIGKILL) right after the second checkpoint's save began, its files half written.
  killed = _run(digits_dir, tmp_path, GSA_TEST_KILL_AT_SAVE=2 * EVERY)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert EVERY in _steps(tmp_path)  # the first checkpoint is intact
  # Restarted with the same command: resumes and ends bit-identical to the uninterrupted run.
  resumed = _run(digits_dir, tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from checkpoint at step' in resumed.stderr
  _assert_same_run(tmp_path, uninterrupted)


def test_sigterm_saves_the_current_step_and_exits(digits_dir, tmp_path):
  command, env = _command(digits_dir, tmp_path, GSA_TEST_STEP_PAUSE=0.5)
  log = tmp_path / 'stderr.txt'
  with log.open('w') as stderr:
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    _wait_for(log, 'train_loss', proc)  # training is under way (step 2 logged)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    _wait_for(log, 'Stopped by SIGTERM: checkpoint saved at step', proc)
    saved = time.time()  # the run's last line: the checkpoint is saved
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    ended = time.time()
  assert saved - sent < 60
  # A preempted VM is given seconds: the process ends promptly after its save, without the
  # interpreter's teardown (which took 4-40 s). Alone on a 2-core machine it ends 0.2-3 s
  # after its last line; under the test suite's two parallel workers up to 5.2 s was seen,
  # hence the bound's margin (it still catches the teardown coming back).
  assert ended - saved < 10, f'{ended - saved:.1f} s from the save to the end of the process'
  text = log.read_text()
  step = _saved_step(text)
  assert 2 <= step < STEPS and step in _steps(tmp_path)
  # The checkpoint holds that step's state (resuming from any checkpoint is exact: see the
  # SIGKILL test).
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'checkpoints' / str(step) / 'state')
  assert int(restored['step']) == step


def test_ctrl_c_saves_like_sigterm_and_a_second_run_meanwhile_is_refused(digits_dir, tmp_path):
  workdir = tmp_path / 'run'
  command, env = _command(digits_dir, workdir, GSA_TEST_STEP_PAUSE=2)
  log = tmp_path / 'stderr.txt'
  with log.open('w') as stderr:
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    _wait_for(log, 'Training from step', proc)
    # A second run of the same command while the first trains: refused, naming the first.
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.poll() is None, log.read_text()[-3000:]  # the first was still training
    assert second.returncode == 2, second.stderr[-3000:]
    assert (
      second.stderr.strip()
      .splitlines()[-1]
      .startswith(
        f'error: {workdir} is in use by another run (host {socket.gethostname()}, pid {proc.pid}, '
        'started '
      )
    ), second.stderr[-3000:]
    assert 'Traceback' not in second.stderr
    assert len(list(workdir.glob('events.out.tfevents.*'))) == 1  # the first run's only
    proc.send_signal(signal.SIGINT)  # what Ctrl-C and Colab's Interrupt send
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
  text = log.read_text()
  assert 'Traceback' not in text and 'KeyboardInterrupt' not in text, text[-3000:]
  assert 'Stopped by SIGINT: checkpoint saved at step' in text
  step = _saved_step(text)
  assert 1 <= step < STEPS and step in _steps(workdir)


def test_sigterm_during_an_evaluation_stops_it_between_batches(digits_dir, tmp_path):
  workdir = tmp_path / 'run'
  command, env = main_command(
    digits_dir,
    workdir,
    devices=2,
    script='tests/train_program.py',
    num_train_steps=STEPS,
    eval_every_steps=2,
    eval_batch_size=8,  # 45 batches of 2 s: an evaluation takes 90 s
    checkpoint_every_steps=EVERY,
  )
  env['GSA_TEST_EVAL_PAUSE'] = '2'
  log = tmp_path / 'stderr.txt'
  with log.open('w') as stderr:
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    _wait_for(log, 'Evaluating at step 2.', proc)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
  assert time.time() - sent < 60  # well within the 90 s the evaluation would take
  text = log.read_text()
  assert 'Evaluation at step 2 stopped early' in text
  assert _saved_step(text) == 2 and _steps(workdir) == [2]
  assert 'eval_loss' not in read_scalars(str(workdir))  # nothing of the cut evaluation


def test_sigterm_on_one_host_stops_all_hosts_at_the_same_step(digits_dir, tmp_path):
  """Two gloo-joined processes; only process 1 gets SIGTERM; both save one common step."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs, logs = [], []
  for index in range(2):
    command, env = _command(digits_dir, tmp_path / 'run', GSA_TEST_STEP_PAUSE=0.5)
    command += [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
    logs.append((tmp_path / f'process{index}.txt').open('w'))
    procs.append(
      subprocess.Popen(
        [*command, f'--process_id={index}'], env=env, stdout=subprocess.DEVNULL, stderr=logs[-1]
      )
    )
  texts = [tmp_path / f'process{index}.txt' for index in range(2)]
  _wait_for(texts[0], 'train_loss', procs[0])
  procs[1].send_signal(signal.SIGTERM)
  for proc, log, text in zip(procs, logs, texts, strict=True):
    code = proc.wait(timeout=120)
    log.close()
    assert code == 0, text.read_text()[-3000:]
  steps = [_saved_step(text.read_text()) for text in texts]
  assert steps[0] == steps[1] and 2 <= steps[0] < STEPS
  assert steps[0] in _steps(tmp_path / 'run')
