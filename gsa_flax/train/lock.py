"""One run per workdir: ``<workdir>/lock.json`` names the host, pid and start time of the run
that holds it.

On a local disk the lock is an ``fcntl.flock`` of the workdir that the kernel releases when
the process dies (``kill -9`` included); on a cloud file system (``gs://``) a
:class:`Lease` that expires unless its holder renews it, so a preempted VM cannot hold a
workdir for ever. A second run refuses to start, naming the holder, and writes nothing.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging
from etils import epath

from gsa_flax import files
from gsa_flax.train.workdir import (
  LOCK_FILE,
  MAX_RECORD_BYTES,
  WorkdirBusyError,
  WorkdirError,
  is_remote,
  now,
  workdir_path,
)


def _this_run() -> dict[str, Any]:
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'started': now()}


def _read_holder(path: epath.Path) -> dict[str, Any] | None:
  """The holder a lock file names, or None if it names none (absent, empty, damaged)."""
  try:
    holder = json.loads(files.read_bytes(path, limit=MAX_RECORD_BYTES, what='a lock file'))
  except (OSError, ValueError):  # files.FileError is a ValueError
    return None
  return holder if isinstance(holder, dict) else None


def _busy(workdir: epath.Path, holder: dict[str, Any] | None, lease: str = '') -> WorkdirBusyError:
  if holder is None:
    who = 'another run'
  else:
    who = (
      f'another run (host {holder.get("host", "?")}, pid {holder.get("pid", "?")}, started '
      f'{holder.get("started", "?")}{lease})'
    )
  return WorkdirBusyError(
    f'{workdir} is in use by {who}: wait for it to end or stop it, or use another --workdir.'
  )


class FileLock:
  """The lock of a workdir on a local disk: ``fcntl.flock`` on the workdir itself.

  The kernel releases it when the holding process ends, however it ends (``kill -9``
  included), so it never needs breaking. ``<workdir>/lock.json`` names the holder (host,
  pid, start time) for the message of a run that is refused; it stays after the run. It is
  written like every file of the project (:func:`gsa_flax.files.write_atomically`): a
  ``lock.json`` that is a symbolic link (a workdir received from someone else), a directory
  or a FIFO is refused in one line and whatever it points to is left alone.

  Args:
    workdir: a local workdir (it must exist).
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = workdir_path(workdir)
    self.path = self.workdir / LOCK_FILE
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock or raises :class:`WorkdirBusyError` naming the holder.

    Raises:
      WorkdirBusyError: another run holds the workdir.
      gsa_flax.files.FileError: ``lock.json`` is a symbolic link, a directory or a FIFO.
      WorkdirError: the workdir cannot be written (read-only, no permission, full).
    """
    files.check_writable(self.path)
    try:
      # The directory, not lock.json: lock.json is replaced by a new file on each start,
      # and a lock held on the old file would not stop a run that opens the new one.
      fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
      raise WorkdirError(
        f'--workdir={self.workdir} cannot be opened ({error.strerror}); pass a directory.'
      ) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      raise _busy(self.workdir, _read_holder(self.path)) from None
    try:
      files.write_atomically(self.path, json.dumps(_this_run()))
    except files.FileError as error:
      os.close(fd)  # releases the lock
      raise WorkdirError(
        f'{error.path} {error.reason.split(";")[0]}: a run (eval_only too) writes its lock '
        'and TensorBoard events in the workdir; use a workdir you can write (copy the run '
        'there).'
      ) from None
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> FileLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


class Lease:
  """A lock that expires, on any file system ``etils.epath`` reaches (``gs://`` included).

  The holder writes ``{host, pid, started, token, expires}`` to ``path`` and a background
  thread rewrites it every ``seconds / 3`` with a new expiry. Another run may take the
  lease once it has expired, so a holder that died without releasing it (a preempted VM)
  blocks the workdir for at most ``seconds``. Object stores offer no atomic
  create-if-absent through ``epath``: two runs starting within ``settle`` seconds of each
  other both write, and the one whose token is not read back after ``settle`` seconds
  steps back.

  Args:
    path: the lease file.
    seconds: how long a lease lasts without renewal.
    settle: seconds between writing the lease and reading it back.
  """

  def __init__(self, path: epath.PathLike, *, seconds: float = 300.0, settle: float = 2.0):
    self.path = epath.Path(path)
    self.seconds = seconds
    self.settle = settle
    self.token = uuid.uuid4().hex
    self._holder = dict(_this_run(), token=self.token)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def holder(self) -> dict[str, Any] | None:
    """Who holds the lease now: the file's content while it has not expired, else None."""
    holder = _read_holder(self.path)
    if holder is None or not isinstance(holder.get('expires'), (int, float)):
      return None
    return holder if holder['expires'] > time.time() else None

  def acquire(self) -> None:
    """Takes the lease, or raises :class:`WorkdirBusyError` naming its holder."""
    holder = self.holder()
    if holder is not None and holder.get('token') != self.token:
      raise self._refusal(holder)
    self.renew()
    if self.settle:
      time.sleep(self.settle)
    holder = self.holder()
    if holder is None or holder.get('token') != self.token:
      raise self._refusal(holder)
    self._stop.clear()
    self._thread = threading.Thread(target=self._keep_renewing, name='lease', daemon=True)
    self._thread.start()

  def renew(self) -> None:
    """Writes the lease with an expiry ``seconds`` from now."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(
      self.path, json.dumps(dict(self._holder, expires=time.time() + self.seconds))
    )

  def release(self) -> None:
    """Stops renewing and removes the lease if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    holder = _read_holder(self.path)
    if holder is not None and holder.get('token') == self.token:
      self.path.unlink()

  def _keep_renewing(self) -> None:
    while not self._stop.wait(self.seconds / 3):
      try:
        holder = _read_holder(self.path)
        if holder is not None and holder.get('token') != self.token:
          # Not renewed in time (a stalled process): another run took the workdir.
          logging.error(
            'The lease %s was taken by host %s, pid %s: this run no longer holds its workdir.',
            self.path,
            holder.get('host'),
            holder.get('pid'),
          )
          return
        self.renew()
      except Exception as error:  # noqa: BLE001  a renewal may fail; the next one retries.
        logging.warning('Could not renew the lease %s: %s', self.path, error)

  def _refusal(self, holder: dict[str, Any] | None) -> WorkdirBusyError:
    expires = ''
    if holder is not None:
      when = datetime.datetime.fromtimestamp(holder['expires']).astimezone()
      expires = f'; its lease expires at {when.isoformat(timespec="seconds")} unless renewed'
    return _busy(self.path.parent, holder, expires)

  def __enter__(self) -> Lease:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def lock(workdir: str | os.PathLike) -> FileLock | Lease:
  """The lock of ``workdir`` (a context manager): a :class:`FileLock` on a local disk, a
  :class:`Lease` on a cloud file system."""
  if is_remote(workdir):
    return Lease(workdir_path(workdir) / LOCK_FILE)
  return FileLock(workdir)
