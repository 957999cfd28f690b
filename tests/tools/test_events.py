"""Scalars written by clu's writer come back from the event files as written."""

import time

import numpy as np
from clu import metric_writers

from gsa_flax.tools.events import read_scalars


def test_reads_back_what_was_written(tmp_path):
  rng = np.random.default_rng(155)
  written = {
    step: {'loss': float(rng.normal()), 'count': int(rng.integers(100))} for step in (3, 7)
  }
  writer = metric_writers.create_default_writer(str(tmp_path))
  for step, values in written.items():
    writer.write_scalars(step, values)
  writer.write_images(7, {'picture': np.zeros((1, 4, 4, 3), np.uint8)})  # not a scalar
  writer.write_texts(7, {'note': 'not a scalar'})
  writer.flush()
  # A second file (a resumed run) overrides step 7 of 'loss'. Event files are named by the
  # second they were created in: let one pass so the second file sorts last.
  time.sleep(1.1)
  writer = metric_writers.create_default_writer(str(tmp_path))
  writer.write_scalars(7, {'loss': 0.25})
  writer.flush()
  scalars = read_scalars(str(tmp_path))
  assert set(scalars) == {'loss', 'count'}
  np.testing.assert_allclose(scalars['loss'][3], written[3]['loss'], rtol=1e-6)
  assert scalars['loss'][7] == 0.25
  assert scalars['count'] == {3: written[3]['count'], 7: written[7]['count']}
