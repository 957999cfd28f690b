"""Runs main.py with test hooks set by environment variables (tests only).

GSA_TEST_KILL_AT_SAVE=N: SIGKILL this process as soon as the save of step N has started
  (its files are being written in the background), i.e. a crash in the middle of a save.
GSA_TEST_STEP_PAUSE=S: sleep S seconds after every training batch is read, so a signal
  sent by a test lands while training is still under way.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

from gsa_flax import checkpointing, input_pipeline

kill_at = os.environ.get('GSA_TEST_KILL_AT_SAVE')
if kill_at:
  original_save = checkpointing.Checkpointer.save

  def save_then_die(self, step, state, meta):
    original_save(self, step, state, meta)
    if step == int(kill_at):
      os.kill(os.getpid(), signal.SIGKILL)

  checkpointing.Checkpointer.save = save_then_die

pause = float(os.environ.get('GSA_TEST_STEP_PAUSE', 0))
if pause:
  original_iterator = input_pipeline.create_train_iterator

  def slow_iterator(*args, **kwargs):
    for batch in original_iterator(*args, **kwargs):
      time.sleep(pause)
      yield batch

  input_pipeline.create_train_iterator = slow_iterator

main = Path(__file__).resolve().parents[1] / 'main.py'
sys.argv[0] = str(main)
runpy.run_path(str(main), run_name='__main__')
