"""The ImageNet train pipeline per CPU-second, next to flax's, and the cost of a resume.

Records: ``synthetic_imagenet``, a TFDS dataset of generated photo-like JPEGs written on
first use into ``--data-dir`` (no download): config ``photos`` has ImageNet's shapes (half
500x375, half 400x500, quality 90, ~1,250 records per file like ImageNet's), config
``tiny`` many small JPEGs for the resume measurement, where the number of records counts
and not their size. The project's pipeline reads them with ``imagenet2012``'s spec (the
name aside), so it is the very path ``configs/imagenet.py`` trains with.

Throughput: images per CPU-second (process CPU time, all threads, so that other load on a
shared machine does not count) of three pipelines on the same records, alternating in one
process, a fresh iterator per measurement with its first batches (start-up, shuffle
buffer) left out, after one first use of each pipeline in the process (timed apart: what a
process pays once, such as compiling the XLA-compiled RandAugment ops):

- ``flax reference``: flax ``examples/imagenet``'s ``preprocess_for_train`` and
  ``create_split``, written again here from their description (Inception crop fused with
  the decode, centre crop when no box is found, bicubic resize without antialias, flip,
  normalise, float32; ``repeat``, a ``16 * batch`` shuffle buffer, ``prefetch(10)``, a
  48-thread private pool);
- ``standard``: ``input_pipeline.create_train_iterator`` with ``configs/imagenet.py``'s
  augmentation (none beyond the crop and flip);
- ``strong``: the same with ``configs/imagenet_strong.py``'s (RandAugment m9 n2,
  Mixup/CutMix).

Resume: wall and CPU time, and the bytes read from the record files (``/proc/self/io``),
from ``create_train_iterator(start_step=k)`` to its first batch, at 10%, 50% and 90% of an
epoch of the ``tiny`` records; the bytes are given in records (divided by the mean record
size) and as a fraction of the epoch.

``--rev`` measures a git revision of the package instead of the working tree (before /
after), with the same benchmark code and records. Results go to ``--json``; the markdown
for ``BENCHMARKS.md`` is printed.

  python -m benchmarks.pipeline --json docs/benchmarks/pipeline.json
  python -m benchmarks.pipeline --rev main          # the same, for the package at main
  python -m benchmarks.pipeline --smoke             # a few batches, checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks import common

IMAGE_SIZE = 224
# The deviceless roofline steps of BENCHMARKS.md section 5 (32 images per chip, 224x224):
# milliseconds per step on each chip.
ROOFLINE_STEP_MS = {
  'v5e': {'GSA-ResNet-50': 12.5, 'ResNet-50': 7.86},
  'v5p': {'GSA-ResNet-50': 5.37, 'ResNet-50': 3.31},
  'H100': {'GSA-ResNet-50': 5.24, 'ResNet-50': 4.25},
}
PER_CHIP_BATCH = 32
# Host vCPUs per chip of the machines (a v5e-8 host: 224 vCPUs for 8 chips; v5p: 208 for
# 4; an 8-GPU H100 host (a3-highgpu-8g): 208 for 8).
HOST_VCPUS_PER_CHIP = {'v5e': 224 / 8, 'v5p': 208 / 4, 'H100': 208 / 8}

# ImageNet's train files hold ~1,251 records each (1,281,167 in 1,024 files).
RECORDS_PER_FILE = 1251


# ----------------------------------------------------------------------------- the records


def _photo(rng, height: int, width: int):
  """A photo-like uint8 image: smooth random shapes and colour fields, edges, fine noise.

  JPEG's cost grows with detail; these compress at quality 90 to about ImageNet's mean
  file size (~110 KB at 500x375).
  """
  import numpy as np
  from PIL import Image, ImageDraw

  coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
  draw = ImageDraw.Draw(image)
  for _ in range(12):
    x0, x1 = sorted(rng.integers(0, width, 2))
    y0, y1 = sorted(rng.integers(0, height, 2))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
  pixels = np.asarray(image, np.float32) + rng.normal(0, 14, (height, width, 3))
  return np.clip(pixels, 0, 255).astype(np.uint8)


def _jpeg(pixels, quality: int = 90) -> bytes:
  from PIL import Image

  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='JPEG', quality=quality)
  return out.getvalue()


@functools.cache
def _builder_class():
  import numpy as np
  import tensorflow_datasets as tfds

  @dataclasses.dataclass
  class Config(tfds.core.BuilderConfig):
    num_examples: int = 0
    shapes: tuple[tuple[int, int], ...] = ()

  class SyntheticImagenet(tfds.core.GeneratorBasedBuilder):
    """Generated JPEGs of ImageNet's shapes, 1000 classes (benchmarks only)."""

    VERSION = tfds.core.Version('1.0.0')
    BUILDER_CONFIGS = [
      Config(name='photos', num_examples=1024, shapes=((375, 500), (500, 400))),
      # ImageNet's number of records and files, each record a tiny JPEG.
      Config(name='tiny', num_examples=1_281_167, shapes=((12, 16),)),
    ]

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            'image': tfds.features.Image(encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=1000),
          }
        ),
        supervised_keys=('image', 'label'),
      )

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      shapes = self.builder_config.shapes
      # A few distinct images, repeated: decoding cost is per image, not per distinct one.
      pool = [_jpeg(_photo(rng, *shapes[i % len(shapes)])) for i in range(64)]
      for i in range(self.builder_config.num_examples):
        yield i, {'image': io.BytesIO(pool[i % len(pool)]), 'label': i % 1000}

  return SyntheticImagenet


def get_builder(data_dir: str, config: str, num_examples: int | None = None):
  """The ``synthetic_imagenet`` builder of ``config``, written into ``data_dir`` if missing."""
  import tensorflow_datasets as tfds

  cls = _builder_class()
  builder = cls(config=config, data_dir=data_dir)
  if not builder.is_prepared():
    count = builder.builder_config.num_examples
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=max(count // RECORDS_PER_FILE, 1))
    )
  return builder


def imagenet_like_spec():
  """imagenet2012's spec under the generated records' name."""
  from gsa_flax.data import datasets

  return dataclasses.replace(datasets.get('imagenet2012'), name='synthetic_imagenet')


# ----------------------------------------------------------------------------- flax's pipeline

_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def flax_preprocess_for_train(encoded, image_size: int = IMAGE_SIZE):
  """flax ``examples/imagenet``'s train preprocessing, from its description.

  A random box (area 8-100%, aspect 3/4-4/3, 10 attempts) decoded fused with the crop and
  resized bicubically without antialias; when no box was found (the whole image came
  back), a centre crop of 224/256 of the shorter side instead. Then a random flip,
  normalisation, float32.
  """
  import tensorflow as tf

  shape = tf.image.extract_jpeg_shape(encoded)
  begin, size, _ = tf.image.sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
    min_object_covered=0.1,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  y, x, _ = tf.unstack(begin)
  height, width, _ = tf.unstack(size)
  no_box = tf.reduce_all(tf.equal(size[:2], shape[:2]))

  def centre():
    side = tf.cast(
      image_size / (image_size + 32) * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32),
      tf.int32,
    )
    window = tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  def box():
    return tf.image.decode_and_crop_jpeg(encoded, tf.stack([y, x, height, width]), channels=3)

  image = tf.cond(no_box, centre, box)
  image = tf.image.resize(image, [image_size, image_size], method='bicubic')
  image = tf.image.random_flip_left_right(image)
  image = (image - tf.constant(_MEAN_RGB)) / tf.constant(_STDDEV_RGB)
  return tf.image.convert_image_dtype(image, tf.float32)


def flax_create_split(builder, batch_size: int):
  """flax ``create_split`` for training: repeat, shuffle, map, batch, prefetch."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  ds = builder.as_dataset(
    split='train',
    decoders={'image': tfds.decode.SkipDecoding()},
    # ImageNet is too large for TFDS's automatic in-memory cache; so are these records.
    read_config=tfds.ReadConfig(try_autocache=False),
  )
  options = tf.data.Options()
  options.threading.private_threadpool_size = 48
  ds = ds.with_options(options).repeat().shuffle(16 * batch_size, seed=0)
  ds = ds.map(
    lambda example: {
      'image': flax_preprocess_for_train(example['image']),
      'label': example['label'],
    },
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  return ds.batch(batch_size, drop_remainder=True).prefetch(10).as_numpy_iterator()


# ----------------------------------------------------------------------------- measurement


def _cpu_seconds() -> float:
  return time.process_time()  # every thread of the process


def _read_bytes() -> int:
  """Bytes this process has read through read(2) and friends (rchar: page cache included)."""
  with open('/proc/self/io') as f:
    for line in f:
      if line.startswith('rchar:'):
        return int(line.split()[1])
  return 0


def _pipelines(builder, batch: int) -> dict:
  """``name -> () -> iterator`` of the three pipelines."""
  from configs import imagenet, imagenet_strong
  from gsa_flax.data import input_pipeline

  spec = imagenet_like_spec()

  def ours(config):
    return input_pipeline.create_train_iterator(
      builder,
      spec=spec,
      global_batch_size=batch,
      image_size=IMAGE_SIZE,
      seed=0,
      process=(0, 1),
      augment=input_pipeline.Augment(**config.augment),
    )

  return {
    'flax reference': functools.partial(flax_create_split, builder, batch),
    'standard': functools.partial(ours, imagenet.get_config()),
    'strong': functools.partial(ours, imagenet_strong.get_config()),
  }


def measure_throughput(builder, *, batch: int, warmup: int, batches: int, rounds: int) -> dict:
  """Images per CPU-second of each pipeline, alternating, ``rounds`` times each."""
  pipelines = _pipelines(builder, batch)
  samples = {name: [] for name in pipelines}
  first_batch = {}
  # First use: what a process pays once (tracing, and compiling the XLA-compiled
  # RandAugment ops), measured apart so that the samples are the steady rate.
  first_use = {}
  for name, make in pipelines.items():
    start_wall, start_cpu = time.perf_counter(), _cpu_seconds()
    iterator = make()
    for _ in range(warmup + batches):
      next(iterator)
    del iterator
    first_use[name] = {
      'wall_s': time.perf_counter() - start_wall,
      'cpu_s': _cpu_seconds() - start_cpu,
    }
    print(f'  {name}: first use, {warmup + batches} batches: {first_use[name]}', flush=True)
  for round_index in range(rounds):
    order = list(pipelines) if round_index % 2 == 0 else list(pipelines)[::-1]
    for name in order:
      gc.collect()
      start_wall, start_cpu = time.perf_counter(), _cpu_seconds()
      iterator = pipelines[name]()
      for _ in range(warmup):
        out = next(iterator)
      first_batch.setdefault(name, time.perf_counter() - start_wall)
      cpu0, wall0 = _cpu_seconds(), time.perf_counter()
      for _ in range(batches):
        out = next(iterator)
      cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
      del iterator
      images = batches * batch
      samples[name].append({'images_per_cpu_s': images / cpu, 'images_per_s': images / wall})
      print(
        f'  {name}: {images / cpu:.0f} images per CPU-second ({images / wall:.0f}/s wall, '
        f'image {out["image"].dtype}, start {time.perf_counter() - start_wall:.1f} s)',
        flush=True,
      )
      del start_cpu
  result = {}
  for name, runs in samples.items():
    rates = [r['images_per_cpu_s'] for r in runs]
    result[name] = {
      'images_per_cpu_s': statistics.median(rates),
      'ms_per_image': 1000 / statistics.median(rates),
      'samples': rates,
      'image_dtype': None,
      'first_use': first_use[name],
    }
  return result


def measure_resume(builder, *, batch: int, fractions=(0.1, 0.5, 0.9)) -> dict:
  """Time, CPU and records read from ``create_train_iterator(start_step=k)`` to a batch."""
  from gsa_flax.data import input_pipeline

  spec = imagenet_like_spec()
  info = builder.info.splits['train']
  record_bytes = info.num_bytes / info.num_examples
  steps = input_pipeline.steps_per_epoch(builder, spec, batch, process=(0, 1))
  epoch_records = steps * batch
  result = {'epoch_records': epoch_records, 'mean_record_bytes': record_bytes, 'positions': {}}
  for fraction in (0.0, *fractions):
    step = round(fraction * steps)
    gc.collect()
    read0, cpu0, wall0 = _read_bytes(), _cpu_seconds(), time.perf_counter()
    iterator = input_pipeline.create_train_iterator(
      builder,
      spec=spec,
      global_batch_size=batch,
      image_size=IMAGE_SIZE,
      seed=0,
      start_step=step,
      process=(0, 1),
    )
    next(iterator)
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    records = (_read_bytes() - read0) / record_bytes
    del iterator
    result['positions'][f'{fraction:.0%}'] = {
      'step': step,
      'wall_s': wall,
      'cpu_s': cpu,
      'records_read': records,
      'fraction_of_epoch_read': records / epoch_records,
    }
    print(
      f'  resume at {fraction:.0%} (step {step} of {steps}): {wall:.2f} s, {cpu:.2f} CPU-s, '
      f'{records:,.0f} records read ({records / epoch_records:.1%} of the epoch)',
      flush=True,
    )
  base = result['positions']['0%']['records_read']
  for position in result['positions'].values():
    # Reading again: what a resume reads beyond what a start at step 0 reads.
    position['records_read_again'] = max(position['records_read'] - base, 0.0)
    position['fraction_read_again'] = position['records_read_again'] / epoch_records
  return result


def _case(args: argparse.Namespace) -> dict:
  """One revision's measurements (run in its own process)."""
  if args.package_root:
    common.import_package_from(args.package_root)
  import tensorflow as tf

  tf.config.set_visible_devices([], 'GPU')
  photos = get_builder(args.data_dir, 'photos')
  print(f'throughput, {photos.info.splits["train"].num_examples} photo records:', flush=True)
  out = {
    'throughput': measure_throughput(
      photos, batch=args.batch, warmup=args.warmup, batches=args.batches, rounds=args.rounds
    )
  }
  if args.resume:
    tiny = get_builder(args.data_dir, 'tiny')
    print(f'resume, {tiny.info.splits["train"].num_examples} tiny records:', flush=True)
    out['resume'] = measure_resume(tiny, batch=args.resume_batch)
  return out


# ----------------------------------------------------------------------------- the tables


def host_cores_table(throughput: dict) -> list[str]:
  """Markdown: host cores each chip needs to be fed at its roofline step, per recipe."""
  rows = [
    '| chip | model | roofline step ms | images/s per chip | '
    + ' | '.join(f'cores: {name}' for name in throughput)
    + ' | host vCPUs per chip |',
    '|---|---|---:|---:|' + '---:|' * len(throughput) + '---:|',
  ]
  for chip, models in ROOFLINE_STEP_MS.items():
    for model, step_ms in models.items():
      rate = PER_CHIP_BATCH / (step_ms / 1000)
      cores = [rate / r['images_per_cpu_s'] for r in throughput.values()]
      rows.append(
        f'| {chip} | {model} | {step_ms:g} | {rate:,.0f} | '
        + ' | '.join(f'{c:.1f}' for c in cores)
        + f' | {HOST_VCPUS_PER_CHIP[chip]:.0f} |'
      )
  return rows


def markdown(result: dict) -> str:
  lines = []
  for label, case in result['cases'].items():
    throughput = case['throughput']
    reference = throughput['flax reference']['images_per_cpu_s']
    standard = throughput['standard']['images_per_cpu_s']
    lines += [
      f'#### {label}',
      '',
      '| pipeline | images per CPU-second | ms of CPU per image | / flax | / standard |',
      '|---|---:|---:|---:|---:|',
    ]
    for name, row in throughput.items():
      rate = row['images_per_cpu_s']
      lines.append(
        f'| {name} | {rate:.0f} | {1000 / rate:.2f} | {rate / reference:.2f}x | '
        f'{rate / standard:.2f}x |'
      )
    lines += ['', 'Host cores needed per chip at the roofline step (32 images per chip):', '']
    lines += host_cores_table(throughput)
    if 'resume' in case:
      resume = case['resume']
      lines += [
        '',
        f'Resume, epoch of {resume["epoch_records"]:,} records:',
        '',
        '| position | wall s | CPU s | records read | read again (% of epoch) |',
        '|---|---:|---:|---:|---:|',
      ]
      for name, row in resume['positions'].items():
        lines.append(
          f'| {name} | {row["wall_s"]:.2f} | {row["cpu_s"]:.2f} | {row["records_read"]:,.0f} '
          f'| {row["records_read_again"]:,.0f} ({row["fraction_read_again"]:.2%}) |'
        )
    lines.append('')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data-dir', default=common.RECORDS_DIR)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--warmup', type=int, default=2, help='batches left out of each sample')
  parser.add_argument('--batches', type=int, default=10, help='batches per sample')
  parser.add_argument('--rounds', type=int, default=3, help='samples of each pipeline')
  parser.add_argument('--resume-batch', type=int, default=1024)
  parser.add_argument('--no-resume', dest='resume', action='store_false')
  parser.add_argument('--rev', action='append', default=[], help='a git revision to measure')
  parser.add_argument('--json', default='', help='write the results here')
  parser.add_argument('--smoke', action='store_true', help='a few batches, no resume')
  parser.add_argument('--case', default='', help=argparse.SUPPRESS)
  parser.add_argument('--package-root', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.smoke:
    args.batch, args.warmup, args.batches, args.rounds, args.resume = 16, 1, 2, 1, False
  if args.case:
    with open(args.case, 'w') as f:
      json.dump(_case(args), f)
    return

  result = {'machine': common.machine(), 'args': vars(args).copy(), 'cases': {}}
  revisions = args.rev or ['']
  for rev in revisions:
    label = f'package at {common.resolve_rev(rev)}' if rev else 'this tree'
    print(f'== {label}', flush=True)
    with common.git_worktree(rev) if rev else _no_tree() as root:
      out = os.path.join(args.data_dir, f'case-{os.getpid()}.json')
      os.makedirs(args.data_dir, exist_ok=True)
      command = [sys.executable, '-m', 'benchmarks.pipeline', '--case', out]
      command += ['--package-root', root] if root else []
      command += [a for a in sys.argv[1:] if not a.startswith('--rev') and a not in revisions]
      subprocess.run(command, check=True, cwd=common.REPO)
      with open(out) as f:
        result['cases'][label] = json.load(f)
      os.remove(out)
  result['load_after'] = common.loadavg()
  text = markdown(result)
  print(text)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


class _no_tree:
  def __enter__(self):
    return ''

  def __exit__(self, *exc):
    return False


if __name__ == '__main__':
  main()
