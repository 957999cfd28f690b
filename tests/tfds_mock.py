"""Real TFDS metadata for cifar100 / imagenet2012 with tiny splits, for tfds.testing.mock_data.

TFDS ships no metadata for its mock, so ``mock_data(policy=USE_FILES)`` is pointed at a data
dir holding the datasets' real ``dataset_info.json``/features (from the builders that ship
with TFDS) with split sizes that match the number of mocked examples. Nothing is downloaded.
"""

import tensorflow_datasets as tfds

from gsa_flax import input_pipeline

MOCK_EXAMPLES = 12


def write_mock_metadata(root: str, num_examples: int = MOCK_EXAMPLES) -> str:
  for name in ['cifar100', 'imagenet2012']:
    builder = tfds.builder(name, data_dir=str(root))
    splits = [input_pipeline.train_split_name(name), input_pipeline.eval_split_name(name)]
    builder.info.set_splits(
      tfds.core.SplitDict(
        [
          tfds.core.SplitInfo(
            name=split,
            shard_lengths=[num_examples],
            num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
              data_dir=builder.data_path,
              dataset_name=name,
              split=split,
              filetype_suffix='tfrecord',
            ),
          )
          for split in splits
        ]
      )
    )
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)
  return str(root)


def mock(root: str, num_examples: int = MOCK_EXAMPLES):
  """Context manager: tfds builders of cifar100/imagenet2012 serve random examples."""
  return tfds.testing.mock_data(
    num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=root
  )
