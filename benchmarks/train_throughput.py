"""Training throughput: GSA-ResNet-50 vs ResNet-50 train steps, and the input pipeline alone.

Train step: the project's own ``gsa_flax.train.train_step`` (SGD + momentum, label smoothing,
metrics) jitted with donated state as ``train_and_evaluate`` does, on a fixed random batch
(so the data pipeline is out of the measurement), ImageNet config at ``--image-size``, float32,
one fresh process per model, models interleaved over ``--reps``. FLOPs from XLA's cost
analysis of the compiled step give the achieved rate against the measured matmul rate.

Input pipeline: ``input_pipeline.create_train_iterator`` alone (decode, augment, batch), for
the embedded digits set at its config size and for a mocked ImageNet
(``tfds.testing.mock_data``, real metadata, random JPEGs) at 224, in images/s after the
first batch (which waits for the pipeline to start and the shuffle buffer to fill).

  /work/venv/bin/python -m benchmarks.train_throughput              # ~4 min on 2 cores
  /work/venv/bin/python -m benchmarks.train_throughput --batch 16 --reps 2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

from benchmarks import common

MODELS = ('resnet50', 'gsa_resnet50')


def train_case(args: argparse.Namespace, model_name: str) -> dict:
  """Times the real train step of one model; returns a result dict."""
  import jax
  import jax.numpy as jnp

  from configs import imagenet
  from gsa_flax import train

  config = imagenet.get_config()
  config.model = model_name
  config.batch_size = args.batch
  config.image_size = args.image_size
  num_classes = 1000
  schedule = train.learning_rate_schedule(config, steps_per_epoch=1000, num_train_steps=10_000)
  model = train.create_model(config, num_classes)
  tx = train.create_optimizer(config, schedule)
  state = train.create_train_state(config, model, tx, jax.random.key(0), args.image_size)
  batch = {
    'image': jax.random.normal(
      jax.random.key(1), (args.batch, args.image_size, args.image_size, 3), jnp.float32
    ),
    'label': jax.random.randint(jax.random.key(2), (args.batch,), 0, num_classes),
  }
  step = jax.jit(
    functools.partial(
      train.train_step,
      schedule=schedule,
      num_classes=num_classes,
      label_smoothing=config.label_smoothing,
    ),
    donate_argnums=0,
  )
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready((holder[0], metrics))

  t = common.time_fn(run, iters=args.iters)
  return {
    **t,
    'model': model_name,
    'compile_s': compile_s,
    'images_per_s': args.batch / t['median_s'],
    'flops': common.xla_flops(compiled),
    'bytes_accessed': common.xla_bytes(compiled),
    'peak_bytes': common.xla_peak_bytes(compiled),
  }


def _write_mock_metadata(root: str, num_examples: int) -> None:
  """Real imagenet2012 metadata with a tiny split, so mock_data(USE_FILES) can serve it."""
  import tensorflow_datasets as tfds

  from gsa_flax import input_pipeline

  name = 'imagenet2012'
  builder = tfds.builder(name, data_dir=root)
  splits = [input_pipeline.train_split_name(name), input_pipeline.eval_split_name(name)]
  template = functools.partial(
    tfds.core.ShardedFileTemplate,
    data_dir=builder.data_path,
    dataset_name=name,
    filetype_suffix='tfrecord',
  )
  builder.info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(
          name=s, shard_lengths=[num_examples], num_bytes=0, filename_template=template(split=s)
        )
        for s in splits
      ]
    )
  )
  builder.data_path.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)


def _realistic_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """ImageNet-like JPEGs: 500x375, smooth content plus texture, quality 90 (~100 KB).

  TFDS's mock draws 5-50 pixel images, whose decode costs almost nothing; real ImageNet
  JPEGs average about 400x350, so decode + crop are timed on images of that size.
  """
  import numpy as np
  import tensorflow as tf

  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
  images = []
  for _ in range(count):
    fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
    base = 127 + 100 * np.sin(fx * xx + phase)[..., None] * np.cos(fy * yy)[..., None]
    image = base * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 12, (375, 500, 3))
    images.append(tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90).numpy())
  return images


def input_case(args: argparse.Namespace, dataset: str) -> dict:
  """Images/s of the train iterator alone.

  ``dataset`` is ``digits`` (the embedded set, at the default config's size),
  ``imagenet2012`` (TFDS mock, its own tiny random JPEGs) or ``imagenet2012-realistic``
  (TFDS mock serving 500x375 JPEGs), both at 224.
  """
  import contextlib

  import tensorflow as tf
  import tensorflow_datasets as tfds

  from configs import default
  from gsa_flax import input_pipeline

  name = dataset.split('-')[0]
  with tempfile.TemporaryDirectory() as root:
    if name == 'digits':
      image_size = default.get_config().image_size
      mock = contextlib.nullcontext()
      data_dir = root
    else:
      image_size = 224
      _write_mock_metadata(root, args.mock_examples)
      as_dataset_fn = None
      if dataset.endswith('realistic'):
        jpegs = _realistic_jpegs(32)
        images = [jpegs[i % len(jpegs)] for i in range(args.mock_examples)]
        labels = [i % 1000 for i in range(args.mock_examples)]

        def as_dataset_fn(self, split, decoders=None, read_config=None, **kwargs):
          del self, split, decoders, read_config, kwargs  # one split serves every request
          # The pipeline skips image decoding in TFDS and decodes + crops itself.
          return tf.data.Dataset.from_tensor_slices(
            {'image': images, 'label': tf.constant(labels, tf.int64)}
          )

      mock = tfds.testing.mock_data(
        num_examples=args.mock_examples,
        policy=tfds.testing.MockPolicy.USE_FILES,
        data_dir=root,
        as_dataset_fn=as_dataset_fn,
      )
      data_dir = None
    with mock:
      builder = input_pipeline.get_builder(name, data_dir, image_size=image_size)
      it = input_pipeline.create_train_iterator(
        builder,
        dataset=name,
        global_batch_size=args.batch,
        image_size=image_size,
        seed=0,
      )
      t0 = time.perf_counter()
      next(it)
      first = time.perf_counter() - t0
      times = []
      for _ in range(args.input_batches):
        t0 = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t0)
  total = sum(times)
  return {
    'dataset': dataset,
    'image_size': image_size,
    'first_batch_s': first,
    'images_per_s': args.batch * len(times) / total,
    'median_batch_s': statistics.median(times),
    'load': common.loadavg(),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--reps', type=int, default=1, help='interleaved repetitions per model')
  parser.add_argument('--input-batches', type=int, default=30)
  parser.add_argument('--mock-examples', type=int, default=512)
  parser.add_argument('--skip-train', action='store_true')
  parser.add_argument('--json', help='also write the raw results to this file')
  parser.add_argument('--case', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:
    kind, name = args.case.split(',')
    result = train_case(args, name) if kind == 'train' else input_case(args, name)
    print(json.dumps(result))
    return

  flags = [
    f'--batch={args.batch}',
    f'--image-size={args.image_size}',
    f'--iters={args.iters}',
    f'--input-batches={args.input_batches}',
    f'--mock-examples={args.mock_examples}',
  ]
  print(f'# train throughput; {common.machine()}; load {common.loadavg():.1f}', flush=True)
  rate = common.matmul_peak_flops()
  train_results = []
  for rep in range(0 if args.skip_train else args.reps):
    for name in MODELS if rep % 2 == 0 else MODELS[::-1]:
      r = common.run_isolated('benchmarks.train_throughput', [f'--case=train,{name}', *flags])
      r.setdefault('model', name)
      print(f'#   {json.dumps(r)}', flush=True)
      train_results.append(r)
  input_results = []
  for dataset in ('digits', 'imagenet2012', 'imagenet2012-realistic'):
    # TF's own thread pools use every core; nothing else runs meanwhile.
    env = {'TF_CPP_MIN_LOG_LEVEL': '2'}
    r = common.run_isolated(
      'benchmarks.train_throughput', [f'--case=input,{dataset}', *flags], env=env
    )
    r.setdefault('dataset', dataset)
    print(f'#   {json.dumps(r)}', flush=True)
    input_results.append(r)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'matmul_flops': rate, 'train': train_results, 'input': input_results}, f)
  report(args, rate, train_results, input_results)


def report(args, rate, train_results, input_results) -> None:
  """Markdown tables: train steps (with the ratio to ResNet-50) and the pipeline alone."""

  def med(name, key):
    vals = [r[key] for r in train_results if r['model'] == name and key in r]
    return statistics.median(vals) if vals else None

  slowest_step = None
  if train_results:
    print(
      f'\nTrain step, batch {args.batch}, {args.image_size}x{args.image_size}, float32; '
      f'matmul rate {rate / 1e9:.0f} GFLOP/s.\n'
    )
    print(
      '| model | step s | images/s | compile s | GFLOP/step | GFLOP/s | % of matmul rate '
      '| XLA plan GiB | step time vs ResNet-50 | load |'
    )
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    base = med('resnet50', 'median_s')
    for name in MODELS:
      t = med(name, 'median_s')
      if t is None:
        err = next((r.get('error') for r in train_results if r['model'] == name), '')
        print(f'| {name} | failed: {err} | | | | | | | | |')
        continue
      flops = med(name, 'flops')
      print(
        f'| {name} | {t:.2f} | {args.batch / t:.2f} | {med(name, "compile_s"):.0f} '
        f'| {flops / 1e9:.0f} | {flops / t / 1e9:.1f} | {100 * flops / t / rate:.0f}% '
        f'| {med(name, "peak_bytes") / 2**30:.1f} | {t / base:.2f}x | {med(name, "load"):.1f} |'
      )
    slowest_step = max(med(n, 'median_s') or 0 for n in MODELS)
  print(
    f'\nInput pipeline alone, batch {args.batch}, {args.input_batches} batches after the first.\n'
  )
  print('| dataset | image size | images/s | first batch s | vs slowest train step | load |')
  print('|---|---:|---:|---:|---:|---:|')
  for r in input_results:
    if 'error' in r:
      print(f'| {r["dataset"]} | | failed: {r["error"]} | | | |')
      continue
    ratio = f'{r["images_per_s"] * slowest_step / args.batch:.0f}x' if slowest_step else '-'
    print(
      f'| {r["dataset"]} | {r["image_size"]} | {r["images_per_s"]:.0f} '
      f'| {r["first_batch_s"]:.1f} | {ratio} | {r["load"]:.1f} |'
    )


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  main()
