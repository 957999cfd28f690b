"""Training throughput: GSA-ResNet-50 vs ResNet-50 train steps, and the input pipeline alone.

Train step: the project's train step as the trainer runs it (``state.setup`` +
``state.create`` + ``steps.jit_train_step`` over a one-device ``steps.make_mesh``: SGD +
momentum, weight decay, label smoothing, metrics, donated state), on a fixed random batch
(so the data pipeline is out of the measurement), ImageNet config at ``--image-size``,
float32. Both models are compiled in one fresh process per repetition and their steps
alternate (A, B, B, A, ...), so that load from other processes hits both alike; the ratio
is taken per adjacent pair of steps. FLOPs from XLA's cost analysis of the compiled step
give the achieved rate against the measured matmul rate.

Input pipeline: ``input_pipeline.create_train_iterator`` alone (decode, augment, batch), for
the embedded digits set at its config size and for generated ImageNet-like JPEG records
(``benchmarks/pipeline.py``'s) at 224, in images/s after the
first batch (which waits for the pipeline to start and the shuffle buffer to fill).

  python -m benchmarks.train_throughput --reps 3 --json docs/benchmarks/train_throughput.json
  python -m benchmarks.train_throughput --batch 16 --reps 2
  python -m benchmarks.train_throughput --smoke    # tiny models at 32, a few batches
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from benchmarks import common
from gsa_flax import files

MODELS = ('resnet50', 'gsa_resnet50')


def _build_step(args: argparse.Namespace, model_name: str, config=None, num_classes=1000):
  """The compiled real train step of one model (a closure timing one step) and its costs.

  ``config``: the experiment; default the ImageNet config at ``--batch``/``--image-size``.
  """
  import jax

  if config is None:
    config = common.imagenet_config(model_name, args.batch, args.image_size, 'float32')
  step = common.compile_train_step(config, num_classes, jax.devices()[:1])
  info = {
    'model': model_name,
    'compile_s': step.compile_s,
    'flops': common.xla_flops(step.compiled),
    'bytes_accessed': common.xla_bytes(step.compiled),
    'peak_bytes': common.xla_peak_bytes(step.compiled),
  }
  return step, info


def default_case(args: argparse.Namespace) -> dict:
  """The train step that the digits pipeline feeds: ``configs/default.py`` as it is."""
  from configs import default

  config = default.get_config()
  run, info = _build_step(args, config.model, config=config, num_classes=10)
  run()
  times = [run() for _ in range(max(args.iters, 5))]
  t = statistics.median(times)
  return {
    **info,
    'batch': config.batch_size,
    'image_size': config.image_size,
    'median_s': t,
    'images_per_s': config.batch_size / t,
    'load': common.loadavg(),
  }


def paired_case(args: argparse.Namespace) -> dict:
  """Both models in one process, steps alternated A, B, A, B (order flipped each pair).

  Load from other processes then hits both models within seconds of each other; the
  ratio is taken per pair and its median reported.
  """
  models = args.models
  runs, infos = {}, {}
  for name in models:
    runs[name], infos[name] = _build_step(args, name)
    infos[name]['first_s'] = runs[name]()  # warm-up step (allocation), not timed
  times = {name: [] for name in models}
  loads = []
  for i in range(args.iters):
    for name in models if i % 2 == 0 else models[::-1]:
      times[name].append(runs[name]())
    loads.append(common.loadavg())
  results = []
  for name in models:
    t = times[name]
    results.append(
      {
        **infos[name],
        'median_s': statistics.median(t),
        'min_s': min(t),
        'times_s': t,
        'images_per_s': args.batch / statistics.median(t),
        'load': statistics.median(loads),
      }
    )
  ratios = [g / r for g, r in zip(times[models[1]], times[models[0]], strict=True)]
  return {'paired': results, 'ratio_median': statistics.median(ratios), 'ratios': ratios}


def input_case(args: argparse.Namespace, dataset: str) -> dict:
  """Images/s of the train iterator alone.

  ``dataset`` is ``digits`` (the embedded set, at the default config's size) or
  ``imagenet2012-realistic`` (``benchmarks.pipeline``'s generated records: 500x375 and
  400x500 JPEGs, read with imagenet2012's spec) at 224.
  """
  from benchmarks import pipeline
  from configs import default
  from gsa_flax.data import datasets, input_pipeline

  with tempfile.TemporaryDirectory() as root:
    if dataset == 'digits':
      spec = datasets.get('digits')
      image_size = default.get_config().image_size
      builder = input_pipeline.get_builder(spec, root, image_size=image_size)
    else:
      spec, image_size = pipeline.imagenet_like_spec(), 224
      builder = pipeline.get_builder(args.records_dir, 'photos')
    it = input_pipeline.create_train_iterator(
      builder,
      spec=spec,
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
  parser.add_argument('--iters', type=int, default=4, help='timed steps per model')
  parser.add_argument('--reps', type=int, default=1, help='interleaved repetitions per model')
  parser.add_argument('--input-batches', type=int, default=30)
  parser.add_argument(
    '--records-dir',
    default=common.RECORDS_DIR,
    help="where benchmarks.pipeline's generated ImageNet-like records are (written if missing)",
  )
  parser.add_argument('--skip-train', action='store_true')
  parser.add_argument('--json', help='also write the raw results to this file')
  parser.add_argument(
    '--smoke',
    action='store_true',
    help='resnet_tiny vs gsa_resnet_tiny at 32, batch 4, 2 steps; 3 input batches',
  )
  parser.add_argument('--models', nargs=2, default=list(MODELS), help=argparse.SUPPRESS)
  parser.add_argument('--case', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.smoke:
    args.models, args.batch, args.image_size, args.iters = (
      ['resnet_tiny', 'gsa_resnet_tiny'],
      4,
      32,
      2,
    )
    args.input_batches, args.reps = 3, 1
  if args.case:
    kind, name = args.case.split(',')
    cases = {'train': paired_case, 'default': default_case}
    result = cases[kind](args) if kind in cases else input_case(args, name)
    print(json.dumps(result))
    return

  flags = [
    f'--batch={args.batch}',
    f'--image-size={args.image_size}',
    f'--iters={args.iters}',
    f'--input-batches={args.input_batches}',
    f'--records-dir={args.records_dir}',
    '--models',
    *args.models,
  ]
  print(f'# train throughput; {common.machine()}; load {common.loadavg():.1f}', flush=True)
  rate = common.matmul_peak_flops()
  train_results, ratios = [], []
  for rep in range(0 if args.skip_train else args.reps):
    r = common.run_isolated('benchmarks.train_throughput', ['--case=train,both', *flags])
    print(f'#   rep {rep} {json.dumps(r)}', flush=True)
    if 'error' in r:
      train_results += [{'model': name, 'error': r['error']} for name in args.models]
      continue
    train_results += r['paired']
    ratios += r['ratios']
  input_results = []
  for dataset in ('digits', 'imagenet2012-realistic'):
    # TF's own thread pools use every core; nothing else runs meanwhile.
    env = {'TF_CPP_MIN_LOG_LEVEL': '2'}
    r = common.run_isolated(
      'benchmarks.train_throughput', [f'--case=input,{dataset}', *flags], env=env
    )
    r.setdefault('dataset', dataset)
    print(f'#   {json.dumps(r)}', flush=True)
    input_results.append(r)
  default_step = common.run_isolated('benchmarks.train_throughput', ['--case=default,x', *flags])
  print(f'#   {json.dumps(default_step)}', flush=True)
  if args.json:
    saved = {
      'matmul_flops': rate,
      'train': train_results,
      'ratios': ratios,
      'input': input_results,
      'default_train_step': default_step,
    }
    files.write_atomically(args.json, json.dumps(saved))
  report(args, rate, train_results, input_results, ratios, default_step)


def report(args, rate, train_results, input_results, ratios, default_step) -> None:
  """Markdown tables: train steps (with the ratio to the first model) and the pipeline alone."""

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
      f'| XLA plan GiB | step time vs {args.models[0]} | load |'
    )
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    base = med(args.models[0], 'median_s')
    for name in args.models:
      t = med(name, 'median_s')
      if t is None:
        err = next((r.get('error') for r in train_results if r['model'] == name), '')
        print(f'| {name} | failed: {err} | | | | | | | | |')
        continue
      flops = med(name, 'flops')
      print(
        f'| {name} | {t:.2f} | {args.batch / t:.2f} | {med(name, "compile_s"):.0f} '
        f'| {flops / 1e9:.0f} | {flops / t / 1e9:.1f} | {100 * flops / t / rate:.0f}% '
        f'| {med(name, "peak_bytes") / 2**30:.1f} | {f"{t / base:.2f}x" if base else "-"} '
        f'| {med(name, "load"):.1f} |'
      )
    slowest_step = max(med(n, 'median_s') or 0 for n in args.models)
    if ratios:
      print(
        f'\n{args.models[1]} / {args.models[0]} step time, per adjacent pair of steps: median '
        f'{statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x over '
        f'{len(ratios)} pairs.'
      )
  print(
    f'\nInput pipeline alone, batch {args.batch}, {args.input_batches} batches after the first.\n'
  )
  fed = {}  # images/s of the train step each pipeline feeds
  if slowest_step:
    fed['imagenet2012'] = args.batch / slowest_step
  if default_step and 'images_per_s' in default_step:
    fed['digits'] = default_step['images_per_s']
    print(
      f'The digits pipeline feeds configs/default.py ({default_step["model"]}, batch '
      f'{default_step["batch"]}, {default_step["image_size"]}x{default_step["image_size"]}), '
      f'whose train step runs at {default_step["images_per_s"]:.0f} images/s here.\n'
    )
  print(
    '| dataset | image size | images/s | first batch s | train step it feeds, images/s '
    '| pipeline / train step | load |'
  )
  print('|---|---:|---:|---:|---:|---:|---:|')
  for r in input_results:
    if 'error' in r:
      print(f'| {r["dataset"]} | | failed: {r["error"]} | | | | |')
      continue
    step = fed.get(r['dataset'].split('-')[0])
    ratio = f'{r["images_per_s"] / step:.0f}x' if step else '-'
    print(
      f'| {r["dataset"]} | {r["image_size"]} | {r["images_per_s"]:.0f} '
      f'| {r["first_batch_s"]:.1f} | {f"{step:.1f}" if step else "-"} | {ratio} '
      f'| {r["load"]:.1f} |'
    )


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  main()
