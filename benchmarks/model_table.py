"""Parameters and forward FLOPs of every ResNet and GSA-ResNet depth, as a markdown table.

FLOPs come from XLA's own cost analysis of the compiled forward pass (eval mode, batch 1,
224x224, float32). XLA counts a multiply-add as 2 FLOPs; the table reports both XLA's
FLOPs and multiply-adds (= FLOPs / 2), which is the unit papers usually quote as "FLOPs".

  /work/venv/bin/python -m benchmarks.model_table
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from benchmarks.common import xla_flops
from gsa_flax import models

DEPTHS = (26, 38, 50, 101)


def count_and_flops(name: str, size: int) -> tuple[int, float]:
  """Parameter count and XLA forward FLOPs (batch 1, eval mode) of a registered model."""
  model = models.create_model(name)
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  params = sum(math.prod(p.shape) for p in jax.tree.leaves(variables['params']))
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  compiled = fwd.lower(variables, x).compile()
  return params, xla_flops(compiled)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=224)
  args = parser.parse_args()
  rows = []
  for depth in DEPTHS:
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
  for depth, (bp, bf), (gp, gf) in rows:
    print(
      f'| {depth} | {bp:,} | {gp:,} | {gp / bp:.3f} | {bf / 1e9:.2f} ({bf / 2e9:.2f}) '
      f'| {gf / 1e9:.2f} ({gf / 2e9:.2f}) | {gf / bf:.3f} |'
    )


if __name__ == '__main__':
  main()
