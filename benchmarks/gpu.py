"""GPU benchmark: GSA-ResNet-50 and ResNet-50 train steps in bfloat16, and the GSA module.

One script, under 8 minutes on one H100:

1. the accelerator's measured bfloat16 matmul rate (a large ``jnp.dot``) and memory
   bandwidth (a large elementwise pass): the ceilings;
2. the project's train step as the trainer runs it (``state.setup`` + ``state.create`` +
   ``steps.jit_train_step`` over a one-device ``steps.make_mesh``) of ResNet-50 and
   GSA-ResNet-50 at 224x224, ``config.dtype='bfloat16'`` (parameters stay float32), batch
   128 and 256, on a fixed random batch: compile time, per-step times, images/s and model
   FLOPs utilisation (the step's model FLOPs from XLA's cost analysis, counted with
   ``config.gsa.order='logits'`` and the einsum ops, / step time / measured matmul rate);
3. the GSA module alone (GSA-ResNet-50's first stage: 64 channels, 8 heads, 56x56) forward
   + backward in bfloat16, against its floors: FLOPs / matmul rate and bytes accessed
   (XLA's estimate) / bandwidth; once per ``GSA(implementation=...)`` variant (``'xla'``,
   ``'pallas'``) where the layer has that attribute, else once.

Cases that would overrun ``--budget-s`` are skipped and listed; a case that fails (e.g.
out of memory) is reported and the rest still run.

  python -m benchmarks.gpu                 # on the GPU machine
  python -m benchmarks.gpu --smoke         # CPU, tiny models and sizes, ~1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks import common

NUM_CLASSES = 1000


def matmul_rate(n: int, dtype, iters: int = 10) -> float:
  """Measured dense matmul FLOP/s at ``n x n`` in ``dtype`` (best of ``iters``)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
  t = common.time_fn(lambda: f(a, b).block_until_ready(), warmup=3, iters=iters)
  return 2 * n**3 / t['min_s']


def bandwidth(mib: int, iters: int = 10) -> float:
  """Measured bytes/s of an elementwise read + write pass over ``mib`` MiB of float32."""
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001 + 1.0)
  t = common.time_fn(lambda: f(x).block_until_ready(), warmup=3, iters=iters)
  return 2 * x.nbytes / t['min_s']


def train_case(model_name: str, batch: int, image_size: int, dtype: str, steps: int) -> dict:
  """Compile and time the project's train step on one device; per-step wall times."""
  config = common.imagenet_config(model_name, batch, image_size, dtype)
  step = common.compile_train_step(config, NUM_CLASSES, jax.devices()[:1])
  times = [step() for _ in range(steps + 2)][2:]  # two warm-up steps (allocation, autotuning)
  return {
    'compile_s': step.compile_s,
    'step_s': statistics.median(times),
    'step_times_s': times,
    'flops': model_flops(config, step.batch),
    'executed_flops': common.xla_flops(step.compiled),
    'peak_bytes': common.xla_peak_bytes(step.compiled),
  }


def model_flops(config, batch) -> float:
  """The train step's FLOPs in the model's minimal-FLOP order: what MFU counts.

  Where ``order='auto'`` runs the values-first order it executes more FLOPs for fewer
  bytes; that is a schedule, not model work, so MFU counts the same step built with
  ``config.gsa.order = 'logits'`` and the einsum ops (``config.gsa.implementation =
  'xla'``: XLA's cost analysis cannot see inside a Pallas kernel), from XLA's cost analysis
  of the lowered step (shapes only, nothing is initialised or compiled).
  """
  from gsa_flax.train import experiment, steps
  from gsa_flax.train import state as state_lib

  config = config.copy_and_resolve_references()
  config.gsa.order = 'logits'
  config.gsa.implementation = 'xla'
  pieces = experiment.setup(config, NUM_CLASSES, steps_per_epoch=1000, num_train_steps=10_000)
  mesh = steps.make_mesh(jax.devices()[:1])
  step = steps.jit_train_step(mesh, pieces.schedule, NUM_CLASSES, config.label_smoothing)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
  return common.xla_flops(step.lower(state_lib.abstract(pieces, config.image_size), abstract))


def gsa_implementations() -> list[str | None]:
  """The ``GSA(implementation=...)`` variants to time; ``[None]`` if the layer has no such knob."""
  from gsa_flax.model.layers import GSA

  if 'implementation' in {f.name for f in dataclasses.fields(GSA)}:
    return ['xla', 'pallas']
  return [None]


def gsa_case(
  batch: int, size: int, channels: int, heads: int, dtype, iters: int, implementation=None
) -> dict:
  """The GSA module alone, forward + backward (params and input), train-mode BatchNorm."""
  from gsa_flax.model.layers import GSA

  kwargs = {} if implementation is None else {'implementation': implementation}
  module = GSA(channels, num_heads=heads, dtype=dtype, **kwargs)
  x = jax.random.normal(jax.random.key(0), (batch, size, size, channels), dtype)
  compiled, params = common.compile_fwd_bwd(module, x)
  t = common.time_fn(lambda: jax.block_until_ready(compiled(params, x)), warmup=3, iters=iters)
  mem = compiled.memory_analysis()
  return {
    'step_s': t['median_s'],
    'flops': common.xla_flops(compiled),
    'bytes_accessed': common.xla_bytes(compiled),
    # What any implementation must at least move: read inputs + params, write grads.
    'io_bytes': mem.argument_size_in_bytes + mem.output_size_in_bytes,
    'peak_bytes': common.xla_peak_bytes(compiled),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true', help='CPU, tiny models and sizes')
  parser.add_argument('--batches', type=int, nargs='+', default=[128, 256])
  parser.add_argument('--steps', type=int, default=10, help='timed train steps per case')
  parser.add_argument('--budget-s', type=float, default=450.0, help='skip cases past this')
  args = parser.parse_args()
  if args.smoke:
    models, batches, image_size, steps = ('resnet_tiny', 'gsa_resnet_tiny'), [2], 32, 2
    mm_n, bw_mib, gsa_shape = 512, 64, (2, 16, 32, 4)
  else:
    models, batches, image_size, steps = ('resnet50', 'gsa_resnet50'), args.batches, 224, args.steps
    mm_n, bw_mib, gsa_shape = 8192, 2048, (128, 56, 64, 8)
  start = time.perf_counter()
  device = jax.devices()[0]
  print(f'# {device.device_kind} ({device.platform}); jax {jax.__version__}; smoke={args.smoke}')
  peak = matmul_rate(mm_n, jnp.bfloat16)
  bw = bandwidth(bw_mib)
  print(
    f'# measured bf16 matmul ({mm_n}^2): {peak / 1e12:.1f} TFLOP/s; bandwidth {bw / 1e9:.0f} GB/s'
  )

  print(
    '\n| model | batch | step ms (median) | images/s | compile s | model GFLOP/step '
    '| executed GFLOP/step | MFU '
    '| XLA plan GiB |'
  )
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
  skipped = []
  for batch in batches:
    for name in models:
      if time.perf_counter() - start > args.budget_s:
        skipped.append(f'{name} batch {batch}')
        continue
      try:
        r = train_case(name, batch, image_size, 'bfloat16', steps)
      except Exception as e:  # noqa: BLE001 - report (e.g. OOM) and go on with the others
        print(f'| {name} | {batch} | failed: {type(e).__name__}: {str(e)[:120]} | | | | | | |')
        traceback.print_exc(limit=1)
        continue
      print(
        f'| {name} | {batch} | {r["step_s"] * 1e3:.1f} | {batch / r["step_s"]:.0f} '
        f'| {r["compile_s"]:.0f} | {r["flops"] / 1e9:.1f} | {r["executed_flops"] / 1e9:.1f} '
        f'| {100 * r["flops"] / r["step_s"] / peak:.1f}% | {r["peak_bytes"] / 2**30:.1f} |',
        flush=True,
      )
      print(f'<!-- per-step ms: {", ".join(f"{t * 1e3:.1f}" for t in r["step_times_s"])} -->')

  b, s, c, h = gsa_shape
  print(f'\nGSA module alone, batch {b}, {s}x{s}, {c} channels, {h} heads, bf16, fwd + bwd:\n')
  print(
    '| implementation | step ms | GFLOP | FLOP floor ms | XLA bytes GB | bandwidth floor ms '
    '| I/O floor ms | bound | time / max(floors) |'
  )
  print('|---|---:|---:|---:|---:|---:|---:|---|---:|')
  for impl in gsa_implementations():
    label = 'default' if impl is None else impl
    try:
      r = gsa_case(b, s, c, h, jnp.bfloat16, iters=steps, implementation=impl)
    except Exception as e:  # noqa: BLE001 - report (e.g. no kernel for this backend) and go on
      print(f'| {label} | failed: {type(e).__name__}: {str(e)[:120]} | | | | | | | |')
      traceback.print_exc(limit=1)
      continue
    flop_floor = r['flops'] / peak
    bw_floor = r['bytes_accessed'] / bw
    io_floor = r['io_bytes'] / bw
    bound = 'memory' if bw_floor > flop_floor else 'arithmetic'
    print(
      f'| {label} | {r["step_s"] * 1e3:.2f} | {r["flops"] / 1e9:.1f} | {flop_floor * 1e3:.2f} '
      f'| {r["bytes_accessed"] / 1e9:.2f} | {bw_floor * 1e3:.2f} | {io_floor * 1e3:.2f} '
      f'| {bound} | {r["step_s"] / max(flop_floor, bw_floor):.1f}x |',
      flush=True,
    )
  if skipped:
    print(f'\nskipped (time budget {args.budget_s:.0f} s): {"; ".join(skipped)}')
  print(f'\n# total {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
  main()
