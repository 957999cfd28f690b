"""Datasets: the names the project supports, and TFDS builders that ship inside the package.

Importing this package is cheap (no TensorFlow); ``gsa_flax.datasets.digits`` registers the
embedded ``digits`` builder with TFDS when imported (``input_pipeline`` does so).
"""

# The datasets config.dataset accepts; the first needs no download.
NAMES: tuple[str, ...] = ('digits', 'cifar100', 'imagenet2012')
