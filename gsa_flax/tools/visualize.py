r"""Attention maps of a trained run as one PNG, for its first eval images or image files.

  python -m gsa_flax.tools.visualize --workdir=runs/gsa --output=attention.png [IMAGE ...]

Rows are GSA layers (``--layers``, default the first and the last), columns are images;
each row shows the query pixel, its content weights over the image and its positional
weights along its column and row (see :mod:`gsa_flax.tools.attention_maps`). The network
is the run's newest intact checkpoint: the moving average of its parameters when the run
kept one (``--raw`` for the raw parameters).

Exit status: 0 when every image was drawn, 1 when some image file failed, 2 when the workdir
has no usable config or checkpoint or a flag is wrong.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np
from absl import flags

from gsa_flax import files
from gsa_flax.data import datasets, input_pipeline
from gsa_flax.tools import attention_maps, cli, images, plots
from gsa_flax.train import restore

# The most images one figure shows (one column each): laying out a figure takes time and
# memory in proportion to its columns, and beyond a few dozen nothing can be read in it.
MAX_IMAGES = 32


def save_attention_map(
  path: str,
  model: nn.Module,
  variables: Mapping[str, Any],
  batch: np.ndarray,
  *,
  spec: datasets.DatasetSpec,
  layers: Sequence[int | str] = (0, -1),
  query: tuple[int, int] | None = None,
  head: int | None = None,
  dpi: int = 80,
) -> str:
  """Saves the attention maps of ``layers`` for a batch of images as one PNG.

  Args:
    path: the PNG to write.
    model: the network; ``variables``: its params and batch_stats.
    batch: ``[batch, height, width, 3]`` preprocessed like eval.
    spec: the dataset the images were normalized for (to draw them).
    layers: GSA layers by index (``0`` first, ``-1`` last) or module path.
    query: ``(x, y)`` in each layer's map; None: each layer's center pixel.
    head: one head, or None for the mean over heads.
    dpi: resolution of the PNG.

  Returns:
    ``path``.

  Raises:
    ValueError: ``model`` has no GSA layer, or no such layer, head or query, or more than
      :data:`MAX_IMAGES` images.
    gsa_flax.files.FileError: ``path`` cannot be written; a file already there is unchanged.
  """
  if not 0 < len(batch) <= MAX_IMAGES:
    raise ValueError(f'{len(batch)} images: a figure shows 1 to {MAX_IMAGES}.')
  chosen = attention_maps.select(attention_maps.capture(model, variables, batch), layers, head)
  shown = [plots.display_image(image, spec) for image in batch]
  maps = [
    [attention_maps.attention_maps(c, query, index=i) for c in chosen] for i in range(len(batch))
  ]
  figure = io.BytesIO()
  kind = os.path.splitext(str(path))[1].lstrip('.').lower() or 'png'
  plots.attention_grid(shown, maps, head=head).savefig(figure, format=kind, dpi=dpi)
  files.write_atomically(path, figure.getvalue())
  return path


def run(
  workdir: str,
  output: str,
  paths: Sequence[str] = (),
  *,
  layers: Sequence[int | str] = (0, -1),
  query: tuple[int, int] | None = None,
  head: int | None = None,
  count: int = 3,
  data_dir: str | None = None,
  raw: bool = False,
) -> int:
  """Draws the attention maps of a trained run to ``output``; returns the exit status.

  Args:
    workdir: the training run.
    output: the PNG to write.
    paths: image files; none: the first ``count`` eval images.
    layers, query, head: see :func:`save_attention_map`.
    count: eval images drawn when no file is given, 1 to :data:`MAX_IMAGES`.
    data_dir: TFDS data dir of the eval images; None: the run's.
    raw: draw the raw parameters' maps even when the run kept a moving average of them
      (which is drawn by default).

  Returns:
    0, or 1 when some image file could not be read (the others are drawn).

  Raises:
    WorkdirError: the workdir has no usable config or checkpoint.
    ValueError: no such layer, head or query; ``count`` or the files more than
      :data:`MAX_IMAGES`.
    gsa_flax.files.FileError: ``output`` cannot be written.
  """
  # What can be checked without the network is checked before it is read.
  if not 0 < count <= MAX_IMAGES:
    raise ValueError(f'--count={count}: draw 1 to {MAX_IMAGES} eval images.')
  if len(paths) > MAX_IMAGES:
    raise ValueError(f'{len(paths)} image files: a figure shows at most {MAX_IMAGES}.')
  files.check_writable(output)
  trained = restore.load(workdir, raw=raw)
  config = trained.config
  spec = datasets.get(config.dataset)
  failed = 0
  if paths:
    decoded = []
    for path in paths:
      try:
        decoded.append(images.read(path, spec, config.image_size))
      except images.ImageError as error:
        cli.error(f'{path}: {error}')
        failed += 1
    if not decoded:
      return 1
    batch = np.stack(decoded)
  else:
    builder = input_pipeline.get_builder(
      spec, data_dir or config.get('data_dir') or None, image_size=config.image_size
    )
    batch, _ = input_pipeline.eval_images(
      builder, spec=spec, image_size=config.image_size, count=count
    )
  save_attention_map(
    output,
    trained.model,
    trained.variables,
    batch,
    spec=spec,
    layers=layers,
    query=query,
    head=head,
  )
  print(f'wrote {output} ({len(batch)} images)')
  return 1 if failed else 0


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> int:
  if not FLAGS.workdir:
    cli.fail('--workdir is required: the workdir of a training run.')
  cli.check_backend()
  try:
    query = tuple(int(v) for v in FLAGS.query) if FLAGS.query else None
    return run(
      FLAGS.workdir,
      FLAGS.output,
      argv[1:],
      layers=FLAGS.layers,
      query=query,
      head=FLAGS.head,
      count=FLAGS.count,
      data_dir=FLAGS.data_dir,
      raw=FLAGS.raw,
    )
  except ValueError as error:
    cli.fail(str(error))


if __name__ == '__main__':
  # Flags exist only when the module runs as a program: importing it defines none.
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json, checkpoints).')
  flags.DEFINE_string('output', 'attention_map.png', 'PNG to write.')
  flags.DEFINE_list('layers', ['0', '-1'], 'GSA layers: indices in call order (-1: last) or paths.')
  flags.DEFINE_list('query', [], 'Query pixel "x,y" in each layer; default: the center.')
  flags.DEFINE_integer('head', None, 'One head; default: the mean over heads.', lower_bound=0)
  flags.DEFINE_integer(
    'count',
    3,
    'Eval images to draw when no IMAGE is given.',
    lower_bound=1,
    upper_bound=MAX_IMAGES,
  )
  flags.DEFINE_string('data_dir', None, "TFDS data dir of the eval images; default: the run's.")
  flags.DEFINE_bool(
    'raw', False, 'The raw parameters, not their moving average (if the run kept one).'
  )
  cli.run(main)
