"""This machine's ceilings: dense float32 matmul rate and streaming memory bandwidth (JAX).

Both are the best of ``--tries`` attempts, since other processes share the machine: the
best attempt is the one least disturbed, i.e. the closest to what the hardware can do.
Their ratio (FLOP per byte) is the machine balance: a computation whose FLOPs per byte
moved are below it is bound by memory, above it by arithmetic.

  python -m benchmarks.ceiling             # ~1 min
  python -m benchmarks.ceiling --smoke     # one try, 512^2 and 64 MiB
"""

from __future__ import annotations

import argparse

from benchmarks import common


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tries', type=int, default=5)
  parser.add_argument('--smoke', action='store_true', help='one try, 512^2 and 64 MiB')
  args = parser.parse_args()
  sizes, mib = ((512,), 64) if args.smoke else ((1024, 2048, 4096), 256)
  if args.smoke:
    args.tries = 1
  print(f'# {common.machine()}; load {common.loadavg():.1f}')
  print('\n| measurement | best | all tries |')
  print('|---|---:|---|')
  peak = 0.0
  for n in sizes:
    rates = [common.matmul_peak_flops(n) / 1e9 for _ in range(args.tries)]
    peak = max(peak, max(rates))
    tries = ', '.join(f'{r:.0f}' for r in rates)
    print(f'| float32 matmul {n}^2, GFLOP/s | {max(rates):.0f} | {tries} |')
  bws = [common.memory_bandwidth(mib) / 1e9 for _ in range(args.tries)]
  tries = ', '.join(f'{b:.1f}' for b in bws)
  print(f'| bandwidth ({mib} MiB read + write), GB/s | {max(bws):.1f} | {tries} |')
  print(f'\nmachine balance: {peak / max(bws):.0f} FLOP/byte (load now {common.loadavg():.1f})')


if __name__ == '__main__':
  main()
