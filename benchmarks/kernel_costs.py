"""Per kernel of the GSA module: executed against useful FLOPs, MXU padding, HBM bytes, and
on the H100 the registers, spills and occupancy of the compiled kernels.

For GSA-ResNet-50's four stage geometries (8 heads, ``d_k = d_out / 2``; 56x56x64,
28x28x128, 14x14x256, 7x7x512, bfloat16, training mode), the fused module's forward +
backward is traced (``jax.make_jaxpr``, nothing compiled) with the Mosaic (TPU) and the
Triton (GPU) kernels; per kernel call (forward and backward of the column and row steps)
:func:`gsa_flax.model.kernels.flops.inventory` gives its dots and
:func:`gsa_flax.model.kernels.layout.call_traffic` its HBM bytes, per image.

For the H100 the GSA layer is compiled at each stage geometry, 32 per chip, deviceless,
in a process that dumps the compiler's output (``XLA_FLAGS=--xla_dump_to``): each Triton
kernel's PTX goes through ``ptxas -v -arch=sm_90a`` (registers per thread, spill bytes),
and the launch (threads, dynamic shared memory) is read from the dumped thunk sequence.
Theoretical occupancy on an sm_90 SM (65,536 registers, 64 warps, 32 blocks, 228 KiB of
shared memory, 1 KiB reserved per block; registers allocated per warp in units of 256):

    blocks = min(floor(floor(65536 / round_up(32 * regs, 256)) / warps_per_block),
                 floor(233472 / (smem + 1024)), floor(64 / warps_per_block), 32)
    occupancy = blocks * warps_per_block / 64

  python -m benchmarks.kernel_costs            # ~1-2 min; writes docs/benchmarks/kernel_costs.json
  python -m benchmarks.kernel_costs --smoke    # one tiny geometry, nothing written
"""

from __future__ import annotations

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from gsa_flax import files  # noqa: E402
from gsa_flax.model.kernels import flops, gsa, layout  # noqa: E402

HEADS = 8
STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))  # (size, d_out); d_k = d_out / 2
SMOKE_STAGES = ((8, 16),)
JSON = os.path.join(common.REPO, 'docs', 'benchmarks', 'kernel_costs.json')

# sm_90 (H100) per SM.
REGISTERS, MAX_WARPS, MAX_BLOCKS = 65536, 64, 32
SHARED, SHARED_RESERVED, REGISTER_UNIT = 233472, 1024, 256


def label(call: layout.KernelCall) -> str:
  return f'{"column" if call.step.axis == 1 else "row"} {"bwd" if call.backward else "fwd"}'


def trace(backend: str, size: int, d_out: int, batch: int = 1):
  """The module's forward + backward with ``backend``'s kernels, traced."""
  dk = d_out // 2
  qkv = jax.ShapeDtypeStruct((batch, size, size, 2 * dk + d_out), jnp.bfloat16)
  rel = jax.ShapeDtypeStruct((2 * size - 1, HEADS, dk // HEADS), jnp.float32)
  vec = jax.ShapeDtypeStruct((d_out,), jnp.float32)
  config = gsa.Config(HEADS, dk, train=True, backend=backend)

  def fwd_bwd(qkv, *rest):
    out, pullback = jax.vjp(lambda *a: gsa.gsa_attention(*a, config)[0], qkv, *rest)
    return pullback(out)

  return jax.make_jaxpr(fwd_bwd)(qkv, rel, rel, vec, vec, vec, vec)


def flop_rows(size: int, d_out: int) -> list[dict[str, Any]]:
  """Per kernel call and backend, per image: FLOPs (useful, executed, padded, on tensor
  and CUDA cores) and HBM bytes."""
  rows = []
  for backend in ('mosaic', 'triton'):
    jaxpr = trace(backend, size, d_out)
    moved = {name: b for name, _, b in layout.call_traffic(jaxpr)}
    for name, dots in flops.inventory(jaxpr):
      call = layout.KernelCall.parse(name)
      rows.append(
        {
          'stage': f'{size}x{size}x{d_out}',
          'backend': backend,
          'kernel': label(call),
          'name': name,
          'useful': flops.useful_flops(call, 1),
          'executed': flops.executed_flops(dots),
          'padded_128': flops.padded_flops(dots, 128) if backend == 'mosaic' else None,
          'padded_256': flops.padded_flops(dots, 256) if backend == 'mosaic' else None,
          'tensor_core': flops.executed_flops(dots, flops.MATRIX) if backend == 'triton' else None,
          'cuda_core': flops.executed_flops(dots, flops.VECTOR) if backend == 'triton' else None,
          'hbm_bytes': moved[name],
        }
      )
  return rows


# ------------------------------------------------------------------------------ H100


def compile_for_h100(size: int, d_out: int, batch: int) -> None:
  """Compiles the GSA layer's forward + backward for the H100 (run with XLA_FLAGS set)."""
  from gsa_flax.model.layers import GSA
  from gsa_flax.tools.sizing import aot

  target = aot.get_target('h100')
  module = GSA(d_out, num_heads=HEADS, key_features=d_out // 2, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, size, size, d_out), jnp.bfloat16)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
  variables = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=target.sharding()), variables
  )
  x = jax.ShapeDtypeStruct(
    (batch, size, size, d_out), jnp.bfloat16, sharding=target.sharding(aot.DATA_AXIS)
  )

  def loss(variables, x):
    out, _ = module.apply(variables, x, train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.square(out.astype(jnp.float32)))

  jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).compile()


def ptxas() -> str:
  """The CUDA plugin's ptxas (the one XLA uses), else the one on the PATH."""
  import nvidia.cuda_nvcc  # the CUDA plugin's compiler wheel

  bundled = os.path.join(list(nvidia.cuda_nvcc.__path__)[0], 'bin', 'ptxas')
  found = bundled if os.path.exists(bundled) else shutil.which('ptxas')
  if not found:
    raise SystemExit('ptxas not found: install jax[cuda12] (its nvidia-cuda-nvcc wheel).')
  return found


def occupancy(registers: int, threads: int, shared: int) -> dict[str, Any]:
  warps = -(-threads // 32)
  per_warp = layout.round_up(32 * registers, REGISTER_UNIT)
  by = {
    'registers': REGISTERS // per_warp // warps,
    'shared memory': SHARED // (shared + SHARED_RESERVED),
    'warps': MAX_WARPS // warps,
    'blocks': MAX_BLOCKS,
  }
  blocks = min(by.values())
  limit = min(by, key=by.get)
  return {'blocks_per_sm': blocks, 'warps_per_sm': blocks * warps, 'limited_by': limit,
          'occupancy': blocks * warps / MAX_WARPS}  # fmt: skip


def h100_kernels(size: int, d_out: int, batch: int) -> list[dict[str, Any]]:
  """Registers, spills, shared memory and occupancy of each Triton kernel of the layer."""
  with tempfile.TemporaryDirectory() as dump:
    env = dict(os.environ, XLA_FLAGS=f'--xla_dump_to={dump}')
    subprocess.run(
      [sys.executable, '-m', 'benchmarks.kernel_costs', '--compile', f'{size},{d_out},{batch}'],
      cwd=common.REPO,
      env=env,
      check=True,
    )
    launches = {}
    for path in glob.glob(os.path.join(dump, '*thunk_sequence.txt')):
      with open(path) as f:
        for line in f:
          m = re.search(
            r'(gsa_axial\w+) grid: \[([^\]]*)\] threads: \[(\d+)[^\]]*\]\s+shared_memory: (\d+)',
            line,
          )
          if m:
            launches[m.group(1)] = (m.group(2), int(m.group(3)), int(m.group(4)))
    rows = []
    tool = ptxas()
    for path in sorted(glob.glob(os.path.join(dump, '*.ptx'))):
      with open(path) as f:
        entry = re.search(r'\.entry (gsa_axial\w+)\(', f.read())
      if not entry:
        continue
      name = entry.group(1)
      out = subprocess.run(
        [tool, '-v', '-arch=sm_90a', path, '-o', os.devnull], capture_output=True, text=True
      ).stderr
      registers = int(re.search(r'Used (\d+) registers', out).group(1))
      spills = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', out)
      stack = re.search(r'(\d+) bytes stack frame', out)
      grid, threads, shared = launches[name]
      rows.append(
        {
          'name': name,
          'kernel': label(layout.KernelCall.parse(name)),
          'grid': grid,
          'threads': threads,
          'registers': registers,
          'spill_stores': int(spills.group(1)),
          'spill_loads': int(spills.group(2)),
          'stack_frame': int(stack.group(1)),
          'shared_memory': shared,
          **occupancy(registers, threads, shared),
        }
      )
  return rows


# ------------------------------------------------------------------------------ tables


def flop_table(rows: list[dict[str, Any]], backend: str) -> str:
  g = 1e9
  if backend == 'mosaic':
    head = (
      '| stage | kernel | useful GFLOP | executed GFLOP | executed / useful '
      '| MXU-padded GFLOP (128) | MXU occupancy | padded (256) | HBM MB |\n'
      '|---|---|---:|---:|---:|---:|---:|---:|---:|'
    )
  else:
    head = (
      '| stage | kernel | useful GFLOP | executed GFLOP | executed / useful '
      '| tensor-core GFLOP | CUDA-core GFLOP | HBM MB |\n|---|---|---:|---:|---:|---:|---:|---:|'
    )
  lines = [head]
  for r in rows:
    if r['backend'] != backend:
      continue
    cells = [r['stage'], r['kernel'], f'{r["useful"] / g:.4f}', f'{r["executed"] / g:.4f}',
             f'{r["executed"] / r["useful"]:.1f}x']  # fmt: skip
    if backend == 'mosaic':
      cells += [f'{r["padded_128"] / g:.4f}', f'{100 * r["executed"] / r["padded_128"]:.0f}%',
                f'{r["padded_256"] / g:.4f}']  # fmt: skip
    else:
      cells += [f'{r["tensor_core"] / g:.4f}', f'{r["cuda_core"] / g:.4f}']
    cells.append(f'{r["hbm_bytes"] / 1e6:.2f}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def register_table(rows: list[dict[str, Any]]) -> str:
  lines = [
    '| stage | kernel | threads | registers | spill stores / loads B | stack B '
    '| shared memory KiB | blocks / SM | warps / SM | occupancy | limited by |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|',
  ]
  for r in rows:
    lines.append(
      f'| {r["stage"]} | {r["kernel"]} | {r["threads"]} | {r["registers"]} '
      f'| {r["spill_stores"]} / {r["spill_loads"]} | {r["stack_frame"]} '
      f'| {r["shared_memory"] / 1024:.0f} | {r["blocks_per_sm"]} | {r["warps_per_sm"]} '
      f'| {100 * r["occupancy"]:.1f}% | {r["limited_by"]} |'
    )
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--smoke', action='store_true', help='one tiny geometry, no JSON')
  parser.add_argument('--batch', type=int, default=32, help='per chip, for the H100 compile')
  parser.add_argument('--json', default=JSON, help="where to write the results ('': nowhere)")
  parser.add_argument('--compile', help=argparse.SUPPRESS)  # size,d_out,batch: the child
  args = parser.parse_args()
  if args.compile:
    compile_for_h100(*(int(v) for v in args.compile.split(',')))
    return
  stages = SMOKE_STAGES if args.smoke else STAGES
  batch = 2 if args.smoke else args.batch
  flop_results, registers = [], []
  for size, d_out in stages:
    flop_results += flop_rows(size, d_out)
    for r in h100_kernels(size, d_out, batch):
      registers.append({'stage': f'{size}x{size}x{d_out}', **r})
  print("Per image, bfloat16, training mode; FLOPs from the kernels' traced dots.\n")
  print('TPU (Mosaic)\n\n' + flop_table(flop_results, 'mosaic') + '\n')
  print('GPU (Triton)\n\n' + flop_table(flop_results, 'triton') + '\n')
  print(f'H100 (sm_90a), compiled at {batch} per chip\n\n' + register_table(registers))
  if args.json and not args.smoke:
    saved = {
      'machine': common.machine(),
      'jax': jax.__version__,
      'revision': common.resolve_rev('HEAD'),
      'batch_per_chip': batch,
      'flops': flop_results,
      'h100_kernels': registers,
    }
    files.write_atomically(args.json, json.dumps(saved, indent=1, sort_keys=True))


if __name__ == '__main__':
  main()
