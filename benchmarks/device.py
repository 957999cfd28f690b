"""On one GPU or one TPU host: the proof that the default path runs, and what it measures.

Under 8 minutes on one accelerator (cases past ``--budget-s`` are skipped and listed):

1. the self-check (:mod:`gsa_flax.model.selfcheck`) at GSA-ResNet-50's layer geometries
   (224x224, bfloat16, batch 2): the kernels against the einsum ops, forward and gradients;
2. the GSA module alone (GSA-ResNet-50's first stage: 56x56, 64 channels, 8 heads, batch
   128, bfloat16, forward + backward), einsum ops (``implementation='xla'``) against the
   default path (the kernels where the device supports them);
3. the project's train step (as the trainer builds it, one device) of ResNet-50 and
   GSA-ResNet-50 at 224x224 in bfloat16, 128 per chip: step time, images/s and MFU (the
   model's FLOPs per step over the measured bf16 matmul rate, see ``benchmarks/gpu.py``);
4. the largest GSA-ResNet-50 batch per chip that compiles and runs a step (doubling from
   128).

Writes ``docs/benchmarks/device.json`` (``--out``).

  python -m benchmarks.device            # on the GPU / TPU machine
  python -m benchmarks.device --smoke    # CPU, tiny models and sizes, kernels interpreted
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks import common, gpu


def selfcheck_case(model_name: str, image_size: int, implementation) -> dict:
  """The self-check over the network's distinct GSA geometries: errors per layer."""
  from gsa_flax.model import networks, selfcheck

  model = networks.create_model(model_name, num_classes=gpu.NUM_CLASSES, dtype=jnp.bfloat16)
  t0 = time.perf_counter()
  results = selfcheck.check(model, image_size, batch=2, implementation=implementation)
  return {
    'seconds': time.perf_counter() - t0,
    'passed': all(r.ok for r in results),
    'layers': [
      {'layer': r.layer.describe(), 'errors': r.errors, 'tolerance': r.tolerance} for r in results
    ],
  }


def largest_batch(
  model_name: str, image_size: int, start: int, limit: int, deadline: float
) -> dict:
  """Doubles the batch from ``start`` up to ``limit`` until a step fails (out of memory);
  a search stopped by the time budget gives a lower bound."""
  fits, failed, batch = None, None, start
  while batch <= limit and time.perf_counter() < deadline:
    try:
      gpu.train_case(model_name, batch, image_size, 'bfloat16', steps=1)
      fits = batch
      batch *= 2
    except Exception as e:  # noqa: BLE001 - out of memory ends the search
      failed = f'{batch}: {type(e).__name__}: {str(e)[:160]}'
      break
  stopped = 'failure' if failed else ('limit' if batch > limit else 'time budget')
  return {'largest_batch_that_ran': fits, 'first_failure': failed, 'stopped_by': stopped}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true', help='CPU, tiny models and sizes')
  parser.add_argument('--steps', type=int, default=10, help='timed train steps per case')
  parser.add_argument('--budget-s', type=float, default=420.0, help='skip cases past this')
  parser.add_argument(
    '--out', default=None, help='JSON file (default: docs/benchmarks/device.json)'
  )
  args = parser.parse_args()
  if args.smoke:
    models, image_size, batch, steps = ('resnet_tiny', 'gsa_resnet_tiny'), 16, 2, 2
    check_model, check_size, gsa_shape, mm_n = 'gsa_resnet_tiny', 8, (2, 8, 16, 4), 256
    batch_limit, out = 8, args.out
  else:
    models, image_size, batch, steps = ('resnet50', 'gsa_resnet50'), 224, 128, args.steps
    check_model, check_size, gsa_shape, mm_n = 'gsa_resnet50', 224, (128, 56, 64, 8), 8192
    batch_limit = 4096
    out = args.out or os.path.join(common.REPO, 'docs', 'benchmarks', 'device.json')
  start = time.perf_counter()
  deadline = start + args.budget_s
  device = jax.devices()[0]
  # On CPU the default path is the einsum ops: the kernels run in the Pallas interpreter.
  kernels = 'pallas' if device.platform == 'cpu' else None
  record = {
    'device': device.device_kind,
    'platform': device.platform,
    'devices': jax.device_count(),
    'jax': jax.__version__,
    'smoke': args.smoke,
    'skipped': [],
  }
  print(f'# {device.device_kind} ({device.platform}); jax {jax.__version__}; smoke={args.smoke}')

  def run(name, fn):
    if time.perf_counter() > deadline:
      record['skipped'].append(name)
      return None
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - report (e.g. out of memory) and go on
      traceback.print_exc(limit=2)
      return {'failed': f'{type(e).__name__}: {str(e)[:200]}'}

  record['selfcheck'] = run('selfcheck', lambda: selfcheck_case(check_model, check_size, kernels))
  print('self-check:', json.dumps(record['selfcheck'])[:400], flush=True)

  peak = gpu.matmul_rate(mm_n, jnp.bfloat16)
  record['measured_bf16_matmul_flops'] = peak
  b, s, c, h = gsa_shape
  record['gsa_module'] = {'shape': {'batch': b, 'size': s, 'channels': c, 'heads': h}}
  for label, impl in (('einsum', 'xla'), ('default', kernels)):
    r = run(
      f'gsa module {label}', lambda impl=impl: gpu.gsa_case(b, s, c, h, jnp.bfloat16, steps, impl)
    )
    record['gsa_module'][label] = r
    print(f'GSA module {label}: {r}', flush=True)

  record['train'] = {}
  for name in models:
    r = run(
      f'train {name}', lambda name=name: gpu.train_case(name, batch, image_size, 'bfloat16', steps)
    )
    if r and 'step_s' in r:
      r['images_per_s'] = batch / r['step_s']
      r['mfu_vs_measured_matmul'] = r['flops'] / r['step_s'] / peak
      r.pop('step_times_s', None)
    record['train'][name] = r
    print(f'train {name} batch {batch}: {r}', flush=True)

  record['largest_batch'] = run(
    'largest batch', lambda: largest_batch(models[1], image_size, 2 * batch, batch_limit, deadline)
  )
  print('largest batch:', record['largest_batch'])
  record['seconds'] = time.perf_counter() - start
  if out:
    with open(out, 'w') as f:
      json.dump(record, f, indent=1, default=float)
      f.write('\n')
    print('wrote', out)


if __name__ == '__main__':
  main()
