"""Every tool and main.py, given a path that is not what it should be, stops at once in one
line and changes no file.

The property: for each path a command reads or writes (a weights file to write, a workdir, an
image, ``init_from``, a config file) and each kind of bad path (a symbolic link, a
directory, a FIFO, ``/dev/zero``, a missing file, a file on a full disk), the command ends
within a time bound with a user error (printed by ``tools/cli.py`` as one ``error:`` line,
exit status 2) or, for the image files of predict and visualize, with one ``error:`` line per
bad file (exit status 1), and every file that existed before is byte-identical after.

In-process, through each command's ``run`` (what its ``main`` calls) and main.py's
``train_and_evaluate``; a few command lines check what only a command line shows (flags,
the backend, the exit status). A full disk is the kernel's file-size limit
(:func:`test_files.full_disk`).
"""

import concurrent.futures
import contextlib
import os
import subprocess
import sys

import jax
import pytest
import tensorflow_datasets as tfds
from helpers import DIGITS_IMAGE_SIZE, REPO, environment, tiny_config
from test_files import finishes_within, full_disk

from gsa_flax import errors
from gsa_flax.data import datasets, input_pipeline
from gsa_flax.tools import cli, export, predict, visualize
from gsa_flax.train import checkpoints, experiment, trainer
from gsa_flax.train import state as state_lib
from gsa_flax.train import workdir as workdir_lib

KINDS = ('symlink', 'directory', 'fifo', 'dev_zero', 'missing', 'full_disk')
# Each command, however its path is bad, ends within this (a blocked read never would).
SECONDS = 60


@pytest.fixture(scope='module')
def saved_run(digits_dir, tmp_path_factory):
  """A workdir as training leaves it (config.json, one checkpoint) and one good image."""
  root = tmp_path_factory.mktemp('saved')
  workdir = root / 'run'
  workdir.mkdir()
  config = tiny_config(digits_dir)
  pieces = experiment.setup(config, 10, steps_per_epoch=10, num_train_steps=10)
  state = jax.jit(lambda rng: state_lib.create(pieces, rng, image_size=16))(jax.random.key(0))
  workdir_lib.write_config(config, workdir)
  saver = checkpoints.Checkpointer(str(workdir), keep=1)
  saver.save(6, state_lib.state_dict(state.replace(step=6)), {'step': 6})
  saver.wait()
  builder = input_pipeline.get_builder(
    datasets.get('digits'), digits_dir, image_size=DIGITS_IMAGE_SIZE
  )
  ds = builder.as_dataset(split='test', decoders={'image': tfds.decode.SkipDecoding()})
  image = root / 'digit.png'
  image.write_bytes(next(ds.take(1).as_numpy_iterator())['image'])
  return workdir, image


def _bad_path(kind: str, where, *, output: bool) -> str:
  """A path of ``kind`` under ``where``.

  For a path to write, the symbolic link points to a file outside (which must not change)
  and "missing" is a file in a missing directory; for a path to read, the link points to a
  FIFO (reading through a link is fine; what it points to is checked) and "missing" is a
  missing file. "full_disk" is an existing file (written on a full disk, read as usual).
  """
  path = where / f'bad_{kind}'
  if kind == 'symlink':
    target = where / 'link_target'
    if output:
      target.write_bytes(b'the file the link points to')
    else:
      os.mkfifo(target)
    path.symlink_to(target)
  elif kind == 'directory':
    path.mkdir()
  elif kind == 'fifo':
    os.mkfifo(path)
  elif kind == 'dev_zero':
    return '/dev/zero'
  elif kind == 'missing':
    return str(where / 'missing' / 'file') if output else str(path)
  elif kind == 'full_disk':
    path.write_bytes(b'an existing file, to be kept byte for byte')
  return str(path)


def _files(*roots) -> dict[str, bytes]:
  """Every regular file under ``roots`` (links and FIFOs are not opened)."""
  found = {}
  for root in roots:
    for directory, _, names in os.walk(root):
      for name in names:
        path = os.path.join(directory, name)
        if not os.path.islink(path) and os.path.isfile(path):
          with open(path, 'rb') as file:
            found[path] = file.read()
  return found


def _check(attempt, kind, roots, capsys, *, per_file: bool = False) -> str:
  """Runs ``attempt`` (on a full disk for that kind); returns its one line of error."""
  before = _files(*roots)
  disk = full_disk() if kind == 'full_disk' else contextlib.nullcontext()
  with disk:
    outcome = finishes_within(SECONDS, attempt)
  _, err = capsys.readouterr()
  printed = [line for line in err.splitlines() if line.startswith('error:')]
  if per_file:  # predict / visualize on image files: exit status 1, one line per bad file
    assert outcome.get('value') == 1 and 'error' not in outcome, (outcome, err[-2000:])
    assert len(printed) == 1, err[-2000:]
    line = printed[0]
  else:
    error = outcome.get('error')
    if isinstance(error, SystemExit):  # cli.fail: already printed
      assert error.code == 2 and len(printed) == 1, err[-2000:]
      line = printed[0]
    else:
      assert isinstance(error, errors.UserError), outcome  # cli.run: one line, exit 2
      line = f'error: {error}'
  assert '\n' not in line and 'Traceback' not in err, line
  after = _files(*roots)
  assert {path: after.get(path) for path in before} == before, f'a file changed ({kind})'
  assert not [path for path in after if path.endswith('.partial')]
  return line


@pytest.mark.parametrize('kind', KINDS)
def test_commands_given_a_bad_path_stop_in_one_line_and_change_nothing(
  saved_run, digits_dir, tmp_path, capsys, kind
):
  workdir, image = saved_run
  roots = (workdir, image.parent, tmp_path)
  fine_output = str(tmp_path / 'out' / 'fine.png')
  (tmp_path / 'out').mkdir()
  lines = {}

  def attempt(name, action, *, output, per_file=False, path=None):
    bad = path or _bad_path(kind, tmp_path / name, output=output)
    lines[name] = _check(lambda: action(bad), kind, roots, capsys, per_file=per_file)

  for name in ('export_output', 'export_workdir', 'predict_image', 'predict_workdir'):
    (tmp_path / name).mkdir()
  for name in ('visualize_output', 'visualize_image', 'visualize_workdir'):
    (tmp_path / name).mkdir()
  for name in ('init_from', 'main_workdir', 'config'):
    (tmp_path / name).mkdir()

  # Paths written: a weights file, a figure; main.py's workdir on a full disk.
  if kind != 'missing':  # export makes a missing directory of --output (it is documented)
    attempt('export_output', lambda p: export.run(str(workdir), p), output=True)
  attempt('visualize_output', lambda p: visualize.run(str(workdir), p, [str(image)]), output=True)
  # Paths read: a workdir, image files, init_from, a config file.
  if kind not in ('directory', 'full_disk'):  # a directory is what a workdir is
    for name, tool in (
      ('export_workdir', lambda p: export.run(p, str(tmp_path / 'out' / 'w.msgpack'))),
      ('predict_workdir', lambda p: predict.run(p, [str(image)])),
      ('visualize_workdir', lambda p: visualize.run(p, fine_output, [str(image)])),
    ):
      attempt(name, tool, output=False)
  if kind != 'full_disk':  # reading a file on a full disk is reading a file
    attempt(
      'predict_image',
      lambda p: predict.run(str(workdir), [str(image), p]),
      output=False,
      per_file=True,
    )
    attempt(
      'visualize_image',
      lambda p: visualize.run(str(workdir), fine_output, [str(image), p]),
      output=False,
      per_file=True,
    )
    attempt(
      'init_from',
      lambda p: trainer.train_and_evaluate(
        tiny_config(digits_dir, init_from=p), str(tmp_path / 'new_run')
      ),
      output=False,
    )
    attempt('config', lambda p: cli.parse_flags(['main.py', f'--config={p}']), output=False)
  if kind == 'full_disk':  # a restart on a full disk: its lock cannot be written
    attempt(
      'main_workdir',
      lambda p: trainer.train_and_evaluate(tiny_config(digits_dir), p),
      output=True,
      path=str(workdir),
    )
  elif kind not in ('directory', 'missing'):  # a missing workdir is created
    attempt(
      'main_workdir',
      lambda p: trainer.train_and_evaluate(tiny_config(digits_dir), p),
      output=False,
    )
  assert lines, kind


# Runs a module as a program on a full disk: it may write small files (Python's and
# TensorFlow's start-up needs some), not a weights file.
_ON_A_FULL_DISK = (
  'import resource, runpy, signal, sys; '
  'signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
  'resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY)); '
  'sys.argv = sys.argv[1:]; '
  "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def _command(args, env=None, full=False):
  if full:  # ['-m', module, *flags] -> the same, on a full disk
    args = ['-c', _ON_A_FULL_DISK, *args[1:]]
  return subprocess.run(
    [sys.executable, *args],
    env=env or environment(devices=1),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_the_command_lines_say_it_in_one_line(saved_run, tmp_path):
  workdir, image = saved_run
  outside = tmp_path / 'outside.msgpack'
  outside.write_bytes(b'precious')
  (tmp_path / 'link.msgpack').symlink_to(outside)
  kept = tmp_path / 'kept.msgpack'
  kept.write_bytes(b'an older export')
  fifo = tmp_path / 'config.py'
  os.mkfifo(fifo)
  tpu = dict(environment(devices=1), JAX_PLATFORMS='tpu')
  export_to = ['-m', 'gsa_flax.tools.export', f'--workdir={workdir}']
  visualize_ = ['-m', 'gsa_flax.tools.visualize', f'--workdir={workdir}']
  cases = {
    'export through a link': (
      [*export_to, f'--output={tmp_path / "link.msgpack"}'],
      {},
      'is a symbolic link: it is never written through',
    ),
    'export on a full disk': (
      [*export_to, f'--output={kept}'],
      {'full': True},
      'could not be written (File too large)',
    ),
    'visualize --count=0': ([*visualize_, '--count=0'], {}, '--count=0'),
    'visualize --count=100000': ([*visualize_, '--count=100000'], {}, '--count=100000'),
    'summary --per_device_batch=-3': (
      ['-m', 'gsa_flax.tools.summary', '--config=configs/default.py', '--per_device_batch=-3'],
      {},
      'per_device_batch',
    ),
    'main.py --config=FIFO': (
      ['main.py', f'--config={fifo}', f'--workdir={tmp_path / "w"}'],
      {},
      'not a regular file',
    ),
    'main.py, JAX_PLATFORMS=cuda without a GPU': (
      ['main.py', '--config=configs/default.py', f'--workdir={tmp_path / "w"}'],
      {'env': dict(environment(devices=1), JAX_PLATFORMS='cuda')},
      'JAX cannot start the backend JAX_PLATFORMS=cuda asks for',
    ),
    'JAX_PLATFORMS=tpu without a TPU': (
      ['-m', 'gsa_flax.tools.predict', f'--workdir={workdir}', str(image)],
      {'env': tpu},
      'JAX cannot start the backend JAX_PLATFORMS=tpu asks for',
    ),
  }
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two at a time: two cores
    results = list(pool.map(lambda case: _command(case[0], **case[1]), cases.values()))
  for (name, (_, _, words)), result in zip(cases.items(), results, strict=True):
    assert result.returncode == 2, (name, result.stderr[-3000:])
    assert 'Traceback' not in result.stderr, (name, result.stderr[-3000:])
    printed = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(printed) == 1 and words in printed[0], (name, result.stderr[-3000:])
  assert outside.read_bytes() == b'precious'
  assert kept.read_bytes() == b'an older export'
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    'config.py',
    'kept.msgpack',
    'link.msgpack',
    'outside.msgpack',
  ]
