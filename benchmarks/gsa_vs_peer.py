"""Our GSA layer against the public PyTorch peer (`gsa-pytorch`), forward + backward, CPU.

Both sides compute the same module: the peer's ``dim_key`` is per head and it uses the same
width for queries, keys and values, so ours is configured with ``key_features = features``
(``d = e = features / heads`` per head); its ``rel_pos_length=S`` gives ``2S - 1`` relative
offsets, our global default. Differences that remain, and how they are handled:

* the peer ends with a 1x1 output convolution (with bias) that the paper's module does not
  have: ``peer`` has it replaced by the identity (the same math as ours) and is the
  baseline of the ratio; ``peer+out`` is the module as shipped, for reference;
* the peer shares each position table over heads (``[2S-1, d]``) where ours has one per
  head (``[2S-1, heads, d]``): a parameter-count difference; the compute is the same;
* the peer's BatchNorm between the axial steps normalises ``d`` channels pooled over
  heads, ours each of the ``heads * d`` channels: the same cost.

Our rows: ``ours`` is ``GSA(order='auto')``; ``ours:logits`` and ``ours:values`` force the
contraction order of the positional steps (``GSA(order=...)``). ``--before=REV`` adds a row
``ours@REV``: the layer of git revision ``REV`` (default settings), checked out into a
temporary ``git worktree`` (removed at the end) and imported from there by its case
processes; only the package comes from ``REV``, this script and its method are the current
ones.

The peer rows need torch and gsa-pytorch (``pip install -r benchmarks/requirements.txt``);
without them they are left out and said so. torch runs with ``--threads`` (2) intra-op
threads and ``OMP_WAIT_POLICY=PASSIVE``: under load, OpenMP's default spin-waiting made the
peer 10-60x slower whenever another process held a core (3.3 s instead of 52 ms at 28x28),
which would flatter us. ``--omp-active`` restores the default.

Every case runs in a fresh process (so peaks are per case), cases are interleaved
(A, B, A, B, ...; the order reversed every repetition) so machine load hits both sides
alike, and each process reports the one-minute load average. Time: median of ``--iters``
steps after one warm-up step (the warm-up, which includes JAX's compile, is reported
separately). Memory beyond inputs and parameters: for JAX, XLA's compiled plan
(``memory_analysis``: outputs + temporaries); for torch, the growth of the process's peak
RSS (``ru_maxrss``) over the step.

  python -m benchmarks.gsa_vs_peer --reps 3 --json docs/benchmarks/gsa_vs_peer.json
  python -m benchmarks.gsa_vs_peer --before=8cdc911           # adds the layer at 8cdc911
  python -m benchmarks.gsa_vs_peer --impls ours:logits ours:values   # contraction order
  python -m benchmarks.gsa_vs_peer --smoke                    # 16x16, batch 2, one rep
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys

from benchmarks import common
from gsa_flax import files

IMPLS = ('ours', 'ours:logits', 'ours:values', 'peer', 'peer+out')
DEFAULT_IMPLS = ('ours', 'peer', 'peer+out')
PEER_IMPLS = ('peer', 'peer+out')


def peer_missing() -> str | None:
  """Which of the peer's packages is not installed, or None."""
  return next((m for m in ('torch', 'gsa_pytorch') if importlib.util.find_spec(m) is None), None)


def _run_jax(args: argparse.Namespace, impl: str, size: int) -> dict:
  if args.src:  # the package at the --before revision
    common.import_package_from(args.src)
  import jax

  from gsa_flax.model.layers import GSA

  c, h, b = args.channels, args.heads, args.batch
  order = impl.partition(':')[2]
  module = GSA(c, num_heads=h, key_features=c, **({'order': order} if order else {}))
  x = jax.random.normal(jax.random.key(0), (b, size, size, c))
  compiled, params = common.compile_fwd_bwd(module, x)
  mem = compiled.memory_analysis()
  t = common.time_fn(lambda: jax.block_until_ready(compiled(params, x)), iters=args.iters)
  return {
    **t,
    'flops': common.xla_flops(compiled),
    'bytes_accessed': common.xla_bytes(compiled),
    'peak_mib': (mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**20,
    'memory': 'XLA plan: outputs + temporaries',
  }


def _run_torch(args: argparse.Namespace, impl: str, size: int) -> dict:
  import torch
  from gsa_pytorch import GSA

  torch.set_num_threads(args.threads)
  c, h, b = args.channels, args.heads, args.batch
  torch.manual_seed(0)
  module = GSA(c, rel_pos_length=size, heads=h, dim_key=c // h)
  if impl == 'peer':
    module.to_out = torch.nn.Identity()
  x = torch.randn(b, c, size, size, requires_grad=True)

  def step():
    module.zero_grad(set_to_none=True)
    x.grad = None
    loss = (module(x) ** 2).sum()
    loss.backward()

  base = common.maxrss_mib()
  t = common.time_fn(step, iters=args.iters)
  flops = None
  try:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
      step()
    flops = float(counter.get_total_flops())
  except Exception:  # noqa: BLE001 - the counter is optional; time and memory still stand.
    pass
  return {
    **t,
    'flops': flops,
    'peak_mib': common.maxrss_mib() - base,
    'memory': 'ru_maxrss growth over the step',
  }


def run_case(args: argparse.Namespace) -> None:
  """One (impl, size) case in this process; prints one JSON line."""
  impl, size = args.case.split(',')
  size = int(size)
  load0 = common.loadavg()
  run = _run_jax if impl.startswith('ours') else _run_torch
  result = run(args, impl, size)
  result.update(impl=impl, size=size, load_before=load0)
  print(json.dumps(result))


def matmul_rates(args: argparse.Namespace) -> None:
  """Prints JAX's (and, if installed, torch's) float32 matmul rate in GFLOP/s as a JSON line."""
  n = 2048
  rates = {'jax_gflops': common.matmul_peak_flops(n) / 1e9}
  if peer_missing() is None:
    import torch

    torch.set_num_threads(args.threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = common.time_fn(lambda: a @ b, warmup=2, iters=5)
    rates['torch_gflops'] = 2 * n**3 / t['min_s'] / 1e9
  print(json.dumps({**rates, 'load': common.loadavg()}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[28, 56, 112])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--channels', type=int, default=64)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--reps', type=int, default=2, help='interleaved repetitions per case')
  parser.add_argument('--threads', type=int, default=2, help='torch intra-op threads')
  parser.add_argument('--impls', nargs='+', default=list(DEFAULT_IMPLS), choices=IMPLS)
  parser.add_argument(
    '--before', metavar='REV', help='add a row for the layer at this git revision'
  )
  parser.add_argument('--omp-active', action='store_true', help="torch: OpenMP's default wait")
  parser.add_argument('--json', help='also write all raw results to this file')
  parser.add_argument('--smoke', action='store_true', help='16x16, batch 2, 2 steps, one rep')
  parser.add_argument('--case', help=argparse.SUPPRESS)
  parser.add_argument('--src', help=argparse.SUPPRESS)
  parser.add_argument('--matmul', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:
    return run_case(args)
  if args.matmul:
    return matmul_rates(args)
  if args.smoke:
    args.sizes, args.batch, args.iters, args.reps = [16], 2, 2, 1

  if args.before:
    try:
      before = f'ours@{common.resolve_rev(args.before)}'
    except ValueError as e:
      parser.error(str(e))
  impls = list(args.impls)
  missing = peer_missing()
  if missing and any(i in PEER_IMPLS for i in impls):
    print(
      f'# {missing} is not installed: the peer rows are left out '
      '(pip install -r benchmarks/requirements.txt)',
      flush=True,
    )
    impls = [i for i in impls if i not in PEER_IMPLS]
  passthrough = [
    f'--{k}={getattr(args, k)}' for k in ('batch', 'channels', 'heads', 'iters', 'threads')
  ]
  print(f'# GSA forward+backward, ours vs gsa-pytorch; {common.machine()}', flush=True)
  print(f'# {" ".join(sys.argv)}', flush=True)
  torch_env = {'OMP_WAIT_POLICY': 'PASSIVE'}
  rates = common.run_isolated(
    'benchmarks.gsa_vs_peer', ['--matmul', *passthrough], env=None if args.omp_active else torch_env
  )
  print(f'# float32 matmul (2048^2): {json.dumps(rates)}', flush=True)
  src = {}  # impl -> the package root its case processes import
  with contextlib.ExitStack() as stack:
    if args.before:
      src[before] = stack.enter_context(common.git_worktree(args.before))
      impls.insert(1, before)
      print(f'# {before}: the package at git revision {args.before}', flush=True)
    results = []
    for rep in range(args.reps):
      for size in args.sizes:
        for impl in impls if rep % 2 == 0 else impls[::-1]:
          env = None if args.omp_active or impl.startswith('ours') else torch_env
          flags = [f'--case={impl},{size}', *passthrough]
          if impl in src:
            flags.append(f'--src={src[impl]}')
          r = common.run_isolated('benchmarks.gsa_vs_peer', flags, env=env)
          r.setdefault('impl', impl)
          r.setdefault('size', size)
          print(f'#   rep {rep} {json.dumps(r)}', flush=True)
          results.append(r)
  if args.json:
    saved = {'matmul': rates, 'args': vars(args), 'results': results}
    files.write_atomically(args.json, json.dumps(saved, indent=1))
  print_table(args, impls, results, rates)


def print_table(
  args: argparse.Namespace, impls: list[str], results: list[dict], rates: dict
) -> None:
  """Markdown: per size and impl, median time over reps, compile, memory, XLA bytes (ours),
  speed relative to the peer and to ``ours``."""

  def agg(impl, size, key):
    vals = [r[key] for r in results if r['impl'] == impl and r['size'] == size and key in r]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

  print(
    f'\nbatch {args.batch}, {args.channels} channels, {args.heads} heads '
    f'(d = e = {args.channels // args.heads} per head), float32, forward + backward '
    '(gradients of params and input), train-mode BatchNorm.\n'
  )
  print(
    '| size | impl | step ms (median) | step ms (min) | first call ms | extra memory MiB '
    '| GFLOP | GFLOP/s | % of matmul rate | XLA GB | speed vs peer | speed vs ours | load |'
  )
  print('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for size in args.sizes:
    peer, ours = agg('peer', size, 'median_s'), agg('ours', size, 'median_s')
    for impl in impls:
      t = agg(impl, size, 'median_s')
      if t is None:
        err = next((r.get('error') for r in results if r['impl'] == impl and r['size'] == size), '')
        print(f'| {size} | {impl} | failed: {err} | | | | | | | | | | |')
        continue
      flops = agg(impl, size, 'flops')
      rate = rates.get('jax_gflops' if impl.startswith('ours') else 'torch_gflops')
      tmin = min(r['min_s'] for r in results if r['impl'] == impl and r['size'] == size)
      cells = [
        str(size),
        impl,
        f'{t * 1e3:.1f}',
        f'{tmin * 1e3:.1f}',
        f'{agg(impl, size, "first_s") * 1e3:.0f}',
        f'{agg(impl, size, "peak_mib"):.0f}',
      ]
      if flops and rate:
        gfs = flops / t / 1e9
        cells += [f'{flops / 1e9:.2f}', f'{gfs:.1f}', f'{100 * gfs / rate:.0f}%']
      else:
        cells += ['-', '-', '-']
      nbytes = agg(impl, size, 'bytes_accessed')
      cells += [
        f'{nbytes / 1e9:.2f}' if nbytes else '-',
        f'{peer / t:.2f}x' if peer else '-',
        f'{ours / t:.2f}x' if ours else '-',
        f'{agg(impl, size, "load"):.1f}',
      ]
      print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
