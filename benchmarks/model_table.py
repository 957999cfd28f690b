"""Parameters and forward FLOPs of every ResNet and GSA-ResNet depth, as a markdown table.

FLOPs come from XLA's own cost analysis of the compiled forward pass (eval mode, batch 1,
224x224, float32). XLA counts a multiply-add as 2 FLOPs; the table reports both XLA's
FLOPs and multiply-adds (= FLOPs / 2), which is the unit papers usually quote as "FLOPs".

The positional attention is counted in its logits-first contraction order
(``networks.create_model(..., gsa=GSAOptions(order='logits'))``), the one with the fewest FLOPs
(``n * (d + e)`` multiply-adds per pixel, head and axis step) and the one a paper counts.
Where the values-first order is faster (``order='auto'`` picks it for GSA-ResNet's first
stage on CPU; BENCHMARKS.md, "Speed work: contraction order") it executes more FLOPs for
fewer bytes; that is a choice of schedule, not of model, and is left out of the model's
cost.

  python -m benchmarks.model_table            # ~1 min
  python -m benchmarks.model_table --smoke    # depth 50 and its breakdown at 32x32
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from benchmarks.common import xla_flops
from gsa_flax.model import networks
from gsa_flax.model.layers import GSAOptions

DEPTHS = (26, 38, 50, 101)


def count_and_flops(
  name: str, size: int, key_ratio: float = 0.5, **knobs
) -> tuple[int, float, int]:
  """Parameters, XLA forward FLOPs (batch 1, eval) and parameters of the spatial layers.

  The spatial layers are the residual blocks' 3x3 convolutions (ResNet) or GSA modules.
  """
  # The minimal-FLOP order (see above); knobs: GSAOptions fields.
  gsa = GSAOptions(order='logits', **knobs)
  model = networks.create_model(name, key_ratio=key_ratio, gsa=gsa)
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  leaves = jax.tree_util.tree_leaves_with_path(variables['params'])
  params = sum(math.prod(p.shape) for _, p in leaves)
  spatial = sum(
    math.prod(p.shape)
    for path, p in leaves
    if 'GSA' in jax.tree_util.keystr(path) or p.shape[:2] == (3, 3)
  )
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return params, xla_flops(fwd.lower(variables, x).compile()), spatial


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--depths', type=int, nargs='+', default=list(DEPTHS), choices=DEPTHS)
  parser.add_argument('--no-breakdown', action='store_true', help='skip the depth-50 breakdown')
  parser.add_argument('--smoke', action='store_true', help='depth 50 and its breakdown at 32x32')
  args = parser.parse_args()
  if args.smoke:
    args.size, args.depths = 32, [50]
  rows = []
  for depth in args.depths:
    base = count_and_flops(f'resnet{depth}', args.size)
    gsa = count_and_flops(f'gsa_resnet{depth}', args.size)
    rows.append((depth, base, gsa))
  print(f'Batch 1, {args.size}x{args.size}, 1000 classes, float32; FLOPs from XLA cost analysis')
  print('of the compiled forward (eval mode); GMACs = GFLOPs / 2 (multiply-adds).\n')
  print(
    '| depth | ResNet params | GSA-ResNet params | params ratio | ResNet GFLOPs (GMACs) '
    '| GSA-ResNet GFLOPs (GMACs) | FLOPs ratio |'
  )
  print('|---|---:|---:|---:|---:|---:|---:|')
  for depth, (bp, bf, _), (gp, gf, _) in rows:
    print(
      f'| {depth} | {bp:,} | {gp:,} | {gp / bp:.3f} | {bf / 1e9:.2f} ({bf / 2e9:.2f}) '
      f'| {gf / 1e9:.2f} ({gf / 2e9:.2f}) | {gf / bf:.3f} |'
    )
  if args.no_breakdown or 50 not in args.depths:
    return
  (bp, bf, bs), (gp, gf, gs) = rows[args.depths.index(50)][1:]
  print('\nDepth 50, where the parameters and FLOPs go:\n')
  print('| variant | params | of ResNet-50 | GFLOPs | of ResNet-50 |')
  print('|---|---:|---:|---:|---:|')
  print(f'| ResNet-50 | {bp:,} | 1.000 | {bf / 1e9:.2f} | 1.000 |')
  print(f'| ResNet-50, its 3x3 convs alone | {bs:,} | {bs / bp:.3f} | | |')
  print(f'| ResNet-50 without its 3x3 convs (the floor) | {bp - bs:,} | {(bp - bs) / bp:.3f} | | |')
  print(
    f'| GSA-ResNet-50 (d_k = d_out/2, global L) | {gp:,} | {gp / bp:.3f} | {gf / 1e9:.2f} '
    f'| {gf / bf:.3f} |'
  )
  print(f'| GSA-ResNet-50, its GSA modules alone | {gs:,} | {gs / bp:.3f} | | |')
  variants = [
    ('GSA-ResNet-50, d_k = d_out/4', dict(key_ratio=0.25)),
    ('GSA-ResNet-50, content-only (no positional branch)', dict(positional='none')),
    ('GSA-ResNet-50, positional L = 15 (local)', dict(rel_length=15)),
  ]
  for label, kwargs in variants:
    p, f, _ = count_and_flops('gsa_resnet50', args.size, **kwargs)
    print(f'| {label} | {p:,} | {p / bp:.3f} | {f / 1e9:.2f} | {f / bf:.3f} |')


if __name__ == '__main__':
  main()
