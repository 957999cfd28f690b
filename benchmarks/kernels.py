"""HBM traffic of the GSA module with the einsum ops and with the Pallas kernels, against
the 3x3 convolution + BatchNorm it replaces.

Deviceless ahead-of-time compiles, on this machine's CPU, for a TPU v5e slice (``v5e:2x2``,
the batch split over its 4 chips) and one H100 (the package's target description), of the
GSA module at GSA-ResNet-50's first stage (``layers.GSA(64, num_heads=8)``, key_features
32, 32 examples per chip, 56x56x64, bfloat16, forward + backward: gradients of the
parameters and the input, loss = sum of squares in float32, train-mode BatchNorm) with
``implementation='xla'`` (einsum ops) and with the kernels (``implementation=None``, which
takes them when compiling for these platforms), against the 3x3 convolution (64 -> 64, no
bias) + BatchNorm the module replaces.

Everything is read per chip by :func:`gsa_flax.tools.sizing.aot.analyze`, the estimator the
accelerator sizing uses (``python -m gsa_flax.tools.summary --target=...``): HBM traffic =
operand + result bytes of every top-level instruction in HBM (tile padding included,
buffers the compiler keeps on chip excluded), a Pallas kernel counted from its grid and
block specs (:func:`gsa_flax.model.kernels.costs.custom_call_costs`); the temporaries of XLA's
memory plan; FLOPs (libtpu's count, the kernels' own estimates included, on TPU; dots,
convolutions and the kernels' estimates on the H100).

  python -m benchmarks.kernels                      # both platforms, markdown on stdout
  python -m benchmarks.kernels --targets=h100       # one of them
"""

from __future__ import annotations

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gsa_flax.model.kernels import layout  # noqa: E402
from gsa_flax.model.layers import GSA  # noqa: E402
from gsa_flax.tools.sizing import aot, traffic  # noqa: E402

# GSA-ResNet-50's first stage.
CHANNELS, HEADS, KEY_FEATURES, SIZE = 64, 8, 32, 56
KINDS = {
  'conv': '3x3 conv + BN',
  'gsa_xla': "GSA, implementation='xla' (einsums)",
  'gsa': 'GSA, Pallas kernels',
}
GB, MIB = 1e9, 2**20


class ConvBN(nn.Module):
  """The 3x3 convolution + BatchNorm that a GSA module replaces in a ResNet block."""

  features: int
  dtype: Any = jnp.bfloat16

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Conv(self.features, (3, 3), padding='SAME', use_bias=False, dtype=self.dtype)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)


def layer(kind: str, *, order: str = 'auto') -> nn.Module:
  """``'conv'``, ``'gsa_xla'`` (einsum ops) or ``'gsa'`` (the kernels where they compile)."""
  if kind == 'conv':
    return ConvBN(CHANNELS)
  implementation = 'xla' if kind == 'gsa_xla' else None
  return GSA(
    CHANNELS,
    num_heads=HEADS,
    key_features=KEY_FEATURES,
    dtype=jnp.bfloat16,
    order=order,
    implementation=implementation,
  )


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def _variables(module: nn.Module) -> Any:
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, CHANNELS), jnp.bfloat16)
  return jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)


def compile_layer(target: aot.Target, kind: str, batch_per_chip: int) -> jax.stages.Compiled:
  """Forward + backward (parameters and input) of one layer in training mode, compiled for
  ``target`` with the batch split over its chips."""
  module = layer(kind)
  variables = _variables(module)
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


@functools.cache
def model_flops_per_example(kind: str) -> float:
  """3x the dot/convolution FLOPs of one example's forward pass, the attention in its
  minimal-FLOP order (``order='logits'``, einsum ops), compiled for this machine's CPU."""
  module = layer('gsa_xla' if kind.startswith('gsa') else kind, order='logits')
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, CHANNELS), jnp.bfloat16, sharding=cpu)
  variables = _abstract(_variables(module), cpu)
  fwd = jax.jit(lambda v, x: module.apply(v, x, train=False))
  return 3 * traffic.hlo_costs(fwd.lower(variables, x).compile().as_text())['matmul_flops']


def kernel_traffic(compiled: jax.stages.Compiled) -> float:
  """The part of the HBM-traffic estimate that the GSA kernels' calls move."""
  return sum(
    r.hbm_bytes
    for r in traffic.traffic_by_instruction(compiled.as_text())
    if r.opcode == 'custom-call' and layout.KernelCall.parse(r.name + r.op_name)
  )


def measure(target: aot.Target, kind: str, batch_per_chip: int) -> dict[str, Any]:
  """Compiles one layer for ``target``: its analysis, roofline and kernel traffic."""
  start = time.perf_counter()
  compiled = compile_layer(target, kind, batch_per_chip)
  compile_s = time.perf_counter() - start
  analysis = aot.analyze(compiled)
  model_flops = model_flops_per_example(kind)
  roof = aot.roofline(
    analysis, target, batch_per_chip=batch_per_chip, model_flops_per_example=model_flops
  )
  return {
    'target': target.name,
    'case': 'module',
    'kind': kind,
    'batch_per_chip': batch_per_chip,
    'num_chips': target.num_chips,
    'num_hosts': target.num_hosts,
    'compile_s': compile_s,
    'analysis': dataclasses.asdict(analysis),
    'hbm_needed': analysis.hbm_needed,
    'hbm_capacity': target.chip.hbm_bytes,
    'kernel_traffic': kernel_traffic(compiled),
    'model_flops_per_example': model_flops,
    'roofline': dataclasses.asdict(roof),
  }


def table(results: list[dict[str, Any]]) -> str:
  """Markdown rows, one per (target, kind), with the ratio to the conv of the same target."""
  lines = [
    '| target | layer | HBM traffic GB | vs conv | of which kernels GB | temporaries MiB '
    '| GFLOPs | roofline us | compile s |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  conv = {r['target']: r['analysis']['hbm_bytes'] for r in results if r['kind'] == 'conv'}
  for r in results:
    a = r['analysis']
    ratio = f'{a["hbm_bytes"] / conv[r["target"]]:.2f}x' if r['target'] in conv else '-'
    lines.append(
      f'| {r["target"]} | {KINDS[r["kind"]]} | {a["hbm_bytes"] / GB:.3f} | {ratio} '
      f'| {r["kernel_traffic"] / GB:.3f} | {a["temp_bytes"] / MIB:.1f} | {a["flops"] / 1e9:.1f} '
      f'| {1e6 * r["roofline"]["step_seconds"]:.0f} ({r["roofline"]["bound"]}) '
      f'| {r["compile_s"]:.1f} |'
    )
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--targets', default='tpu-v5e:2x2,h100', help='comma-separated')
  parser.add_argument('--batch', type=int, default=32, help='per chip')
  args = parser.parse_args()
  print(
    f'GSA module vs 3x3 conv + BN, forward + backward, {args.batch} per chip, '
    f'{SIZE}x{SIZE}x{CHANNELS}, bfloat16 (deviceless compiles; per chip).\n'
  )
  results = [
    measure(aot.get_target(name), kind, args.batch)
    for name in args.targets.split(',')
    if name
    for kind in KINDS
  ]
  print(table(results))


if __name__ == '__main__':
  main()
