"""Stopping a run cleanly: SIGTERM and SIGINT become a request the training loop polls.

A preempted Cloud TPU VM receives SIGTERM; Ctrl-C (and Colab's Interrupt) sends SIGINT.
Either makes the run finish its step (or stop its evaluation between batches), save a
checkpoint and return; all hosts of a multi-host run agree on the step through JAX's
coordination service.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from gsa_flax.train import workdir


class StopRequests:
  """SIGTERM and SIGINT (Ctrl-C, Colab's Interrupt) become a request the loop polls.

  One host: the first signal sets a flag; the run finishes its step (or stops its
  evaluation between batches), saves and returns. A second SIGINT raises
  KeyboardInterrupt: stop at once, without saving. Several hosts: JAX's coordination
  service catches SIGTERM on any host and picks one step at which every host sees the
  request (:meth:`should_stop`), so all save the same step; SIGINT becomes a SIGTERM of
  the same process, which the service then handles. An evaluation under way is not cut
  short there: every host must run the same batches.
  """

  def __init__(self):
    self.requested: str | None = None  # the signal's name
    self._previous = {}

  def __enter__(self):
    if jax.process_count() > 1:
      handlers = {signal.SIGINT: self._forward}
    else:
      handlers = {signal.SIGTERM: self._handler, signal.SIGINT: self._handler}
    for signum, handler in handlers.items():
      try:
        self._previous[signum] = signal.signal(signum, handler)
      except ValueError:  # not the main thread (e.g. some notebook runners)
        pass
    return self

  def _handler(self, signum, frame):
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = name
    again = ' (Ctrl-C again: stop now, without saving)' if signum == signal.SIGINT else ''
    logging.warning('%s received: saving a checkpoint, then exiting%s.', name, again)

  def _forward(self, signum, frame):
    self.requested = signal.Signals(signum).name
    logging.warning('SIGINT received: stopping every host at a common step to save it.')
    os.kill(os.getpid(), signal.SIGTERM)

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  def during_evaluation(self) -> bool:
    """Whether an evaluation should stop between batches (one host only)."""
    return jax.process_count() == 1 and self.requested is not None

  def should_stop(self, step: int) -> bool:
    """Whether to save at ``step`` and stop; the same answer on every host."""
    if jax.process_count() == 1:
      return self.requested is not None
    # JAX's coordination service catches the SIGTERM on any host and picks one step at
    # which every host sees True, so all of them save the same step.
    return multihost_utils.reached_preemption_sync_point(step)


def on_process_0(action: Callable[[], Any]) -> Any:
  """Runs ``action`` on process 0 only; if it raises, every process stops.

  Returns:
    What ``action`` returned on process 0; None on the others.
  """
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = action()
    except Exception as raised:  # noqa: BLE001  re-raised below, after telling the others
      error = raised
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      raise workdir.WorkdirError('process 0 refused to start this run; its error line says why.')
  if error is not None:
    raise error
  return result
