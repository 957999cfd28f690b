"""Sizing GSA against convolution on Cloud TPU slices and an H100, without the chips.

For each target (:mod:`gsa_flax.tools.sizing.aot`) this compiles, on this machine (nothing runs):

1. ``module``: the GSA module of GSA-ResNet-50's first stage (64 channels, 8 heads, d_k 32,
   56x56, bfloat16, training-mode BatchNorm), forward + backward, 32 examples per chip,
   with the einsum ops (``gsa_xla``, before the kernels) and with the Pallas kernels
   (``gsa``), against a 3x3 convolution 64->64 + BatchNorm (``conv``)
   (:mod:`benchmarks.kernels`);
2. ``train``: the training step of ``configs/imagenet.py`` at 224x224 (bfloat16 compute,
   SGD with Nesterov momentum), 32 images per chip, exactly as ``train_and_evaluate``
   builds it (:func:`gsa_flax.tools.sizing.report.target_summary`), for ResNet-50
   (``resnet50``, the counterpart), GSA-ResNet-50 with the einsum ops
   (``gsa_resnet50_xla``), with the kernels (``gsa_resnet50``) and with the kernels and
   each rematerialisation policy of ``config.remat`` (``gsa_resnet50_remat_block``,
   ``gsa_resnet50_remat_dots``);

and prints, per target and per chip, the estimated HBM traffic, the temporaries, the HBM
needed against the chip's, FLOPs, the roofline step time, images/s and MFU, the largest
batch per chip that fits (a second compile at 64 per chip) and the ratios to the
convolutional side. ``--pod`` compiles the GSA-ResNet-50 step for a multi-host slice and
lists its collectives. Each compile runs in a process of its own, one at a time: a
compiler that crashes is recorded as such and the rest go on. Results are merged by target
into ``docs/benchmarks/targets.json``; ``--tables`` prints them again.

ResNet-50-sized steps take minutes each to compile for a TPU on a small machine; run a
target at a time if needed (results accumulate in the JSON):

  python -m benchmarks.targets                                    # the default targets
  python -m benchmarks.targets --targets=tpu-v5e:2x2,h100 --cases=module
  python -m benchmarks.targets --targets=h100 --networks=gsa_resnet50,resnet50
  python -m benchmarks.targets --targets= --pod=tpu-v5e:4x4       # the pod slice only
  python -m benchmarks.targets --tables                           # print the saved JSON
"""

from __future__ import annotations

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402

from benchmarks import common, kernels  # noqa: E402
from configs import imagenet  # noqa: E402
from gsa_flax import files  # noqa: E402
from gsa_flax.tools.sizing import aot, report  # noqa: E402
from gsa_flax.train import experiment

JSON = os.path.join(common.REPO, 'docs', 'benchmarks', 'targets.json')
DEFAULT_TARGETS = ('tpu-v5e:2x2', 'tpu-v6e:2x2', 'tpu-v5p:2x2x1', 'h100')

# The training steps: network -> (model, config.gsa.implementation, config.remat).
NETWORKS = {
  'resnet50': ('resnet50', '', ''),
  'gsa_resnet50_xla': ('gsa_resnet50', 'xla', ''),
  'gsa_resnet50': ('gsa_resnet50', '', ''),
  'gsa_resnet50_remat_block': ('gsa_resnet50', '', 'block'),
  'gsa_resnet50_remat_dots': ('gsa_resnet50', '', 'dots'),
}
CASES = {'module': tuple(kernels.KINDS), 'train': tuple(NETWORKS)}
# The targets: GSA / conv traffic of the module, GSA-ResNet-50 / ResNet-50 traffic
# and temporaries of the training step.
MODULE_TRAFFIC, TRAIN_TRAFFIC, TRAIN_TEMPORARIES = 3.0, 1.5, 1.5
GB, GIB = 1e9, 2**30


def train_config(network: str) -> ml_collections.ConfigDict:
  """``configs/imagenet.py`` for one of :data:`NETWORKS` (ResNet-50: its counterpart)."""
  model, implementation, remat = NETWORKS[network]
  config = imagenet.get_config()
  config.gsa.implementation = implementation
  config.remat = remat
  if model != config.model:
    config = experiment.counterpart(config)
  return config


def measure_train(target_name: str, network: str, batch: int, fit: bool) -> dict[str, Any]:
  """One training step compiled for a target (:func:`report.target_summary`)."""
  s = report.target_summary(train_config(network), target_name, batch_per_chip=batch, fit=fit)
  return {
    'target': s.target,
    'case': 'train',
    'kind': network,
    'batch_per_chip': s.batch_per_chip,
    'num_chips': s.num_chips,
    'num_hosts': s.num_hosts,
    'compile_s': s.compile_seconds,
    'analysis': dataclasses.asdict(s.analysis),
    'hbm_needed': s.hbm_needed,
    'hbm_capacity': s.chip.hbm_bytes,
    'model_flops_per_example': s.model_flops_per_example,
    'roofline': dataclasses.asdict(s.roofline),
    **({'fit': dataclasses.asdict(s.fit)} if s.fit else {}),
  }


def run_job(target_name: str, case: str, network: str, batch: int, fit: bool) -> dict[str, Any]:
  if case == 'module':
    return kernels.measure(aot.get_target(target_name), network, batch)
  return measure_train(target_name, network, batch, fit)


# ----------------------------------------------------------------------------- tables


def _ratio(a: float | None, b: float | None) -> str:
  return f'{a / b:.2f}x' if a is not None and b else '-'


def _row(label: str, r: dict[str, Any]) -> str:
  a, roof = r['analysis'], r['roofline']
  largest = r.get('fit', {}).get('largest_batch', '-')
  mfu = f'{100 * roof["mfu"]:.0f}%' if roof['mfu'] is not None else '-'
  return (
    f'| {label} | {a["hbm_bytes"] / GB:.3g} | {a["temp_bytes"] / GIB:.3g} | '
    f'{r["hbm_needed"] / GIB:.3g} / {r["hbm_capacity"] / GIB:.0f} | {a["flops"] / 1e9:,.0f} | '
    f'{1e3 * roof["step_seconds"]:.3g} ({roof["bound"]}) | '
    f'{roof["examples_per_second"]:,.0f} | {mfu} | {largest} |'
  )


def _ratio_row(label: str, r: dict[str, Any], base: dict[str, Any]) -> str:
  a, b = r['analysis'], base['analysis']
  largest = r.get('fit', {}).get('largest_batch')
  base_largest = base.get('fit', {}).get('largest_batch')
  return (
    f'| {label} | **{_ratio(a["hbm_bytes"], b["hbm_bytes"])}** | '
    f'**{_ratio(a["temp_bytes"], b["temp_bytes"])}** | '
    f'{_ratio(r["hbm_needed"], base["hbm_needed"])} | {_ratio(a["flops"], b["flops"])} | '
    f'{_ratio(r["roofline"]["step_seconds"], base["roofline"]["step_seconds"])} | '
    f'{_ratio(r["roofline"]["examples_per_second"], base["roofline"]["examples_per_second"])} '
    f'| | {_ratio(largest, base_largest)} |'
  )


_HEADER = (
  '| {what} | HBM traffic GB | temporaries GiB | HBM needed / chip GiB | GFLOPs | '
  'roofline step ms | slice images/s | MFU | largest batch / chip |\n'
  '|---|---:|---:|---:|---:|---:|---:|---:|---:|'
)
_LABELS = {
  **kernels.KINDS,
  'resnet50': 'ResNet-50',
  'gsa_resnet50_xla': 'GSA-ResNet-50, einsum ops (before)',
  'gsa_resnet50': 'GSA-ResNet-50, kernels (after)',
  'gsa_resnet50_remat_block': "GSA-ResNet-50, kernels, remat 'block'",
  'gsa_resnet50_remat_dots': "GSA-ResNet-50, kernels, remat 'dots'",
}


def _met(value: float, limit: float) -> str:
  return f'{value:.2f}x ({"met" if value <= limit else "missed"}, <= {limit:g}x)'


def tables(saved: dict[str, Any]) -> str:
  """Markdown: per target, the module and the training-step tables, and the issue's targets."""
  results: dict[str, dict[str, Any]] = saved['results']
  revisions = sorted({r.get('revision', '?') for v in results.values() for r in v.values()})
  out = [
    f'Compiled at revision {", ".join(revisions) or "unknown"} with JAX {saved.get("jax")} '
    f'on {saved.get("machine")}; nothing executed. Per chip unless noted.',
    '',
  ]
  for target, by_key in results.items():
    for case, base_kind, title in (
      ('module', 'conv', 'GSA module vs 3x3 conv + BN, 56x56x64, fwd + bwd'),
      ('train', 'resnet50', 'Training step at 224x224'),
    ):
      present = [k for k in CASES[case] if f'{case}/{k}' in by_key]
      if not present:
        continue
      batch = by_key[f'{case}/{present[0]}']['batch_per_chip']
      out += [f'#### {target}: {title}, {batch} per chip', '', _HEADER.format(what=case)]
      out += [_row(_LABELS[k], by_key[f'{case}/{k}']) for k in present]
      base = by_key.get(f'{case}/{base_kind}')
      if base:
        for k in present:
          if k != base_kind:
            out.append(
              _ratio_row(f'{_LABELS[k]} / {_LABELS[base_kind]}', by_key[f'{case}/{k}'], base)
            )
      out.append('')
      after = by_key.get(f'{case}/{"gsa" if case == "module" else "gsa_resnet50"}')
      if base and after:
        a, b = after['analysis'], base['analysis']
        traffic = a['hbm_bytes'] / b['hbm_bytes']
        if case == 'module':
          out += [f'Module traffic with the kernels: {_met(traffic, MODULE_TRAFFIC)}.', '']
        else:
          temps = a['temp_bytes'] / b['temp_bytes']
          out += [
            f'Training step with the kernels: traffic {_met(traffic, TRAIN_TRAFFIC)}, '
            f'temporaries {_met(temps, TRAIN_TEMPORARIES)}.',
            '',
          ]
  for target, by_key in saved.get('failed', {}).items():
    out += [f'Not compiled: {target} {key}: {why}.' for key, why in by_key.items()] + ['']
  for target, by_key in results.items():
    pod = by_key.get('pod')
    if pod:
      a = pod['analysis']
      collectives = ', '.join(f'{k} x{v}' for k, v in a['collectives'].items()) or 'none'
      out += [
        f'Pod slice {target}: {pod["num_chips"]} chips on {pod["num_hosts"]} hosts, '
        f'{_LABELS[pod["kind"]]} step at {pod["batch_per_chip"]} per chip compiled in '
        f'{pod["compile_s"]:.0f} s; per chip: HBM traffic {a["hbm_bytes"] / GB:.2f} GB, '
        f'temporaries {a["temp_bytes"] / GIB:.2f} GiB, HBM needed '
        f'{pod["hbm_needed"] / GIB:.2f} GiB, roofline step '
        f'{1e3 * pod["roofline"]["step_seconds"]:.1f} ms, '
        f'{pod["roofline"]["examples_per_second"]:,.0f} images/s for the slice; '
        f'collectives: {collectives}.',
        '',
      ]
  return '\n'.join(out)


# ----------------------------------------------------------------------------- runs


def _revision() -> str:
  """The git revision of the code measured ('unknown' outside a checkout; '+' if the
  package has uncommitted changes)."""
  proc = subprocess.run(
    ['git', 'rev-parse', '--short', 'HEAD'], cwd=common.REPO, capture_output=True, text=True
  )
  if proc.returncode != 0:
    return 'unknown'
  dirty = subprocess.run(
    ['git', 'diff', '--quiet', 'HEAD', '--', 'gsa_flax', 'benchmarks', 'configs'],
    cwd=common.REPO,
  )
  return proc.stdout.strip() + ('+' if dirty.returncode else '')


def _load() -> dict[str, Any]:
  if os.path.exists(JSON):
    with open(JSON) as f:
      return json.load(f)
  return {'results': {}}


def _save(saved: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(JSON), exist_ok=True)
  files.write_atomically(JSON, json.dumps(saved, indent=1, sort_keys=True))


def _in_child(target: str, case: str, network: str, batch: int, fit: bool) -> dict[str, Any]:
  """Runs one job in a fresh process; ``{'result': ...}`` or ``{'failed': reason}``."""
  command = [sys.executable, '-m', 'benchmarks.targets', '--job', f'{target}/{case}/{network}']
  command += [f'--batch={batch}', f'--fit-batch={int(fit)}']
  proc = subprocess.run(command, cwd=common.REPO, capture_output=True, text=True)
  if proc.returncode == 0:
    return {'result': json.loads(proc.stdout.strip().splitlines()[-1])}
  if proc.returncode < 0:
    why = f'the compiler process died ({signal.Signals(-proc.returncode).name})'
  else:
    why = (proc.stderr.strip().splitlines() or [f'exit status {proc.returncode}'])[-1][:300]
  return {'failed': why}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--targets', default=','.join(DEFAULT_TARGETS), help='comma-separated')
  parser.add_argument('--cases', default='module,train', help='module, train (comma-separated)')
  parser.add_argument('--batch', type=int, default=32, help='per chip')
  parser.add_argument('--fit-batch', type=int, default=1, help='find the largest batch (0: no)')
  parser.add_argument(
    '--networks',
    default='',
    help=f'only these (default: all): {", ".join(k for c in CASES.values() for k in c)}',
  )
  parser.add_argument('--pod', default='', help='a multi-host slice for the GSA-ResNet-50 step')
  parser.add_argument('--tables', action='store_true', help='print the saved JSON and exit')
  parser.add_argument('--job', default='', help=argparse.SUPPRESS)  # target/case/network
  args = parser.parse_args()

  if args.job:  # a child: one compile, its result as the last line of stdout
    target, case, network = args.job.split('/')
    print(json.dumps(run_job(target, case, network, args.batch, bool(args.fit_batch))))
    return
  saved = _load()
  if args.tables:
    print(tables(saved))
    return
  saved['machine'] = common.machine()
  saved['jax'] = jax.__version__
  revision = _revision()
  jobs = [
    (name, case, network, bool(args.fit_batch), case)
    for name in args.targets.split(',')
    if name
    for case in args.cases.split(',')
    if case
    for network in CASES[case]
    if not args.networks or network in args.networks.split(',')
  ]
  if args.pod:
    jobs.append((args.pod, 'train', 'gsa_resnet50', False, 'pod'))
  for name, case, network, fit, slot in jobs:
    target = aot.get_target(name).name
    key = 'pod' if slot == 'pod' else f'{case}/{network}'
    print(f'compiling {key} ({network}) for {target} ...', flush=True)
    outcome = _in_child(name, case, network, args.batch, fit)
    saved = _load() | {'machine': saved['machine'], 'jax': saved['jax']}
    if 'result' in outcome:
      outcome['result']['revision'] = revision
      saved['results'].setdefault(target, {})[key] = outcome['result']
      saved.get('failed', {}).get(target, {}).pop(key, None)
    else:
      print(f'  failed: {outcome["failed"]}', flush=True)
      saved.setdefault('failed', {}).setdefault(target, {})[key] = (
        f'{outcome["failed"]} (at revision {revision})'
      )
    _save(saved)
  print(tables(saved))


if __name__ == '__main__':
  main()
