"""predict: the CLI on real files against the eval pipeline applied to the saved state."""

import functools

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import DIGITS_IMAGE_SIZE
from tiny import tiny_config

from gsa_flax import checkpointing, input_pipeline, predict, train, visualize

NUM_IMAGES = 3


def _test_examples(digits_dir):
  """The first test-split examples: their encoded PNG bytes and labels."""
  builder = input_pipeline.get_builder('digits', digits_dir, image_size=DIGITS_IMAGE_SIZE)
  ds = builder.as_dataset(split='test', decoders={'image': tfds.decode.SkipDecoding()})
  return [(ex['image'], int(ex['label'])) for ex in ds.take(NUM_IMAGES).as_numpy_iterator()]


def _saved_run(digits_dir, workdir):
  """A workdir as training leaves it (config.json, a checkpoint), with random parameters.

  Written by training's own save functions; no training step is compiled. Random normal
  parameters (not the init, whose zero BatchNorm scales flatten the output; scaled so that
  the softmax neither saturates nor flattens) give each image its own ranked classes.
  Returns the state that was saved.
  """
  config = tiny_config(digits_dir)
  model = train.create_model(config, 10)
  tx = train.create_optimizer(config, train.learning_rate_schedule(config, 10, 10))
  init = functools.partial(train.create_train_state, config, model, tx, image_size=16)
  state = jax.jit(init)(jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: 0.35 * rng.normal(size=p.shape).astype(p.dtype), state.params)
  state = state.replace(step=7, params=params)
  train._save_config(config, workdir)
  saver = checkpointing.Checkpointer(workdir, keep=1)
  saver.save(7, train.state_dict(state), {'step': 7})
  saver.wait()
  return state


def _reference(digits_dir, state):
  """Top-5 of the in-memory state on the eval pipeline's first batch.

  Independent of what predict does with files: the images come from the eval pipeline and
  the variables from memory, not from the checkpoint.
  """
  builder = input_pipeline.get_builder('digits', digits_dir, image_size=DIGITS_IMAGE_SIZE)
  iterator, _ = input_pipeline.create_eval_iterator(
    builder, dataset='digits', global_batch_size=8, image_size=DIGITS_IMAGE_SIZE
  )
  batch = next(iterator)
  names = input_pipeline.class_names(builder)
  config = tiny_config(digits_dir)
  in_memory = predict.Loaded(
    config=config,
    model=train.create_model(config, len(names)),
    variables=visualize._local({'params': state.params, 'batch_stats': state.batch_stats}),
    class_names=names,
    builder=builder,
    step=int(state.step),
  )
  probs = predict.probabilities(in_memory, batch['image'][:NUM_IMAGES])
  return [predict.top_k(p, names) for p in probs], batch['label'][:NUM_IMAGES]


def _parse(stdout):
  """``{path: [(name, probability), ...]}`` from predict's output."""
  parsed, current = {}, None
  for line in stdout.splitlines():
    if line.startswith('  '):
      rank, name, prob = line.split()
      assert rank == f'{len(parsed[current]) + 1}.'
      parsed[current].append((name, float(prob)))
    else:
      current = line
      parsed[current] = []
  return parsed


def test_predict_cli(digits_dir, tmp_path, capsys):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  state = _saved_run(digits_dir, str(workdir))
  examples = _test_examples(digits_dir)
  paths = []
  for i, (encoded, _) in enumerate(examples):
    paths.append(tmp_path / f'digit{i}.png')
    paths[-1].write_bytes(encoded)
  (tmp_path / 'notes.txt').write_text('not an image')
  missing = tmp_path / 'missing.jpg'
  args = [str(paths[0]), str(tmp_path / 'notes.txt'), str(paths[1]), str(missing), str(paths[2])]

  status = predict.main([f'--workdir={workdir}', *args])
  out, err = capsys.readouterr()
  assert status == 1, err[-3000:]  # some files failed, not all
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert errors == [
    f'error: {tmp_path / "notes.txt"}: not a decodable image (PNG, JPEG, GIF or BMP)',
    f'error: {missing}: no such file',
  ]
  got = _parse(out)
  assert list(got) == [str(p) for p in paths]  # every image, in order, the bad ones skipped
  want, labels = _reference(digits_dir, state)
  np.testing.assert_array_equal(labels, [label for _, label in examples])  # the same images
  for path, ranked in zip(paths, want, strict=True):
    assert [name for name, _ in got[str(path)]] == [name for name, _ in ranked]
    # Printed with 4 decimals; the three images differ in the third.
    np.testing.assert_allclose([p for _, p in got[str(path)]], [p for _, p in ranked], atol=6e-5)


def test_load_errors(tmp_path, capsys):
  assert predict.main([f'--workdir={tmp_path / "nowhere"}', 'x.png']) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
    f'error: workdir {tmp_path / "nowhere"} does not exist; pass the --workdir of a training run.'
  ]
  assert predict.main([f'--workdir={tmp_path}', 'x.png']) == 2
  assert 'config.json is missing' in capsys.readouterr().err
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(predict.LoadError, match='no checkpoint'):
    predict.load(str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()  # a read-only tool creates nothing


def test_top_k_and_format():
  probs = np.array([0.1, 0.05, 0.3, 0.2, 0.15, 0.2])
  ranked = predict.top_k(probs, ['a', 'b', 'c', 'd', 'e', 'f'])
  assert ranked == [('c', 0.3), ('d', 0.2), ('f', 0.2), ('e', 0.15), ('a', 0.1)]
  assert predict.format_prediction('x.png', ranked[:2]).splitlines() == [
    'x.png',
    '  1. c  0.3000',
    '  2. d  0.2000',
  ]
