"""The visualize tool and figures on a real run: main.py writes maps at every eval, the CLI
draws them from the checkpoint, learning curves come from the run's events."""

import glob
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from helpers import REPO, environment, main_command
from PIL import Image

from gsa_flax.tools import plots, visualize
from gsa_flax.tools.events import read_scalars
from gsa_flax.train import workdir as workdir_lib


@pytest.fixture(scope='module')
def trained_workdir(digits_dir, tmp_path_factory):
  """A two-step main.py run with attention maps on, evaluating after each step."""
  workdir = tmp_path_factory.mktemp('trained_run')
  command, env = main_command(
    digits_dir,
    workdir,
    devices=2,
    num_train_steps=2,
    log_every_steps=1,
    eval_every_steps=1,
    checkpoint_every_steps=2,
    attention_maps=True,
  )
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return str(workdir)


def _image_tags(workdir):
  tags = {}
  for path in glob.glob(f'{workdir}/events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == 'images':
          tags.setdefault(value.tag, set()).add(event.step)
  return tags


def test_main_writes_attention_maps_at_every_eval(trained_workdir):
  assert _image_tags(trained_workdir) == {'attention_maps': {1, 2}}


def test_draws_eval_images_and_files(trained_workdir, tmp_path, capsys):
  assert visualize.run(trained_workdir, str(tmp_path / 'a.png'), count=2) == 0
  with Image.open(tmp_path / 'a.png') as image:
    width, height = image.size
  assert width > 1200 and height > 400  # two images side by side, two layer rows
  # Image files: a bad one is reported on one line and the others are still drawn.
  Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / 'grey.png')
  (tmp_path / 'notes.txt').write_text('not an image')
  paths = [str(tmp_path / 'grey.png'), str(tmp_path / 'notes.txt')]
  status = visualize.run(trained_workdir, str(tmp_path / 'b.png'), paths, layers=['-1'], head=1)
  assert status == 1
  assert 'notes.txt: not a decodable image' in capsys.readouterr().err
  assert (tmp_path / 'b.png').stat().st_size > 5_000
  with pytest.raises(ValueError, match='has 2 heads'):
    visualize.run(trained_workdir, str(tmp_path / 'c.png'), paths[:1], head=2)
  with pytest.raises(workdir_lib.WorkdirError, match='does not exist'):
    visualize.run(str(tmp_path / 'nowhere'), str(tmp_path / 'c.png'))


def test_cli_reports_a_bad_flag_in_one_line(trained_workdir, tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'gsa_flax.tools.visualize',
      f'--workdir={trained_workdir}',
      f'--output={tmp_path / "x.png"}',
      '--layers=7',
    ],
    env=environment(devices=1),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: no GSA layer '7'")
  assert not (tmp_path / 'x.png').exists()


def test_learning_curves(trained_workdir, tmp_path):
  scalars = read_scalars(trained_workdir)
  assert sorted(scalars['eval_accuracy']) == [1, 2]
  fig = plots.learning_curves_figure(trained_workdir)
  fig.savefig(tmp_path / 'curves.png')
  assert (tmp_path / 'curves.png').stat().st_size > 10_000
  with pytest.raises(FileNotFoundError, match='no training metrics'):
    plots.learning_curves_figure(str(tmp_path))
