"""HBM traffic of the GSA module with the einsum ops and with the Pallas kernels.

Deviceless ahead-of-time compiles, on this machine's CPU, for one TPU v5e chip (of a
``v5e:2x2`` topology) and one H100 (the package's target description), of the GSA
module at GSA-ResNet-50's first stage (``layers.GSA(64, num_heads=8)``, key_features 32,
batch 32 per chip, 56x56x64, bfloat16, forward + backward: gradients of the parameters
and the input, train-mode BatchNorm), with ``implementation='xla'`` and with the kernels
(``implementation=None``, which takes them when compiling for these platforms), against
the 3x3 convolution (64 -> 64, no bias) + BatchNorm the module replaces.

Per case: the HBM traffic, estimated as the sum over the top-level HLO instructions of
operand + result bytes (parameters, constants, tuples, get-tuple-element and bitcasts
excluded; an asynchronous ``*-start`` counts its operands and its destination, its
``*-done`` nothing), except that a Pallas custom call counts what its programs copy in and
out according to the kernels' grid and block specs
(:func:`gsa_flax.kernels.layout.grid_traffic`), since XLA cannot see inside it; the
temporaries of ``compiled.memory_analysis()``; on TPU, libtpu's ``cost_analysis()``
'bytes accessed' (which counts a custom call by its operands and results only).

  python -m benchmarks.kernels                  # both platforms, markdown on stdout
  python -m benchmarks.kernels --platform tpu   # one of them
"""

from __future__ import annotations

import argparse
import os
import re
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from gsa_flax.kernels import layout  # noqa: E402
from gsa_flax.layers import GSA  # noqa: E402
from gsa_flax.tools import aot  # noqa: E402

# ------------------------------------------------------------------------ HLO traffic estimate

_BYTES = {
  'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4,
  'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
  'f8e4m3fn': 1, 'f8e5m2': 1,
}  # fmt: skip
_ARRAY = re.compile(r'\b([a-z]+[0-9a-z]*)\[([\d,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%(\S+) = (.*?) ([\w\-]+)\((.*)$')
_NOT_COUNTED = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'after-all'}
_PALLAS_TARGETS = ('tpu_custom_call', 'mosaic_gpu', '__gpu$xla.gpu.triton')


def _arrays(shape: str) -> list[tuple[str, int]]:
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _BYTES:
      n = 1
      for d in filter(None, dims.split(',')):
        n *= int(d)
      out.append((dtype, n * _BYTES[dtype]))
  return out


def hlo_traffic(hlo: str) -> tuple[int, int]:
  """Operand + result bytes of the entry computation's instructions, Pallas calls aside.

  Returns:
    ``(bytes, pallas_calls)``: the XLA traffic and the number of Pallas custom calls
    (left out of ``bytes``).
  """
  lines = hlo.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('ENTRY'))
  sizes, total, pallas = {}, 0, 0
  for line in lines[start + 1 :]:
    if line.startswith('}'):
      break
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    arrays = _arrays(shape)
    sizes[name] = sum(b for _, b in arrays)
    if opcode in _NOT_COUNTED or opcode.endswith('-done'):
      continue
    depth, end = 1, 0
    while depth and end < len(rest):
      depth += {'(': 1, ')': -1}.get(rest[end], 0)
      end += 1
    operands = re.findall(r'%([\w.\-]+)', rest[: end - 1])
    if opcode == 'custom-call' and any(t in rest for t in _PALLAS_TARGETS):
      pallas += 1
      continue
    if opcode.endswith('-start'):
      result = arrays[1][1] if len(arrays) > 1 else 0  # the destination of the copy
    elif opcode == 'custom-call':
      result = sum(b for dtype, b in arrays if dtype not in ('s8', 'u8'))  # no workspace
    else:
      result = sizes[name]
    total += result + sum(sizes.get(op, 0) for op in operands)
  return total, pallas


# ------------------------------------------------------------------------------------ cases


class ConvBN(nn.Module):
  """The 3x3 convolution + BatchNorm that a GSA module replaces in a ResNet block."""

  features: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Conv(self.features, (3, 3), padding='SAME', use_bias=False, dtype=jnp.bfloat16)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=jnp.bfloat16)(x)


def device(platform: str):
  """One chip of a TPU v5e 2x2 slice, or one H100."""
  if platform == 'tpu':
    return topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2').devices[0]
  return topologies.get_topology_desc(
    platform='cuda', topology_name='h100', topology='1x1x1', target_config=aot.h100_target_config()
  ).devices[0]


def measure(module: nn.Module, shape, dev, backend: str) -> dict:
  """Compiles forward + backward of ``module`` for ``dev``; traffic, temporaries, cost."""
  sharding = jax.sharding.SingleDeviceSharding(dev)
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)
  small = jnp.zeros((1, *shape[1:]), jnp.bfloat16)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), small, train=False))
  variables = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), variables
  )
  params = variables['params']
  state = {k: v for k, v in variables.items() if k != 'params'}

  def loss(params, state, x):
    y, updates = module.apply({'params': params, **state}, x, train=True, mutable=list(state))
    return jnp.sum(jnp.square(y.astype(jnp.float32))), updates

  step = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)
  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(params, state, x).compile()
  compile_s = time.perf_counter() - t0
  xla_bytes, calls = hlo_traffic(compiled.as_text())
  kernel_bytes = 0
  if calls:
    kernel_bytes = layout.grid_traffic(jax.make_jaxpr(step)(params, state, x))[backend]
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  return {
    'traffic': xla_bytes + kernel_bytes,
    'kernel_traffic': kernel_bytes,
    'pallas_calls': calls,
    'temp': compiled.memory_analysis().temp_size_in_bytes,
    'bytes_accessed': float(cost.get('bytes accessed', 0.0)) if cost else None,
    'compile_s': compile_s,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--platform', choices=['tpu', 'h100', 'all'], default='all')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--size', type=int, default=56)
  parser.add_argument('--channels', type=int, default=64)
  args = parser.parse_args()
  shape = (args.batch, args.size, args.size, args.channels)
  cases = {
    'conv 3x3 + BN': ConvBN(args.channels),
    "GSA, implementation='xla'": GSA(
      args.channels, num_heads=8, key_features=32, dtype=jnp.bfloat16, implementation='xla'
    ),
    'GSA, Pallas kernels': GSA(args.channels, num_heads=8, key_features=32, dtype=jnp.bfloat16),
  }
  platforms = ['tpu', 'h100'] if args.platform == 'all' else [args.platform]
  print(
    f'GSA module vs 3x3 conv + BN, forward + backward, batch {args.batch} per chip, '
    f'{args.size}x{args.size}x{args.channels}, bfloat16 (deviceless AOT compiles).\n'
  )
  print(
    '| platform | case | HBM traffic (GB) | vs conv | of which kernels (GB) | Pallas calls '
    '| temporaries (MiB) | XLA bytes accessed (GB) | compile (s) |'
  )
  print('|---|---|---:|---:|---:|---:|---:|---:|---:|')
  for platform in platforms:
    dev = device(platform)
    backend = 'mosaic' if platform == 'tpu' else 'triton'
    results = {name: measure(module, shape, dev, backend) for name, module in cases.items()}
    conv = results['conv 3x3 + BN']['traffic']
    label = 'TPU v5e' if platform == 'tpu' else 'H100'
    for name, r in results.items():
      accessed = '-' if r['bytes_accessed'] is None else f'{r["bytes_accessed"] / 1e9:.3f}'
      print(
        f'| {label} | {name} | {r["traffic"] / 1e9:.3f} | {r["traffic"] / conv:.2f}x '
        f'| {r["kernel_traffic"] / 1e9:.3f} | {r["pallas_calls"]} | {r["temp"] / 2**20:.1f} '
        f'| {accessed} | {r["compile_s"]:.1f} |'
      )


if __name__ == '__main__':
  main()
