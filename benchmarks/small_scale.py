r"""The paper's comparison at a scale that runs on a CPU: ResNet vs GSA-ResNet on Fashion-MNIST.

Shen et al. (2020) find that GSA networks beat the convolutional networks they replace
with fewer parameters and FLOPs. This benchmark asks the same question at the smallest
scale: the ``*_tiny`` networks (four stages of one bottleneck block, widths 16..128) on
Fashion-MNIST resized to 16x16, every row trained with the same recipe and budget
(``configs/fashion_mnist.py`` with the overrides in :data:`BUDGET`: 300 SGD steps of 128
images, 0.64 of an epoch), over several seeds:

- ``resnet``: ``resnet_tiny``, 3x3 convolutions;
- ``gsa``: ``gsa_resnet_tiny``, every 3x3 convolution of the blocks a GSA module;
- ``gsa_content_only``: ``gsa.positional=none``;
- ``gsa_positional_only``: ``gsa.content=False``.

And transfer on real data, against the from-scratch row at the same budget:

- ``gsa_from_digits``: ``gsa`` started from a GSA-ResNet trained on the embedded digits
  (``configs/default.py``, the ``digits_source`` run), with ``init_from``;
- ``gsa56_from_fmnist28`` vs ``gsa56_scratch``: Fashion-MNIST at 56x56 (upscaled), started
  from ``configs/fashion_mnist.py`` trained at 28x28 for 2 epochs (the ``fmnist28_source`` run; its
  position tables are resized), or from scratch; :data:`BUDGET56`.

Every run is ``python main.py`` in a fresh process in ``<root>/<row>/seed<k>``; a run
whose ``result.json`` exists is skipped, and an interrupted one resumes from its
checkpoint, so the command below can be rerun until everything is done. Results go to a
JSON file and a learning-curve figure; the markdown table is printed.

  nice -n 10 python -m benchmarks.small_scale               # everything, resumable
  python -m benchmarks.small_scale --report                 # table + figure of what exists
  python -m benchmarks.small_scale --rows resnet,gsa --seeds 5

Reports, per row: test accuracy at the end (mean ± sample std over seeds, and each seed),
parameters, forward FLOPs (XLA's cost analysis, batch 1, at the row's resolution, in the
contraction order that executes), train seconds per step (median over the run of the
trainer's ``steps_per_sec``, compile excluded; the machine is shared, so the load average
is recorded) and the wall time of each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time

from benchmarks import common
from gsa_flax import files

# The budget every main row shares (overrides of configs/fashion_mnist.py).
BUDGET = {
  'image_size': 16,
  'batch_size': 128,
  'num_train_steps': 300,
  'warmup_epochs': 0.05,  # 23 steps of 468 per epoch
  'log_every_steps': 15,
  'eval_every_epochs': 0.0,
  'eval_every_steps': 150,
  'checkpoint_every_epochs': 0.0,
  'checkpoint_every_steps': 150,
}
# 56x56 transfer: a GSA-ResNet-tiny image costs ~15x a 16x16 one here, so 60 steps of 64.
BUDGET56 = {
  'image_size': 56,
  'batch_size': 64,
  'num_train_steps': 60,
  'warmup_epochs': 0.006,  # 6 steps of 937 per epoch
  'log_every_steps': 5,
  'eval_every_epochs': 0.0,
  'eval_every_steps': 60,
  'checkpoint_every_epochs': 0.0,
  'checkpoint_every_steps': 60,
}
FASHION = 'configs/fashion_mnist.py'


@dataclasses.dataclass(frozen=True)
class Row:
  """One model/recipe, trained once per seed.

  Attributes:
    name: the row's name (its folder under the root).
    label: how the table names it.
    config: the config file.
    overrides: ``--config.<key>=<value>`` flags.
    init_from: the row whose seed-0 run the weights come from; '' = from scratch.
    seeds: how many seeds at most (sources: 1).
    baseline: the row it is compared with (the difference of the means is reported), or ''.
    transfer: trained after every main row has all its seeds.
  """

  name: str
  label: str
  config: str
  overrides: dict
  init_from: str = ''
  seeds: int = 99
  baseline: str = ''
  transfer: bool = False

  @property
  def is_source(self) -> bool:
    return self.seeds == 1


ROWS = (
  Row('resnet', 'ResNet-tiny (3x3 conv)', FASHION, {**BUDGET, 'model': 'resnet_tiny'}),
  Row('gsa', 'GSA-ResNet-tiny', FASHION, BUDGET, baseline='resnet'),
  Row(
    'gsa_content_only',
    'GSA, content only',
    FASHION,
    {**BUDGET, 'gsa.positional': 'none'},
    baseline='resnet',
  ),
  Row(
    'gsa_positional_only',
    'GSA, positional only',
    FASHION,
    {**BUDGET, 'gsa.content': False},
    baseline='resnet',
  ),
  Row(
    'digits_source',
    'GSA-ResNet-tiny on digits (source)',
    'configs/default.py',
    {},
    seeds=1,
    transfer=True,
  ),
  Row(
    'gsa_from_digits',
    'GSA-ResNet-tiny from digits',
    FASHION,
    BUDGET,
    init_from='digits_source',
    baseline='gsa',
    transfer=True,
  ),
  # The source is the 28x28 recipe at 2 epochs (its length when these rows were measured).
  Row(
    'fmnist28_source',
    'GSA-ResNet-tiny 28x28 (source)',
    FASHION,
    {'num_epochs': 2.0},
    seeds=1,
    transfer=True,
  ),
  Row(
    'gsa56_from_fmnist28',
    'GSA-ResNet-tiny 56x56 from 28x28',
    FASHION,
    BUDGET56,
    init_from='fmnist28_source',
    baseline='gsa56_scratch',
    transfer=True,
  ),
  Row('gsa56_scratch', 'GSA-ResNet-tiny 56x56 from scratch', FASHION, BUDGET56, transfer=True),
)
BY_NAME = {row.name: row for row in ROWS}


def workdir(root: str, row: Row, seed: int) -> str:
  return os.path.join(root, row.name, f'seed{seed}')


def command(root: str, row: Row, seed: int) -> list[str]:
  """The ``main.py`` command of one run (what the table cites)."""
  flags = [f'--config={row.config}', f'--workdir={workdir(root, row, seed)}']
  flags += [f'--config.{key}={value}' for key, value in row.overrides.items()]
  if seed:
    flags.append(f'--config.seed={seed}')
  if row.init_from:
    flags.append(f'--config.init_from={workdir(root, BY_NAME[row.init_from], 0)}')
  return ['python', 'main.py', *flags]


def _result_path(root: str, row: Row, seed: int) -> str:
  return os.path.join(workdir(root, row, seed), 'result.json')


def _median_step_s(scalars: dict) -> float | None:
  # The first report includes the compile; the others are steady state.
  rates = [v for _, v in sorted(scalars.get('steps_per_sec', {}).items())][1:]
  return 1.0 / statistics.median(rates) if rates else None


def collect(root: str, row: Row, seed: int, **extra) -> dict:
  """Reads a finished run's metrics from its event files into a result record."""
  from gsa_flax.tools import events

  scalars = events.read_scalars(workdir(root, row, seed))
  curve = lambda tag: sorted(scalars.get(tag, {}).items())  # noqa: E731
  evals = curve('eval_accuracy')
  if not evals:
    raise RuntimeError(f'{workdir(root, row, seed)}: no eval_accuracy; the run did not finish.')
  return {
    'row': row.name,
    'seed': seed,
    'eval_accuracy': evals[-1][1],
    'final_step': evals[-1][0],
    'eval_curve': evals,
    'train_loss_curve': curve('train_loss'),
    'train_accuracy_curve': curve('train_accuracy'),
    'step_s': _median_step_s(scalars),
    'command': ' '.join(command(root, row, seed)),
    **extra,
  }


def train(root: str, row: Row, seed: int) -> dict | None:
  """Trains one run (resuming it if it was interrupted) unless its result exists."""
  path = _result_path(root, row, seed)
  if os.path.exists(path):
    with open(path) as file:
      return json.load(file)
  if row.init_from and not os.path.exists(_result_path(root, BY_NAME[row.init_from], 0)):
    print(f'skip {row.name} seed {seed}: its source {row.init_from} has not run', flush=True)
    return None
  cmd = [sys.executable, *command(root, row, seed)[1:]]
  print(f'{time.strftime("%H:%M:%S")} run: {" ".join(command(root, row, seed))}', flush=True)
  os.makedirs(workdir(root, row, seed), exist_ok=True)
  load_start, start = common.loadavg(), time.perf_counter()
  with open(os.path.join(workdir(root, row, seed), 'main.log'), 'a') as log:
    proc = subprocess.run(cmd, cwd=common.REPO, stdout=log, stderr=subprocess.STDOUT)
  wall = time.perf_counter() - start
  if proc.returncode:
    print(f'  failed (exit {proc.returncode}); see {workdir(root, row, seed)}/main.log', flush=True)
    return None
  result = collect(root, row, seed, wall_s=wall, load_start=load_start, load_end=common.loadavg())
  # Whole or not at all: a result.json is what marks a run as done.
  files.write_atomically(path, json.dumps(result))
  print(f'  eval_accuracy={result["eval_accuracy"]:.4f} in {wall:.0f} s', flush=True)
  return result


def costs(row: Row) -> dict:
  """Parameters and forward FLOPs (batch 1, eval mode) of a row's network."""
  import jax
  import jax.numpy as jnp

  from gsa_flax.data import datasets
  from gsa_flax.model import networks

  config = importlib.import_module(row.config.removesuffix('.py').replace('/', '.')).get_config()
  for key, value in row.overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  model = networks.build(networks.architecture_of(config), datasets.get(config.dataset).num_classes)
  variables = networks.abstract_variables(model, config.image_size)
  params = sum(int(x.size) for x in jax.tree.leaves(variables['params']))
  x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  return {'params': params, 'forward_flops': common.xla_flops(compiled)}


def _mean_std(values: list[float]) -> tuple[float, float]:
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(root: str, results: dict[str, list[dict]], cost: dict[str, dict]) -> str:
  """The markdown table."""
  lines = [
    '| row | seeds | test accuracy % (mean ± std) | per seed | params | forward MFLOPs | '
    's/step (median) | wall min/run | minus the baseline (± s.e.) |',
    '|---|---:|---:|---|---:|---:|---:|---:|---|',
  ]

  def accuracies(name: str) -> list[float]:
    return [100 * r['eval_accuracy'] for r in results.get(name, [])]

  for row in ROWS:
    runs = results.get(row.name, [])
    if not runs:
      continue
    accs = accuracies(row.name)
    mean, std = _mean_std(accs)
    versus = ''
    if row.baseline and accuracies(row.baseline):
      # Difference of the means and its standard error (Welch): sqrt(s1^2/n1 + s2^2/n2).
      base = accuracies(row.baseline)
      error = math.sqrt(_mean_std(accs)[1] ** 2 / len(accs) + _mean_std(base)[1] ** 2 / len(base))
      versus = f'{BY_NAME[row.baseline].label}: {mean - statistics.mean(base):+.2f} ± {error:.2f}'
    steps = [r['step_s'] for r in runs if r.get('step_s')]
    walls = [r['wall_s'] / 60 for r in runs if r.get('wall_s')]
    c = cost.get(row.name, {})
    lines.append(
      f'| {row.label} | {len(runs)} | {mean:.2f} ± {std:.2f} | '
      f'{", ".join(f"{a:.2f}" for a in accs)} | {c.get("params", 0):,} | '
      f'{c.get("forward_flops", 0) / 1e6:.1f} | '
      f'{statistics.median(steps) if steps else float("nan"):.3f} | '
      f'{statistics.mean(walls) if walls else float("nan"):.1f} | {versus} |'
    )
  return '\n'.join(lines)


def figure(results: dict[str, list[dict]], path: str) -> None:
  """Learning curves: train loss and test accuracy of the main rows, and the transfer rows."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  fig, (ax_loss, ax_acc, ax_transfer) = plt.subplots(1, 3, figsize=(15, 4.2), layout='constrained')

  def mean_curve(runs, key):
    steps = [s for s, _ in runs[0][key]]
    values = np.array([[v for _, v in r[key]] for r in runs if len(r[key]) == len(steps)])
    return (
      np.array(steps),
      values.mean(0),
      values.std(0, ddof=1) if len(values) > 1 else 0 * values[0],
    )

  for name in ('resnet', 'gsa', 'gsa_content_only', 'gsa_positional_only', 'gsa_from_digits'):
    runs = results.get(name)
    if not runs:
      continue
    label = f'{BY_NAME[name].label} (n={len(runs)})'
    steps, mean, std = mean_curve(runs, 'train_loss_curve')
    (line,) = ax_loss.plot(steps, mean, label=label)
    ax_loss.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    steps, mean, std = mean_curve(runs, 'eval_curve')
    ax_acc.errorbar(steps, 100 * mean, yerr=100 * std, marker='o', capsize=3, label=label)
  for name in ('gsa56_from_fmnist28', 'gsa56_scratch'):
    runs = results.get(name)
    if not runs:
      continue
    steps, mean, std = mean_curve(runs, 'train_loss_curve')
    acc = 100 * statistics.mean(r['eval_accuracy'] for r in runs)
    (line,) = ax_transfer.plot(
      steps, mean, label=f'{BY_NAME[name].label} (n={len(runs)}, test {acc:.1f}%)'
    )
    ax_transfer.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
  ax_loss.set(title='train loss, 16x16 (mean ± std over seeds)', xlabel='step', yscale='log')
  ax_acc.set(title='test accuracy %, 16x16', xlabel='step')
  ax_transfer.set(title='train loss, 56x56: fine-tuned vs scratch', xlabel='step', yscale='log')
  for ax in (ax_loss, ax_acc, ax_transfer):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  image = io.BytesIO()
  fig.savefig(image, format='png', dpi=110)
  files.write_atomically(path, image.getvalue())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', default='runs/small_scale', help='Where the runs live.')
  parser.add_argument('--seeds', type=int, default=3, help='Seeds per row (sources: 1).')
  parser.add_argument('--rows', default='', help='Comma-separated rows; default all.')
  parser.add_argument('--report', action='store_true', help='Only report what has run.')
  parser.add_argument('--json', default='docs/benchmarks/small_scale.json')
  parser.add_argument('--figure', default='docs/benchmarks/small_scale.png')
  args = parser.parse_args()
  rows = [BY_NAME[name] for name in args.rows.split(',')] if args.rows else list(ROWS)
  # The main rows first, then the transfer rows, each seed by seed across rows, so that an
  # interrupted benchmark has the rows of a group at equal numbers of seeds.
  if not args.report:
    for transfer in (False, True):
      for seed in range(args.seeds):
        for row in rows:
          if row.transfer == transfer and seed < min(row.seeds, args.seeds):
            train(args.root, row, seed)
  results = {}
  for row in ROWS:
    for seed in range(row.seeds if row.is_source else max(args.seeds, 1)):
      path = _result_path(args.root, row, seed)
      if os.path.exists(path):
        with open(path) as file:
          results.setdefault(row.name, []).append(json.load(file))
  cost_path = os.path.join(args.root, 'costs.json')
  cost = json.load(open(cost_path)) if os.path.exists(cost_path) else {}  # noqa: SIM115
  for name in results:
    if name not in cost:
      cost[name] = costs(BY_NAME[name])
  files.write_atomically(cost_path, json.dumps(cost))
  table = report(args.root, results, cost)
  print(table)
  summary = {
    'machine': common.machine(),
    'budget': BUDGET,
    'budget56': BUDGET56,
    'costs': cost,
    'runs': results,
    'table': table,
  }
  files.write_atomically(args.json, json.dumps(summary, indent=1))
  if results:
    figure(results, args.figure)


if __name__ == '__main__':
  main()
