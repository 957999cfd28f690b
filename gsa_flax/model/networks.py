"""ResNet (the convolutional baseline) and GSA-ResNet, in one family, and the one place a
config becomes a network (:func:`architecture_of`, :func:`build`).

GSA-ResNet is ResNet (v1.5 bottleneck blocks, stride on the 3x3) with every 3x3
convolution of the residual blocks replaced by a :class:`~gsa_flax.model.layers.GSA` module of
the same widths; where that convolution had stride 2, a 2x2 average pool (stride 2)
follows the GSA module. The convolutional stem is kept (``docs/method.md``, "GSA-ResNet").
``attention_stages`` chooses, per stage, attention or convolution, so "where in the network
global attention pays" is a config change.

Parameters are named for what they are: the stem ``conv_init``/``bn_init``, the blocks
``BottleneckBlock_<i>`` in order, the classifier ``head`` (see :func:`part_of`).
:func:`gsa_flax.model.pretrained.load_pretrained` rebuilds a network from a portable-weights
file (:mod:`gsa_flax.model.weights`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gsa_flax.model.layers import GSA, GSA_KNOBS, GSAOptions

ModuleDef = Any

# Rematerialisation of the residual blocks (``ResNet.remat``): which of a block's
# intermediates the backward pass keeps; the others are recomputed from the block's input.
REMAT_POLICIES: dict[str, Callable[..., bool]] = {
  'block': jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
  'dots': jax.checkpoint_policies.dots_saveable,  # keep conv/matmul outputs, recompute the rest
}

# Names of the top-level parameters outside the residual stages.
STEM = ('conv_init', 'bn_init')
HEAD = 'head'


class BottleneckBlock(nn.Module):
  """ResNet v1.5 bottleneck block; the 3x3 spatial layer is a conv or a GSA module."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  gsa: Callable[..., nn.Module] | None = None  # None: 3x3 convolution

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    residual = x
    y = self.conv(self.filters, (1, 1))(x)
    y = nn.relu(self.norm()(y))
    if self.gsa is None:
      y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)
    else:
      y = self.gsa(self.filters)(y, train=train)
      if self.strides > 1:
        s = (self.strides, self.strides)
        # SAME + count_include_pad=False keeps odd sizes aligned with the strided shortcut.
        y = nn.avg_pool(y, s, s, padding='SAME', count_include_pad=False)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    # Zero-init the last BN scale so each block starts as the identity (Goyal et al. 2017).
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(
        self.filters * 4, (1, 1), (self.strides, self.strides), name='conv_proj'
      )(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ResNet with bottleneck blocks; stages listed in ``attention_stages`` use GSA.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for depth 50.
    num_classes: classifier outputs.
    num_filters: width of the first stage (doubles every stage).
    attention_stages: per stage, True to replace its 3x3 convs by GSA modules; empty means
      the class's default (ResNet: none, GSAResNet: every stage).
    small_stem: a 3x3 stride-1 conv stem without max pooling (small images such as
      CIFAR); False is the ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool).
    num_heads, key_ratio, rel_length, content, positional, position_embedding,
    normalize_queries, positional_softmax, order, implementation: the GSA knobs (see
      :class:`GSA`); ``key_ratio`` sets ``key_features = int(features * key_ratio)``.
    remat: ``''`` (off) or a key of :data:`REMAT_POLICIES`: rematerialise each residual
      block in the backward pass (less activation memory, more compute).
    bn_momentum: BatchNorm momentum everywhere.
    dtype: computation dtype; parameters are always ``param_dtype``.
  """

  stage_sizes: Sequence[int]
  num_classes: int = 1000
  num_filters: int = 64
  attention_stages: Sequence[bool] = ()
  small_stem: bool = False
  gsa: GSAOptions = GSAOptions()
  key_ratio: float = 0.5
  remat: str = ''
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  # Whether stages use GSA when attention_stages is empty (GSAResNet: all of them).
  attention_by_default: ClassVar[bool] = False

  def stage_attention(self) -> tuple[bool, ...]:
    """One bool per stage: True where the 3x3 convolutions are GSA modules."""
    attention = tuple(self.attention_stages) or (self.attention_by_default,) * len(self.stage_sizes)
    if len(attention) != len(self.stage_sizes):
      raise ValueError(
        f'attention_stages has {len(attention)} entries but the network has '
        f'{len(self.stage_sizes)} stages; give one bool per stage.'
      )
    return attention

  @nn.compact
  def __call__(
    self, x: jax.Array, *, train: bool, features: bool = False
  ) -> jax.Array | dict[str, jax.Array]:
    """Maps images ``[batch, height, width, channels]`` to logits ``[batch, num_classes]``.

    Args:
      x: images ``[batch, height, width, channels]``.
      train: batch statistics (and their update) in the BatchNorms, else running averages.
      features: return the output of every stage instead of the logits, for dense
        prediction heads: ``{'stage1': ..., 'stageN': ...}``, each ``[batch, height / s,
        width / s, 4 * num_filters * 2**(i)]`` with strides ``s`` of 4, 8, 16, 32 behind the
        ImageNet stem (1, 2, 4, 8 behind the small stem). The classifier is not applied.

    Returns:
      Logits ``[batch, num_classes]`` in float32, or the stage outputs (compute dtype).
    """
    attention = self.stage_attention()
    conv = functools.partial(
      nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    if self.small_stem:
      x = conv(self.num_filters, (3, 3), name='conv_init')(x)
      x = nn.relu(norm(name='bn_init')(x))
    else:
      x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='conv_init')(x)
      x = nn.relu(norm(name='bn_init')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    if self.remat and self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat={self.remat!r}; valid: "" (off), {", ".join(REMAT_POLICIES)}.')
    block = BottleneckBlock
    if self.remat:
      # `train` (argument 2, counting the module) is static: it selects BatchNorm's mode.
      block = nn.remat(BottleneckBlock, policy=REMAT_POLICIES[self.remat], static_argnums=(2,))
    outputs = {}
    index = 0
    for i, block_count in enumerate(self.stage_sizes):
      gsa = None
      if attention[i]:
        gsa = functools.partial(
          _GSAFor,
          key_ratio=self.key_ratio,
          bn_momentum=self.bn_momentum,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          **dataclasses.asdict(self.gsa),
        )
      for j in range(block_count):
        x = block(
          self.num_filters * 2**i,
          conv=conv,
          norm=norm,
          strides=2 if i > 0 and j == 0 else 1,
          gsa=gsa,
          name=f'{BottleneckBlock.__name__}_{index}',  # the same names with or without remat
        )(x, train)
        index += 1
      outputs[f'stage{i + 1}'] = x
    if features:
      return outputs
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name=HEAD)(x)
    return x.astype(jnp.float32)


def _GSAFor(features: int, *, key_ratio: float, **kwargs) -> GSA:  # noqa: N802
  """A GSA module of ``features`` value channels and ``key_ratio * features`` key channels."""
  return GSA(features, key_features=int(features * key_ratio), **kwargs)


class GSAResNet(ResNet):
  """ResNet whose residual-block 3x3 convolutions are all GSA modules (Shen et al. 2020)."""

  attention_by_default: ClassVar[bool] = True


ResNet26 = functools.partial(ResNet, stage_sizes=(1, 2, 4, 1))
ResNet38 = functools.partial(ResNet, stage_sizes=(2, 3, 5, 2))
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
GSAResNet26 = functools.partial(GSAResNet, stage_sizes=(1, 2, 4, 1))
GSAResNet38 = functools.partial(GSAResNet, stage_sizes=(2, 3, 5, 2))
GSAResNet50 = functools.partial(GSAResNet, stage_sizes=(3, 4, 6, 3))
GSAResNet101 = functools.partial(GSAResNet, stage_sizes=(3, 4, 23, 3))

# Small networks for tests, CPU runs and the embedded digits set: one block per stage,
# a quarter of the width, the small stem.
ResNetTiny = functools.partial(
  ResNet, stage_sizes=(1, 1, 1, 1), num_filters=16, small_stem=True, gsa=GSAOptions(num_heads=4)
)
GSAResNetTiny = functools.partial(
  GSAResNet,
  stage_sizes=(1, 1, 1, 1),
  num_filters=16,
  small_stem=True,
  gsa=GSAOptions(num_heads=4),
)

MODELS: dict[str, Callable[..., ResNet]] = {
  'resnet26': ResNet26,
  'resnet38': ResNet38,
  'resnet50': ResNet50,
  'resnet101': ResNet101,
  'gsa_resnet26': GSAResNet26,
  'gsa_resnet38': GSAResNet38,
  'gsa_resnet50': GSAResNet50,
  'gsa_resnet101': GSAResNet101,
  'resnet_tiny': ResNetTiny,
  'gsa_resnet_tiny': GSAResNetTiny,
}


def counterpart(name: str) -> str:
  """The convolutional ResNet of a GSA-ResNet and vice versa (``gsa_resnet50`` <-> ``resnet50``)."""
  return name[len('gsa_') :] if name.startswith('gsa_') else 'gsa_' + name


def create_model(name: str, **kwargs: Any) -> ResNet:
  """Builds a registered network by name.

  Args:
    name: one of :data:`MODELS` (``resnet50``, ``gsa_resnet50``, ...).
    **kwargs: module attributes to set or override (``num_classes``, ``dtype``, GSA knobs).

  Returns:
    The (unbound) linen module.
  """
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; valid: {", ".join(MODELS)}.')
  return MODELS[name](**kwargs)


def downsampling(model: ResNet) -> int:
  """Total spatial stride of ``model`` (stem and stages), for input-size checks."""
  stem = 1 if model.small_stem else 4
  return stem * 2 ** (len(model.stage_sizes) - 1)


def init_variables(model: ResNet, rng: jax.Array, image_size: int) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` of ``model`` initialised at ``image_size``.

  Global position tables get the length of each GSA layer's feature map at this
  resolution (``docs/method.md``, "Positional attention").

  Args:
    model: the network.
    rng: the initialisation key.
    image_size: height and width of the (square, RGB) images it is initialised for.
  """
  return model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)


def abstract_variables(model: ResNet, image_size: int) -> dict[str, Any]:
  """The shapes and dtypes of :func:`init_variables` (``jax.ShapeDtypeStruct`` leaves).

  Nothing is computed: cheap even for a GSA-ResNet-101 at 384x384.
  """
  return jax.eval_shape(lambda rng: init_variables(model, rng, image_size), jax.random.key(0))


# What a real network of this family uses at most (ResNet-200 has 36 blocks in a stage; the
# widest ResNets are 4x the 64 channels of the first stage; the paper uses 8 heads). A config
# beyond them is a mistake, refused before a network that size is built (building and
# shaping take time and memory in proportion to the blocks and widths a config claims).
MAX_STAGES = 8
MAX_BLOCKS_PER_STAGE = 64
MAX_FILTERS = 1024
MAX_HEADS = 64
# The largest input side a network is shaped for (position tables grow with it).
MAX_IMAGE_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A network as an experiment names it: everything :func:`build` needs but the classes.

  The trainer makes one from the config's model fields (``configs/default.py`` documents
  them); nothing else of the experiment reaches the model.

  Attributes:
    name: one of :data:`MODELS`.
    stage_sizes: blocks per stage; ``()`` keeps the named network's depth.
    num_filters: width of the first stage.
    small_stem: the 3x3 stem without max pool (small images) instead of ImageNet's.
    dtype: the compute dtype's name (parameters stay float32).
    remat: :data:`REMAT_POLICIES` key, or ``''`` for none.
    key_ratio: ``d_k = key_ratio * d_out`` in every GSA layer.
    attention_stages: one bool per stage (GSA or convolution); ``()``: the network's own.
    gsa: the knobs of every GSA layer.
  """

  name: str
  stage_sizes: tuple[int, ...] = ()
  num_filters: int = 64
  small_stem: bool = False
  dtype: str = 'float32'
  remat: str = ''
  key_ratio: float = 0.5
  attention_stages: tuple[bool, ...] = ()
  gsa: GSAOptions = GSAOptions()


def architecture_of(config: Mapping[str, Any]) -> Architecture:
  """The network an experiment config (or the record in a weights file) describes.

  The one translation from config fields to the model: it reads the model fields of
  ``configs/default.py`` (``model``, ``stage_sizes``, ``num_filters``, ``small_stem``,
  ``dtype``, ``remat`` and ``gsa.*``) and nothing else.
  """
  gsa = dict(config['gsa'])
  knobs = {name: gsa[name] for name in GSA_KNOBS if name in gsa}
  # The config spells "none" as 0 and '' (ml_collections fields keep one type).
  knobs['rel_length'] = knobs.get('rel_length') or None
  knobs['implementation'] = knobs.get('implementation') or None
  return Architecture(
    name=config['model'],
    stage_sizes=tuple(config['stage_sizes']),
    num_filters=config['num_filters'],
    small_stem=config['small_stem'],
    dtype=config['dtype'],
    remat=config['remat'],
    key_ratio=gsa['key_ratio'],
    attention_stages=tuple(gsa['attention_stages']),
    gsa=GSAOptions(**knobs),
  )


def check_architecture(architecture: Architecture) -> None:
  """Checks that ``architecture`` is within what a real network uses (the ``MAX_*`` bounds).

  Raises:
    ValueError: one line naming the field, its value and the bound.
  """
  sizes = tuple(architecture.stage_sizes)
  bounds = [
    ('stage_sizes', sizes, len(sizes) <= MAX_STAGES, f'at most {MAX_STAGES} stages'),
    (
      'stage_sizes',
      sizes,
      all(isinstance(n, int) and 0 < n <= MAX_BLOCKS_PER_STAGE for n in sizes),
      f'1 to {MAX_BLOCKS_PER_STAGE} blocks per stage',
    ),
    (
      'num_filters',
      architecture.num_filters,
      isinstance(architecture.num_filters, int) and 0 < architecture.num_filters <= MAX_FILTERS,
      f'1 to {MAX_FILTERS} channels',
    ),
    (
      'gsa.num_heads',
      architecture.gsa.num_heads,
      isinstance(architecture.gsa.num_heads, int) and 0 < architecture.gsa.num_heads <= MAX_HEADS,
      f'1 to {MAX_HEADS} heads',
    ),
  ]
  for name, value, ok, bound in bounds:
    if not ok:
      raise ValueError(f'{name}={value!r} is beyond any real network: use {bound}.')


def build(architecture: Architecture, num_classes: int) -> ResNet:
  """The network an :class:`Architecture` names, with ``num_classes`` outputs.

  Returns:
    The (unbound) linen module.
  """
  kwargs = dict(
    num_classes=num_classes,
    num_filters=architecture.num_filters,
    small_stem=architecture.small_stem,
    dtype=jnp.dtype(architecture.dtype),
    key_ratio=architecture.key_ratio,
    remat=architecture.remat,
    gsa=architecture.gsa,
  )
  if architecture.stage_sizes:
    kwargs['stage_sizes'] = tuple(architecture.stage_sizes)
  if architecture.attention_stages:
    kwargs['attention_stages'] = tuple(architecture.attention_stages)
  return create_model(architecture.name, **kwargs)


def part_of(model: ResNet, name: str) -> str:
  """Which part of ``model`` a top-level parameter belongs to.

  Args:
    model: the network.
    name: a key of its ``params`` (``conv_init``, ``BottleneckBlock_3``, ``head``, ...).

  Returns:
    ``'stem'``, ``'stage1'`` ... ``'stageN'`` or ``'head'``.
  """
  if name in STEM:
    return 'stem'
  if name == HEAD:
    return 'head'
  prefix = BottleneckBlock.__name__ + '_'
  if name.startswith(prefix) and name[len(prefix) :].isdigit():
    block = int(name[len(prefix) :])
    first = 0
    for i, count in enumerate(model.stage_sizes):
      if block < first + count:
        return f'stage{i + 1}'
      first += count
  raise ValueError(f'parameter {name!r} belongs to no part of {type(model).__name__}.')
