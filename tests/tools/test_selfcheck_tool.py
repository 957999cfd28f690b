"""python -m gsa_flax.tools.selfcheck on CPU: the kernels interpreted, one line per GSA layer
geometry of the config's network and a summary."""

import subprocess
import sys

from helpers import REPO, environment


def test_the_tool_checks_every_geometry_of_a_config_on_cpu():
  command = [
    sys.executable,
    '-m',
    'gsa_flax.tools.selfcheck',
    f'--config={REPO / "configs" / "default.py"}',
    '--config.stage_sizes=(1,)',  # one stage: its one block is the one GSA geometry
    '--config.image_size=8',
    '--config.num_filters=8',
    '--config.gsa.num_heads=2',
  ]
  done = subprocess.run(
    command, env=environment(devices=1), capture_output=True, text=True, timeout=300, cwd=REPO
  )
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.strip().splitlines()
  assert lines[0].startswith('ok   BottleneckBlock_0/GSA_0 (8x8, 8 -> 8 channels, 2 heads, d_k 4)')
  assert lines[-1].startswith(
    'GSA self-check: kernels match the einsum ops on 1/1 layer geometries'
  )
