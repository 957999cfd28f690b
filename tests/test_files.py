"""Files are written whole or not at all, never through a link, and read only when they can be.

A full disk is the kernel's own refusal of a write: the process's file-size limit
(``RLIMIT_FSIZE``, with SIGXFSZ ignored) makes ``write(2)`` fail part-way through the file,
exactly where a full file system fails it (with EFBIG instead of ENOSPC); nothing is mounted
or patched.
"""

import contextlib
import os
import resource
import signal
import threading
import time

import pytest

from gsa_flax import errors, files


@contextlib.contextmanager
def full_disk(free_bytes: int = 0):
  """Writes past ``free_bytes`` of any file fail in this process, as on a full disk."""
  previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  previous = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (free_bytes, previous[1]))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, previous)
    signal.signal(signal.SIGXFSZ, previous_handler)


def _listing(directory) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def finishes_within(seconds: float, action):
  """Runs ``action`` in a thread; fails the test if it has not returned after ``seconds``.

  Returns what it returned or raised (a blocked read or open must not hang the suite).
  """
  outcome = {}

  def target():
    try:
      outcome['value'] = action()
    except BaseException as error:  # noqa: BLE001  handed to the test
      outcome['error'] = error

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f'still running after {seconds} s (blocked?)'
  return outcome


def test_a_write_replaces_the_file_whole_and_keeps_its_permissions(tmp_path):
  path = tmp_path / 'out.bin'
  files.write_atomically(path, b'old contents')
  os.chmod(path, 0o640)
  files.write_atomically(path, 'new')
  assert path.read_bytes() == b'new'
  assert oct(path.stat().st_mode & 0o777) == oct(0o640)
  assert [p.name for p in tmp_path.iterdir()] == ['out.bin']  # no temporary file left


def test_a_write_on_a_full_disk_leaves_the_old_file_byte_identical_and_no_partial(tmp_path):
  path = tmp_path / 'weights.msgpack'
  old = os.urandom(4096)
  path.write_bytes(old)
  with full_disk(free_bytes=1000), pytest.raises(files.FileError) as failed:
    files.write_atomically(path, os.urandom(8192))  # fails after 1000 bytes
  message = str(failed.value)
  assert message.startswith(f'{path} could not be written (File too large)'), message
  assert 'previous file, if any, is unchanged' in message and '\n' not in message
  assert isinstance(failed.value, errors.UserError)
  assert _listing(tmp_path) == {'weights.msgpack': old}


def test_a_symbolic_link_is_never_written_through(tmp_path):
  outside = tmp_path / 'outside.txt'
  outside.write_bytes(b'precious')
  inside = tmp_path / 'dir'
  inside.mkdir()
  (inside / 'lock.json').symlink_to(outside)
  with pytest.raises(files.FileError, match='is a symbolic link: it is never written through'):
    files.write_atomically(inside / 'lock.json', b'{}')
  assert outside.read_bytes() == b'precious'
  assert (inside / 'lock.json').is_symlink()


@pytest.mark.parametrize('kind', ['directory', 'fifo', 'device', 'missing_directory'])
def test_what_is_not_a_file_is_refused_for_writing_in_one_line(tmp_path, kind):
  path = {
    'directory': tmp_path,
    'fifo': tmp_path / 'fifo',
    'device': '/dev/null',
    'missing_directory': tmp_path / 'missing' / 'out.png',
  }[kind]
  if kind == 'fifo':
    os.mkfifo(path)
  words = {
    'directory': 'is a directory, not a file',
    'fifo': 'is a FIFO, not a file',
    'device': 'is a device, not a file',
    'missing_directory': f'its directory {tmp_path / "missing"} does not exist',
  }[kind]
  outcome = finishes_within(5, lambda: files.write_atomically(path, b'x'))
  error = outcome['error']
  assert isinstance(error, files.FileError) and words in str(error), error
  assert '\n' not in str(error)


@pytest.mark.parametrize('kind', ['fifo', 'dev_zero', 'directory', 'missing', 'too_large'])
def test_what_cannot_be_read_is_refused_at_once(tmp_path, kind):
  path = {
    'fifo': tmp_path / 'fifo',
    'dev_zero': '/dev/zero',
    'directory': tmp_path,
    'missing': tmp_path / 'nothing',
    'too_large': tmp_path / 'big',
  }[kind]
  if kind == 'fifo':
    os.mkfifo(path)  # nobody writes it: opening it for reading would wait for ever
  if kind == 'too_large':
    path.write_bytes(b'x' * 2000)
  words = {
    'fifo': 'is a FIFO, not an image',
    'dev_zero': 'is a device, not an image',
    'directory': 'is a directory, not an image',
    'missing': 'does not exist',
    'too_large': 'is 2,000 bytes, more than an image may be (1,000)',
  }[kind]
  started = time.perf_counter()
  outcome = finishes_within(5, lambda: files.read_bytes(path, limit=1000, what='an image'))
  assert time.perf_counter() - started < 1
  error = outcome['error']
  assert isinstance(error, files.FileError) and words in str(error), error
  assert str(error).startswith(str(path))


def test_a_symbolic_link_is_read_through_and_its_target_checked(tmp_path):
  (tmp_path / 'real').write_bytes(b'abc')
  (tmp_path / 'link').symlink_to(tmp_path / 'real')
  assert files.read_bytes(tmp_path / 'link', limit=10) == b'abc'
  (tmp_path / 'to_zero').symlink_to('/dev/zero')
  with pytest.raises(files.FileError, match='is a device'):
    files.read_bytes(tmp_path / 'to_zero', limit=10)
