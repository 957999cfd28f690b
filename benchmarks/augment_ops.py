"""CPU cost of each RandAugment op at 224x224, as the input pipeline runs it.

Each op runs inside a ``tf.data`` map (graph mode, the pipeline's own threading) over the
same photo-like ``uint8`` images, at magnitude 9 with the sign alternating; the cost is
process CPU time per image (all threads) less that of the ``Identity`` op measured the same
way, so that reading the images and the map's own overhead do not count. The median of
``--rounds`` samples, the ops in a different order each round.

  python -m benchmarks.augment_ops                 # every op, printed as a markdown table
  python -m benchmarks.augment_ops --ops Rotate Equalize --json ops.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

from benchmarks import common
from benchmarks.pipeline import _photo


def _cpu_seconds() -> float:
  return time.process_time()


def measure(ops, *, size: int, images: int, repeats: int, rounds: int, magnitude: float) -> dict:
  import tensorflow as tf

  from gsa_flax.data import augment

  rng = np.random.default_rng(0)
  pixels = np.stack([_photo(rng, size, size) for _ in range(images)])
  negate = np.arange(images) % 2 == 1

  def dataset(name):
    data = tf.data.Dataset.from_tensor_slices((pixels, negate)).repeat(repeats)
    data = data.map(
      lambda image, neg: augment.apply_op(image, name, magnitude, negate=neg),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    return data.batch(images).prefetch(1)

  names = ['Identity', *ops]
  samples = {name: [] for name in names}
  for round_index in range(rounds):
    order = list(names)
    random.Random(round_index).shuffle(order)
    for name in order:
      data = dataset(name)
      for _ in data.take(1):  # trace the map and warm its threads
        pass
      start = _cpu_seconds()
      count = 0
      for batch in data:
        count += int(batch.shape[0])
      samples[name].append(1000 * (_cpu_seconds() - start) / count)
  base = statistics.median(samples['Identity'])
  return {
    name: {
      'ms_per_image': statistics.median(runs) - base,
      'samples_ms_total': runs,
    }
    for name, runs in samples.items()
    if name != 'Identity'
  } | {'Identity': {'ms_per_image': base, 'samples_ms_total': samples['Identity']}}


def main() -> None:
  from gsa_flax.data import augment

  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--ops', nargs='*', default=list(augment.OPS))
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=4)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--magnitude', type=float, default=9.0)
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  result = measure(
    args.ops,
    size=args.size,
    images=args.images,
    repeats=args.repeats,
    rounds=args.rounds,
    magnitude=args.magnitude,
  )
  ops = [name for name in result if name != 'Identity']
  mean = statistics.mean(result[name]['ms_per_image'] for name in ops)
  print(f'| op | CPU ms per image ({args.size}x{args.size}, less Identity) |')
  print('|---|---:|')
  for name in ops:
    print(f'| {name} | {result[name]["ms_per_image"]:.2f} |')
  print(f'| mean of the ops | {mean:.2f} |')
  print(f'| (Identity: reading and the map) | {result["Identity"]["ms_per_image"]:.2f} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'machine': common.machine(), 'args': vars(args), 'ops': result}, f, indent=1)


if __name__ == '__main__':
  main()
