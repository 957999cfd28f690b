"""What every command line of the project shares: absl flags, one-line user errors, quiet logs.

A mistake of the user (a bad config, a missing dataset or workdir, an unreadable
checkpoint) is one ``error: ...`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging as logging_std
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, logging

from gsa_flax import checkpointing, config_validation, datasets

# Exceptions whose message is the whole story for the user.
USER_ERRORS: tuple[type[BaseException], ...] = (
  config_validation.ConfigError,
  datasets.DatasetNotFoundError,
  checkpointing.CheckpointError,
  FloatingPointError,
)


def error(message: str) -> None:
  """Prints ``error: message`` on stderr (a problem with one input; the command goes on)."""
  print(f'error: {message}', file=sys.stderr)


def fail(message: str) -> NoReturn:
  """Prints ``error: message`` on stderr and exits with status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax (dozens of lines per save); keeps its warnings."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or '/orbax/' not in record.pathname


def run(
  main: Callable[[Sequence[str]], int | None],
  user_errors: tuple[type[BaseException], ...] = (),
) -> None:
  """``absl.app.run(main)``, with :data:`USER_ERRORS` (and ``user_errors``) as one line.

  Args:
    main: takes the arguments left after flag parsing; returns the exit status (or None
      for 0).
    user_errors: more exception types to report as ``error: ...`` with status 2.
  """
  errors = USER_ERRORS + tuple(user_errors)

  def wrapped(argv: Sequence[str]) -> int | None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
      return main(argv)
    except errors as error:
      fail(str(error))

  app.run(wrapped)
