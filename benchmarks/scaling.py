"""Scaling with resolution: the GSA module, plain global self-attention and a 3x3 conv.

Forward + backward (gradients of parameters and input) of each layer at square maps from
16x16 up, same channels in and out, float32, in a fresh process per case. Memory is XLA's
compiled plan (arguments + outputs + temporaries), read before running, so a case whose
plan exceeds ``--mem-budget-gib`` is reported as out of memory without being run (full
attention materialises ``heads x N x N`` weights; GSA never does). The growth exponent is
fitted on log(time or memory) against log(pixels) over the sizes >= ``--fit-from``.

  python -m benchmarks.scaling                  # ~6 min; writes the JSON and the plot
  python -m benchmarks.scaling --replot         # table and plot again from the saved JSON
  python -m benchmarks.scaling --batch 8 --sizes 16 32 64 128
  python -m benchmarks.scaling --smoke          # 16 and 24 only; writes nothing under docs/
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile

from benchmarks import common
from gsa_flax import files

LAYERS = ('gsa', 'full_attention', 'conv3x3')
PLOT = os.path.join(common.REPO, 'docs', 'benchmarks', 'scaling.png')


def _layer(kind: str, channels: int, heads: int):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from gsa_flax.model.layers import GSA

  class FullAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V over all pixels, multi-head, same projection as GSA."""

    @nn.compact
    def __call__(self, x, *, train):
      b, h, w, _ = x.shape
      dk = channels // 2 // heads
      qkv = nn.Dense(channels * 2, use_bias=False)(x).reshape(b, h * w, heads, -1)
      q, k, v = jnp.split(qkv, [dk, 2 * dk], axis=-1)
      logits = jnp.einsum('bqnd,bknd->bnqk', q, k) * dk**-0.5
      out = jnp.einsum('bnqk,bkne->bqne', jax.nn.softmax(logits, axis=-1), v)
      return out.reshape(b, h, w, channels)

  class Conv(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
      return nn.Conv(channels, (3, 3), use_bias=False)(x)

  if kind == 'gsa':
    return GSA(channels, num_heads=heads)
  return FullAttention() if kind == 'full_attention' else Conv()


def run_case(args: argparse.Namespace) -> None:
  """One (layer, size) case: compile, check the memory plan, time; prints a JSON line."""
  import jax

  kind, size = args.case.split(',')
  size = int(size)
  module = _layer(kind, args.channels, args.heads)
  x = jax.random.normal(jax.random.key(0), (args.batch, size, size, args.channels))
  compiled, params = common.compile_fwd_bwd(module, x)
  result = {
    'layer': kind,
    'size': size,
    'peak_bytes': common.xla_peak_bytes(compiled),
    'flops': common.xla_flops(compiled),
    'bytes_accessed': common.xla_bytes(compiled),
  }
  if result['peak_bytes'] > args.mem_budget_gib * 2**30:
    result['oom'] = True
  else:
    iters = args.iters if result['flops'] < 2e10 else max(1, args.iters // 2)
    result.update(common.time_fn(lambda: jax.block_until_ready(compiled(params, x)), iters=iters))
  print(json.dumps(result))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--sizes', type=int, nargs='+', default=[16, 24, 32, 48, 64, 96, 128, 192, 256]
  )
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--channels', type=int, default=64)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--fit-from', type=int, default=48)
  parser.add_argument(
    '--mem-budget-gib', type=float, default=16.0, help='plans above this are reported as OOM'
  )
  parser.add_argument('--plot', default=PLOT)
  parser.add_argument(
    '--json', default=os.path.join(common.REPO, 'docs', 'benchmarks', 'scaling.json')
  )
  parser.add_argument(
    '--replot', action='store_true', help='redraw the table and plot from --json, no runs'
  )
  parser.add_argument(
    '--smoke', action='store_true', help='sizes 16 and 24, one step; JSON and plot to a temp dir'
  )
  parser.add_argument('--case', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:
    return run_case(args)
  if args.smoke:
    out = tempfile.mkdtemp(prefix='scaling-smoke-')
    args.sizes, args.iters, args.fit_from = [16, 24], 1, 16
    args.json, args.plot = os.path.join(out, 'scaling.json'), os.path.join(out, 'scaling.png')
  if args.replot:
    with open(args.json) as f:
      saved = json.load(f)
    for key in ('batch', 'channels', 'heads', 'mem_budget_gib', 'fit_from'):
      setattr(args, key, saved['args'][key])
    print_table(args, saved['results'], saved['matmul_flops'], saved['bandwidth'])
    return plot(args, saved['results'])

  print(f'# scaling; {common.machine()}; load {common.loadavg():.1f}', flush=True)
  flags = [
    f'--{k.replace("_", "-")}={getattr(args, k)}'
    for k in ('batch', 'channels', 'heads', 'iters', 'mem_budget_gib')
  ]
  results = []
  for layer in LAYERS:
    for size in args.sizes:
      r = common.run_isolated('benchmarks.scaling', [f'--case={layer},{size}', *flags])
      r.setdefault('layer', layer)
      r.setdefault('size', size)
      print(f'#   {json.dumps(r)}', flush=True)
      results.append(r)
      if r.get('oom') or 'error' in r:
        break  # larger sizes only need more
  rate = common.matmul_peak_flops()
  bw = common.memory_bandwidth()
  saved = {**vars(args), 'plot': common.repo_relative(args.plot)}
  saved['json'] = common.repo_relative(args.json)
  summary = {'args': saved, 'matmul_flops': rate, 'bandwidth': bw, 'results': results}
  files.write_atomically(args.json, json.dumps(summary))
  print_table(args, results, rate, bw)
  plot(args, results)


def _fits(args, results, layer):
  ok = [
    r for r in results if r['layer'] == layer and 'median_s' in r and r['size'] >= args.fit_from
  ]
  if len(ok) < 2:
    return None, None
  pixels = [r['size'] ** 2 for r in ok]
  return (
    common.fit_exponent(pixels, [r['median_s'] for r in ok]),
    common.fit_exponent(pixels, [r['peak_bytes'] for r in ok]),
  )


def print_table(args, results, rate, bw) -> None:
  """Markdown table of every case, then the fitted exponents."""
  print(
    f'\nbatch {args.batch}, {args.channels} channels, {args.heads} heads, float32, forward + '
    f'backward; matmul rate {rate / 1e9:.0f} GFLOP/s, bandwidth {bw / 1e9:.1f} GB/s; '
    f'memory budget {args.mem_budget_gib:g} GiB.\n'
  )
  print('| layer | size | pixels | step ms | XLA plan MiB | GFLOP | GFLOP/s | FLOP/byte | load |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
  for r in results:
    if 'error' in r:
      print(f'| {r["layer"]} | {r["size"]} | {r["size"] ** 2} | error: {r["error"]} | | | | | |')
      continue
    intensity = r['flops'] / max(r['bytes_accessed'], 1)
    plan = f'{r["peak_bytes"] / 2**20:,.0f}'
    if r.get('oom'):
      print(
        f'| {r["layer"]} | {r["size"]} | {r["size"] ** 2} | **OOM** (plan > budget) | {plan} '
        f'| {r["flops"] / 1e9:.1f} | - | {intensity:.1f} | |'
      )
      continue
    print(
      f'| {r["layer"]} | {r["size"]} | {r["size"] ** 2} | {r["median_s"] * 1e3:.1f} | {plan} '
      f'| {r["flops"] / 1e9:.2f} | {r["flops"] / r["median_s"] / 1e9:.1f} | {intensity:.1f} '
      f'| {r["load"]:.1f} |'
    )
  print(f'\nGrowth exponents in pixels N (fit over sizes >= {args.fit_from}):\n')
  print('| layer | time ~ N^a | memory ~ N^b | largest size run | first OOM |')
  print('|---|---:|---:|---:|---:|')
  for layer in LAYERS:
    a, b = _fits(args, results, layer)
    ran = [r['size'] for r in results if r['layer'] == layer and 'median_s' in r]
    oom = [r['size'] for r in results if r['layer'] == layer and r.get('oom')]
    fmt = lambda v: '-' if v is None else f'{v:.2f}'
    print(
      f'| {layer} | {fmt(a)} | {fmt(b)} | {max(ran) if ran else "-"} '
      f'| {oom[0] if oom else "none"} |'
    )


def plot(args, results) -> None:
  """Log-log time and memory against pixels; OOM cases marked at the budget line."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
  for layer, color in zip(LAYERS, ('C0', 'C3', 'C2'), strict=True):
    ran = [r for r in results if r['layer'] == layer and 'median_s' in r]
    planned = [r for r in results if r['layer'] == layer and 'peak_bytes' in r]
    a, b = _fits(args, results, layer)
    label = layer + ('' if a is None else f' (time ~N^{a:.2f})')
    ax_t.loglog(
      [r['size'] ** 2 for r in ran], [r['median_s'] for r in ran], 'o-', c=color, label=label
    )
    ax_m.loglog(
      [r['size'] ** 2 for r in planned],
      [r['peak_bytes'] / 2**20 for r in planned],
      'o-',
      c=color,
      label=layer + ('' if b is None else f' (mem ~N^{b:.2f})'),
    )
    for r in planned:
      if r.get('oom'):
        ax_m.plot(r['size'] ** 2, r['peak_bytes'] / 2**20, 'x', c=color, ms=12, mew=3)
        ax_m.annotate(
          f'OOM at {r["size"]}x{r["size"]}',
          (r['size'] ** 2, r['peak_bytes'] / 2**20),
          textcoords='offset points',
          xytext=(-120, -4),
          color=color,
        )
  ax_m.axhline(args.mem_budget_gib * 1024, ls='--', c='k', lw=1, label='memory budget')
  ax_t.set(xlabel='pixels N = H*W', ylabel='forward+backward time (s)', title='time')
  ax_m.set(xlabel='pixels N = H*W', ylabel='XLA planned memory (MiB)', title='memory')
  for ax in (ax_t, ax_m):
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(
    f'GSA vs full attention vs 3x3 conv, batch {args.batch}, {args.channels} channels (CPU)'
  )
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.plot), exist_ok=True)
  figure = io.BytesIO()
  fig.savefig(figure, format=os.path.splitext(args.plot)[1].lstrip('.') or 'png', dpi=110)
  files.write_atomically(args.plot, figure.getvalue())
  print(f'\nplot: {common.repo_relative(args.plot)}')


if __name__ == '__main__':
  main()
