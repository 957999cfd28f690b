"""Sizing GSA against convolution on Cloud TPU slices and an H100, without the chips.

For each target (``gsa_flax.tools.aot``) this compiles, on this machine, nothing executed:

1. ``module``: the GSA module of GSA-ResNet-50's first stage (64 channels, 8 heads,
   d_k 32, 56x56, bfloat16, training-mode BatchNorm), forward + backward (gradients of
   parameters and input, loss = sum of squares in float32), 32 examples per chip, against
   a 3x3 convolution 64->64 (no bias) + BatchNorm at the same shape;
2. ``train``: the GSA-ResNet-50 and ResNet-50 training steps at 224x224, 32 images per
   chip, bfloat16 compute with float32 parameters, SGD with Nesterov momentum and weight
   decay (``configs/imagenet.py``), the batch sharded over the chips, the state replicated
   and donated, as ``train_and_evaluate`` jits it;

and prints, per target, the estimated HBM traffic, temporaries, HBM needed against the
chip's, the roofline step time, images/s, MFU, the largest per-chip batch that fits (a
second compile at ``--fit-batch``) and the GSA/conv ratios. ``--pod`` compiles the
GSA-ResNet-50 step for a multi-host slice and lists its collectives. Results are merged
by target into ``docs/benchmarks/targets.json``; ``--tables`` prints them again.

MFU counts model FLOPs as 3x the forward pass's dot/convolution FLOPs (one H100 compile at
batch 1); the roofline's step time uses executed FLOPs (libtpu's count on TPU, the
dot/convolution count on the H100).

ResNet-50 steps take minutes to compile for a TPU on a small machine; run a target at a
time if needed (results accumulate in the JSON):

  python -m benchmarks.targets                                    # the default targets
  python -m benchmarks.targets --targets=tpu-v5e:2x2,h100 --cases=module
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
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from gsa_flax.layers import GSA  # noqa: E402
from gsa_flax.tools import aot  # noqa: E402

JSON = os.path.join(common.REPO, 'docs', 'benchmarks', 'targets.json')
DEFAULT_TARGETS = ('tpu-v5e:2x2', 'tpu-v6e:2x2', 'tpu-v5p:2x2x1', 'h100')

# The module case: GSA-ResNet-50's first stage.
CHANNELS, HEADS, KEY_FEATURES, SIZE = 64, 8, 32, 56
IMAGE_SIZE, NUM_CLASSES = 224, 1000
GB, GIB = 1e9, 2**30


# ----------------------------------------------------------------------------- programs


class ConvBN(nn.Module):
  """The layer GSA replaces: 3x3 convolution (no bias) and BatchNorm."""

  features: int
  dtype: Any = jnp.bfloat16

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype)(x)
    return nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)


def layer(kind: str) -> nn.Module:
  if kind == 'gsa':
    return GSA(CHANNELS, num_heads=HEADS, key_features=KEY_FEATURES, dtype=jnp.bfloat16)
  return ConvBN(CHANNELS)


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def compile_layer(target: aot.Target, kind: str, batch_per_chip: int) -> jax.stages.Compiled:
  """Forward + backward (params and input) of one layer in training mode, batch sharded."""
  module = layer(kind)
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, CHANNELS), jnp.bfloat16)
  variables = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)
  params, state = variables['params'], {k: v for k, v in variables.items() if k != 'params'}

  def loss(params, state, x):
    y, _ = module.apply({'params': params, **state}, x, train=True, mutable=list(state))
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))
  x = jax.ShapeDtypeStruct(
    (batch_per_chip * target.num_chips, SIZE, SIZE, CHANNELS),
    jnp.bfloat16,
    sharding=target.sharding(aot.DATA_AXIS),
  )
  replicated = target.sharding()
  return step.lower(_abstract(params, replicated), _abstract(state, replicated), x).compile()


def compile_layer_forward(target: aot.Target, kind: str) -> jax.stages.Compiled:
  """One example's forward pass of the layer (for its model FLOPs)."""
  module = layer(kind)
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, CHANNELS), jnp.bfloat16, sharding=target.sharding())
  variables = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)
  fwd = jax.jit(lambda v, x: module.apply(v, x, train=False))
  return fwd.lower(_abstract(variables, target.sharding()), x).compile()


def compile_train_step(
  target: aot.Target, model_name: str, batch_per_chip: int, *, forward_only: bool = False
) -> jax.stages.Compiled:
  """The project's training step of ``model_name``, compiled for ``target``.

  The only function of this script that uses the trainer's API (model, optimizer, state,
  step); it is jitted as ``train_and_evaluate`` does. ``forward_only`` compiles one image's
  eval-mode forward pass instead (for the model FLOPs).
  """
  import optax

  from configs import imagenet
  from gsa_flax import models, train

  config = imagenet.get_config()
  model = models.create_model(
    model_name, num_classes=NUM_CLASSES, dtype=jnp.bfloat16, num_heads=config.gsa.num_heads
  )
  schedule = optax.constant_schedule(config.learning_rate)
  tx = train.create_optimizer(config, schedule)
  state = jax.eval_shape(
    functools.partial(train.create_train_state, config, model, tx, image_size=IMAGE_SIZE),
    jax.random.key(0),
  )
  replicated, data = target.sharding(), target.sharding(aot.DATA_AXIS)
  state = _abstract(state, replicated)
  if forward_only:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    x = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32, sharding=replicated)
    return jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  n = batch_per_chip * target.num_chips
  batch = {
    'image': jax.ShapeDtypeStruct((n, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32, sharding=data),
    'label': jax.ShapeDtypeStruct((n,), jnp.int32, sharding=data),
  }
  step = jax.jit(
    functools.partial(
      train.train_step,
      schedule=schedule,
      num_classes=NUM_CLASSES,
      label_smoothing=config.label_smoothing,
    ),
    in_shardings=(replicated, data),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
  return step.lower(state, batch).compile()


# ----------------------------------------------------------------------------- measuring


@functools.cache
def model_flops_per_example(case: str, kind: str) -> float:
  """3x the forward pass's dot/convolution FLOPs of one example (H100 HLO count)."""
  h100 = aot.get_target('h100')
  if case == 'module':
    compiled = compile_layer_forward(h100, kind)
  else:
    compiled = compile_train_step(h100, kind, 1, forward_only=True)
  return 3 * aot.analyze(compiled).matmul_flops


def measure(
  target: aot.Target, case: str, kind: str, batch: int, fit_batch: int | None
) -> dict[str, Any]:
  """Compiles one (case, kind) for ``target``; the analysis, roofline and batch fit."""
  if case == 'module':
    compile_at = functools.partial(compile_layer, target, kind)
  else:
    compile_at = functools.partial(compile_train_step, target, kind)
  t0 = time.perf_counter()
  compiled = compile_at(batch)
  compile_s = time.perf_counter() - t0
  analysis = aot.analyze(compiled)
  model_flops = model_flops_per_example(case, kind)
  roof = aot.roofline(analysis, target, batch_per_chip=batch, model_flops_per_example=model_flops)
  result = {
    'target': target.name,
    'case': case,
    'kind': kind,
    'batch_per_chip': batch,
    'num_chips': target.num_chips,
    'num_hosts': target.num_hosts,
    'compile_s': compile_s,
    'analysis': dataclasses.asdict(analysis),
    'hbm_needed': analysis.hbm_needed,
    'hbm_capacity': target.chip.hbm_bytes,
    'model_flops_per_example': model_flops,
    'roofline': dataclasses.asdict(roof),
  }
  if fit_batch:
    # The deviceless GPU compiler rejects a few shapes (no Triton tiling found for a dot);
    # then the fit uses the next batch that compiles.
    for second in (fit_batch, fit_batch + fit_batch // 2, 2 * fit_batch):
      try:
        known = {batch: compiled, second: compile_at(second)}
        break
      except jax.errors.JaxRuntimeError as e:
        result.setdefault('fit_compile_errors', {})[second] = str(e).splitlines()[0][:200]
    else:
      return result
    fit = aot.fit_batch(known.__getitem__, target.chip, tuple(known), multiple=8)
    result['fit'] = dataclasses.asdict(fit)
  return result


# ----------------------------------------------------------------------------- tables


def _ratio(a: float, b: float) -> str:
  return f'{a / b:.1f}x' if b else '-'


def tables(saved: dict[str, Any]) -> str:
  """Markdown tables of the saved results, one per case."""
  results: dict[str, dict[str, Any]] = saved['results']
  revisions = sorted({r.get('revision', '?') for v in results.values() for r in v.values()})
  out = [
    f'Compiled at revision {", ".join(revisions) or "unknown"} with JAX {saved.get("jax")} '
    f'on {saved.get("machine")}; nothing executed.',
    '',
  ]
  for case, title in (('module', 'GSA module vs 3x3 conv + BN'), ('train', 'Training step')):
    kinds = ('gsa', 'conv') if case == 'module' else ('gsa_resnet50', 'resnet50')
    rows, batches = [], set()
    for target, by_key in results.items():
      pair = [by_key.get(f'{case}/{k}') for k in kinds]
      batches.update(r['batch_per_chip'] for r in pair if r)
      for r in filter(None, pair):
        a, roof = r['analysis'], r['roofline']
        largest = r.get('fit', {}).get('largest_batch', '-')
        mfu = f'{100 * roof["mfu"]:.0f}%' if roof['mfu'] is not None else '-'
        xla = f'{a["xla_bytes"] / GB:.2f}' if a['xla_bytes'] is not None else '-'
        rows.append(
          f'| {target} | {r["kind"]} | {a["hbm_bytes"] / GB:.2f} | '
          f'{a["onchip_bytes"] / GB:.2f} | {xla} | '
          f'{a["flops"] / 1e9:,.1f} | {a["temp_bytes"] / GIB:.2f} | '
          f'{r["hbm_needed"] / GIB:.2f} / {r["hbm_capacity"] / GIB:.0f} | '
          f'{1e3 * roof["step_seconds"]:.2f} ({roof["bound"]}) | '
          f'{roof["examples_per_second"]:,.0f} | {mfu} | {largest} |'
        )
      if None in pair:
        continue
      g, c = pair
      ga, ca = g['analysis'], c['analysis']
      rows.append(
        f'| {target} | GSA / conv | {_ratio(ga["hbm_bytes"], ca["hbm_bytes"])} | '
        f'{_ratio(ga["onchip_bytes"], ca["onchip_bytes"])} | '
        f'{_ratio(ga["xla_bytes"] or 0, ca["xla_bytes"] or 0)} | '
        f'{_ratio(ga["flops"], ca["flops"])} | '
        f'{_ratio(ga["temp_bytes"], ca["temp_bytes"])} | '
        f'{_ratio(g["hbm_needed"], c["hbm_needed"])} | '
        f'{_ratio(g["roofline"]["step_seconds"], c["roofline"]["step_seconds"])} | | | |'
      )
    if rows:
      batch = ', '.join(str(b) for b in sorted(batches))
      out += [
        f'### {title} ({batch} per chip; per chip unless noted)',
        '',
        '| target | network | HBM traffic GB | on-chip GB | libtpu bytes GB | GFLOPs | '
        'temporaries GiB | HBM needed / chip GiB | roofline step ms | slice images/s | MFU | '
        'largest batch / chip |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|',
        *rows,
        '',
      ]
  unpriced = sorted(
    {
      f'{target} {key}'
      for target, by_key in results.items()
      for key, r in by_key.items()
      if r['analysis']['unpriced_custom_calls']
    }
  )
  if unpriced:
    out += [
      'Custom calls (Pallas kernels) with no cost given, counted by their operands and '
      f'results only: {", ".join(unpriced)}.',
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
        f'{pod["kind"]} step at {pod["batch_per_chip"]} per chip compiled in '
        f'{pod["compile_s"]:.0f} s; per chip: HBM traffic {a["hbm_bytes"] / GB:.1f} GB, '
        f'HBM needed {pod["hbm_needed"] / GIB:.2f} GiB, roofline step '
        f'{1e3 * pod["roofline"]["step_seconds"]:.1f} ms, '
        f'{pod["roofline"]["examples_per_second"]:,.0f} images/s; collectives: {collectives}.',
        '',
      ]
  return '\n'.join(out)


def _revision() -> str:
  """The git revision of the code measured ('unknown' outside a checkout)."""
  proc = subprocess.run(
    ['git', 'rev-parse', '--short', 'HEAD'], cwd=common.REPO, capture_output=True, text=True
  )
  return proc.stdout.strip() if proc.returncode == 0 else 'unknown'


def _load() -> dict[str, Any]:
  if os.path.exists(JSON):
    with open(JSON) as f:
      return json.load(f)
  return {'results': {}}


def _save(saved: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(JSON), exist_ok=True)
  with open(JSON, 'w') as f:
    json.dump(saved, f, indent=1, sort_keys=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--targets', default=','.join(DEFAULT_TARGETS), help='comma-separated')
  parser.add_argument('--cases', default='module,train', help='module, train (comma-separated)')
  parser.add_argument('--batch', type=int, default=32, help='per chip')
  parser.add_argument(
    '--fit-batch', type=int, default=64, help='second per-chip batch of the memory fit; 0: none'
  )
  parser.add_argument(
    '--networks', default='', help='only these of gsa, conv, gsa_resnet50, resnet50 (default: all)'
  )
  parser.add_argument('--pod', default='', help='a multi-host slice for the GSA-ResNet-50 step')
  parser.add_argument('--tables', action='store_true', help='print the saved JSON and exit')
  args = parser.parse_args()

  saved = _load()
  if args.tables:
    print(tables(saved))
    return
  cases = [c for c in args.cases.split(',') if c]
  kinds = {'module': ('gsa', 'conv'), 'train': ('gsa_resnet50', 'resnet50')}
  saved['machine'] = common.machine()
  saved['jax'] = jax.__version__
  saved['revision'] = _revision()
  for name in [t for t in args.targets.split(',') if t]:
    target = aot.get_target(name)
    for case in cases:
      for kind in kinds[case]:
        if args.networks and kind not in args.networks.split(','):
          continue
        print(f'compiling {case}/{kind} for {target.name} ...', flush=True)
        result = measure(target, case, kind, args.batch, args.fit_batch or None)
        result['revision'] = saved['revision']
        saved['results'].setdefault(target.name, {})[f'{case}/{kind}'] = result
        _save(saved)
  if args.pod:
    target = aot.get_target(args.pod)
    print(f'compiling the gsa_resnet50 step for {target.name} ...', flush=True)
    result = measure(target, 'train', 'gsa_resnet50', args.batch, None)
    result['revision'] = saved['revision']
    saved['results'].setdefault(target.name, {})['pod'] = result
    _save(saved)
  print(tables(saved))


if __name__ == '__main__':
  main()
