"""Files the project writes and reads: whole or not at all, and never a stall.

- :func:`write_atomically`: the new contents go to a temporary file in the same directory
  (created exclusively), are flushed and fsynced, then replace the file in one
  ``os.replace``. A write that fails (a full disk, no permission) leaves the previous file
  byte-identical and no partial file. A path that is a symbolic link, a directory, a FIFO
  or a device is refused: the project never writes through a link it did not make.
- :func:`read_bytes` / :func:`check_readable`: a file to read must be a regular file (a
  FIFO would block, ``/dev/zero`` never ends) within a size cap, checked before anything is
  read.

Every failure is a :class:`FileError`, one line naming the path and the fix. Paths go
through ``etils.epath``, so ``gs://`` works like a local disk (there, the temporary object
is renamed over the target). This module sits below the wings: the model, the data, the
training and the tools all write through it.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import uuid

from etils import epath

from gsa_flax import errors

# The caps of the files the project reads; a file over its cap is refused unread.
MiB = 2**20


class FileError(errors.UserError):
  """A file cannot be written or read as asked; the message names it and says what to do.

  Attributes:
    path: the file.
    reason: what is wrong, without the path (for messages that name the file themselves).
  """

  def __init__(self, path: str | os.PathLike, reason: str):
    super().__init__(f'{path} {reason}')
    self.path = str(path)
    self.reason = reason


def is_local(path: str | os.PathLike) -> bool:
  """Whether ``path`` is on this machine's file system (not ``gs://``, ``s3://``, ...)."""
  return '://' not in str(path)


def _kind(mode: int) -> str:
  if stat.S_ISDIR(mode):
    return 'a directory'
  if stat.S_ISFIFO(mode):
    return 'a FIFO'
  if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
    return 'a device'
  if stat.S_ISSOCK(mode):
    return 'a socket'
  return 'a special file'


def check_writable(path: str | os.PathLike) -> epath.Path:
  """Checks, before any work, that :func:`write_atomically` may write ``path``.

  Returns:
    ``path`` as an ``epath.Path``.

  Raises:
    FileError: ``path`` is a symbolic link, a directory, a FIFO or a device, or its
      directory does not exist.
  """
  path = epath.Path(path)
  if not is_local(path):
    return path
  try:
    mode = os.lstat(path).st_mode
  except FileNotFoundError:
    mode = None
  except OSError as error:
    raise FileError(path, f'cannot be examined ({error.strerror}).') from None
  if mode is not None and stat.S_ISLNK(mode):
    raise FileError(
      path,
      'is a symbolic link: it is never written through (it may point outside); remove the '
      'link or choose another path.',
    )
  if mode is not None and not stat.S_ISREG(mode):
    raise FileError(path, f'is {_kind(mode)}, not a file: choose a file path to write.')
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise FileError(
      path, f'cannot be written: its directory {parent} does not exist; create it first.'
    )
  return path


def write_atomically(path: str | os.PathLike, data: bytes | str) -> epath.Path:
  """Writes ``data`` to ``path`` whole, or leaves ``path`` as it was.

  Args:
    path: the file to write (local or ``gs://``); replaced if it exists, never followed if
      it is a symbolic link (refused).
    data: the contents (``str`` is written as UTF-8).

  Returns:
    ``path`` as an ``epath.Path``.

  Raises:
    FileError: the path cannot be written (see :func:`check_writable`) or the write failed
      (a full disk, no permission); the previous file is unchanged and nothing partial is
      left.
  """
  path = check_writable(path)
  data = data.encode() if isinstance(data, str) else data
  if not is_local(path):
    partial = path.parent / f'.{path.name}.{uuid.uuid4().hex}.partial'
    try:
      partial.write_bytes(data)
      partial.replace(path)
    except Exception as error:  # noqa: BLE001  any failure of the remote file system
      _remove(partial)
      raise FileError(path, f'could not be written ({error}); it is unchanged.') from None
    return path
  directory = os.path.dirname(os.path.abspath(path))
  partial = None
  try:
    fd, partial = tempfile.mkstemp(dir=directory, prefix=f'.{path.name}.', suffix='.partial')
    with os.fdopen(fd, 'wb') as file:
      file.write(data)
      file.flush()
      os.fsync(file.fileno())
    os.chmod(partial, _mode_for(path))
    os.replace(partial, path)
    partial = None
  except OSError as error:
    fix = {
      errno.ENOSPC: 'free space on its file system, or write elsewhere',
      errno.EDQUOT: 'free space under your quota, or write elsewhere',
      errno.EFBIG: 'free space or raise the file-size limit, or write elsewhere',
      errno.EROFS: 'the file system is read-only; write elsewhere',
      errno.EACCES: 'choose a directory you can write',
      errno.EPERM: 'choose a directory you can write',
    }.get(error.errno, 'check the path')
    raise FileError(
      path,
      f'could not be written ({error.strerror or error}); {fix}. The previous file, if any, '
      'is unchanged.',
    ) from None
  finally:
    if partial is not None:
      _remove(epath.Path(partial))
  _sync_directory(directory)
  return path


def _mode_for(path: epath.Path) -> int:
  """The permissions of the file being replaced, or ``rw-r--r--`` for a new one (``mkstemp``
  makes its file private)."""
  try:
    return stat.S_IMODE(os.stat(path).st_mode)
  except OSError:
    return 0o644


def _remove(path: epath.Path) -> None:
  try:
    path.unlink()
  except Exception:  # noqa: BLE001, S110  nothing more to do for a partial file
    pass


def _sync_directory(directory: str) -> None:
  """Makes the rename itself durable (best effort: some file systems refuse it)."""
  try:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def check_readable(path: str | os.PathLike, *, limit: int, what: str = 'a file') -> epath.Path:
  """Checks, without opening it, that ``path`` is a regular file of at most ``limit`` bytes.

  A symbolic link is followed (reading through one is harmless); what it points to is checked.

  Args:
    path: local or ``gs://``.
    limit: the most bytes such a file may have.
    what: what the file should be, for messages (``'a weights file'``, ``'an image file'``).

  Raises:
    FileError: missing, a directory, a FIFO or a device, or larger than ``limit``.
  """
  path = epath.Path(path)
  if not is_local(path):
    if not path.exists():
      raise FileError(path, f'does not exist: give the path of {what}.')
    if path.is_dir():
      raise FileError(path, f'is a directory, not {what}.')
    size = path.stat().length
  else:
    try:
      status = os.stat(path)
    except FileNotFoundError:
      raise FileError(path, f'does not exist: give the path of {what}.') from None
    except OSError as error:
      raise FileError(path, f'cannot be read ({error.strerror}).') from None
    if not stat.S_ISREG(status.st_mode):
      raise FileError(path, f'is {_kind(status.st_mode)}, not {what}.')
    size = status.st_size
  if size > limit:
    raise FileError(
      path, f'is {size:,} bytes, more than {what} may be ({limit:,}); check the path.'
    )
  return path


def read_bytes(path: str | os.PathLike, *, limit: int, what: str = 'a file') -> bytes:
  """The contents of a regular file of at most ``limit`` bytes (:func:`check_readable`).

  Raises:
    FileError: see :func:`check_readable`, or the file cannot be read.
  """
  path = check_readable(path, limit=limit, what=what)
  try:
    if not is_local(path):
      with path.open('rb') as file:
        data = file.read(limit + 1)
    else:
      # O_NONBLOCK: should the path have become a FIFO since the check, opening it does not
      # wait for a writer; fstat checks what was opened.
      fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
      with os.fdopen(fd, 'rb') as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
          raise FileError(path, f'is not a regular file, not {what}.')
        data = file.read(limit + 1)
  except OSError as error:
    raise FileError(path, f'cannot be read ({error.strerror or error}).') from None
  if len(data) > limit:
    raise FileError(path, f'is more than {what} may be ({limit:,} bytes); check the path.')
  return data
