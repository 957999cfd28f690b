"""What every command line of the project shares: absl flags, one-line user errors, quiet logs.

A mistake of the user (a bad flag, a config file that is missing or does not load, a bad
config, a missing dataset or workdir, an unreadable checkpoint, weights that do not fit) is
one ``error: ...`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import atexit
import logging as logging_std
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags, logging

from gsa_flax import errors

# Exceptions whose message is the whole story for the user: every wing's mistakes of the
# user (config, dataset, workdir, checkpoint, weights, transfer), and a diverged run.
# Importing this module imports none of the wings, so main.py starts fast.
USER_ERRORS: tuple[type[BaseException], ...] = (errors.UserError, FloatingPointError)


def error(message: str) -> None:
  """Prints ``error: message`` on stderr (a problem with one input; the command goes on)."""
  print(f'error: {message}', file=sys.stderr)


def fail(message: str) -> NoReturn:
  """Prints ``error: message`` on stderr and exits with status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def check_backend() -> None:
  """Starts JAX's backend, or fails in one line: ``JAX_PLATFORMS`` naming an accelerator this
  machine lacks (``tpu``, ``cuda``) raises a RuntimeError or a bare AssertionError in JAX."""
  import jax

  try:
    jax.devices()
  except (RuntimeError, AssertionError) as error:
    platforms = os.environ.get('JAX_PLATFORMS', '')
    asked = f'the backend JAX_PLATFORMS={platforms} asks for' if platforms else 'a backend'
    reason = _first_line(error) or type(error).__name__
    fail(
      f'JAX cannot start {asked} ({reason}); unset JAX_PLATFORMS (or set it to cpu), or '
      'install the jax build for that accelerator.'
    )


def _exit_now(status: int) -> None:
  """Ends the process as soon as its work and output are complete.

  What ``sys.exit`` would do that matters is done here: other threads are joined, exit
  handlers run (``jax.distributed.shutdown`` among them), logs and streams flushed. The
  interpreter's teardown, freeing every object of JAX, TensorFlow and orbax one by one,
  is skipped: after a stop request it took seconds, and after a large run tens of seconds
  that a preempted VM may not be given.
  """
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and not thread.daemon:
      thread.join()
  atexit._run_exitfuncs()  # noqa: SLF001  what the interpreter would run at exit
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


class _QuietLibraries(logging_std.Filter):
  """Drops orbax's INFO chatter (dozens of lines per save) and its ERROR reports.

  Orbax logs each failure of a background save or of a restore with its traceback, from
  several threads (hundreds of lines); the project reports each of them itself in one
  line (:class:`gsa_flax.train.checkpoints.SaveError`, the warning about an unreadable step).
  Orbax's warnings are kept.
  """

  def filter(self, record: logging_std.LogRecord) -> bool:
    return '/orbax/' not in record.pathname or record.levelno == logging_std.WARNING


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of ``--name=value`` or ``--name value`` in ``argv``, or None."""
  for index, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and index + 1 < len(argv):
      return argv[index + 1]
  return None


def _root(error: BaseException) -> BaseException:
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  return error


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every flag error as one ``error:`` line and exit status 2.

  ``--config`` (``ml_collections.config_flags``) loads its file while flags are parsed: a
  missing file, a syntax error or a ``get_config`` that raises is reported with the file,
  the line or the exception; ``--config.field=value`` overrides apply as usual.
  """
  value = _flag_value(argv[1:], 'config')
  where = f'--config={value}'
  if value is not None:
    file = value.split(':', 1)[0]
    if not os.path.exists(file):
      fail(f'{where}: no such file; pass a config file, e.g. --config=configs/default.py.')
    if not os.path.isfile(file):  # a directory, a FIFO (reading it would block), a device
      fail(f'{where}: not a regular file; pass a config file, e.g. --config=configs/default.py.')
  try:
    remaining = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:
      flags.FLAGS.config  # noqa: B018  raises an error of loading the file that ml_collections deferred
    return remaining
  except SyntaxError as error:
    fail(f'{where}: {error.msg} at line {error.lineno} of {error.filename}; fix the file.')
  except OSError as error:  # the file exists but cannot be read (ml_collections defers this)
    fail(f'{where}: {_first_line(error)}')
  except Exception as error:  # noqa: BLE001  a bad flag, override or config file: one line
    root = _root(error)
    if value is not None and _raised_in(root, value.split(':', 1)[0]):
      fail(f'{where}: loading it raised {_describe(root)}')
    if isinstance(error, flags.Error):
      fail(_first_line(error))
    fail(f'a --config.FIELD override failed: {_innermost_message(error)}')


def _raised_in(error: BaseException, path: str) -> bool:
  """Whether ``error`` was raised by code of the file ``path`` (or what it called)."""
  frame = error.__traceback__
  while frame is not None:
    if os.path.abspath(frame.tb_frame.f_code.co_filename) == os.path.abspath(path):
      return True
    frame = frame.tb_next
  return False


def _describe(error: BaseException) -> str:
  """``Type: message`` on one line."""
  text = ' '.join(line.strip() for line in str(error).strip().splitlines())
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def _innermost_message(error: BaseException) -> str:
  """The text of an exception that wraps others as its argument (ml_collections raises
  ``AttributeError(KeyError("'name'\\nDid you mean ...?"))``), on one line."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  return ' '.join(line.strip() for line in text.strip().splitlines())


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[-1 if isinstance(error, OSError) else 0] if text else ''


def run(
  main: Callable[[Sequence[str]], int | None],
  user_errors: tuple[type[BaseException], ...] = (),
) -> None:
  """``absl.app.run(main)``, with :data:`USER_ERRORS` (and ``user_errors``) as one line.

  Flags are parsed by :func:`parse_flags`. A KeyboardInterrupt that reaches here (Ctrl-C
  before training installs its handler, or a second Ctrl-C) is one line and exit status 130.
  When ``main`` returns, the process ends at once (:func:`_exit_now`), without the
  interpreter's slow teardown.

  Args:
    main: takes the arguments left after flag parsing; returns the exit status (or None
      for 0).
    user_errors: more exception types to report as ``error: ...`` with status 2.
  """
  errors = USER_ERRORS + tuple(user_errors)

  def wrapped(argv: Sequence[str]) -> int | None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
      status = main(argv)
    except errors as error:
      fail(str(error))
    except KeyboardInterrupt:
      print(
        'interrupted: stopped at once, without saving; the newest checkpoint is kept (rerun '
        'the same command to resume).',
        file=sys.stderr,
      )
      sys.exit(130)
    _exit_now(status or 0)

  app.run(wrapped, flags_parser=parse_flags)
