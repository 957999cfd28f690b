"""ResNet / GSA-ResNet: parameter counts against closed forms, shapes, modes, registry."""

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from configs import default, imagenet, imagenet_resnet50
from gsa_flax.model import networks, pretrained, transfer, weights
from gsa_flax.model.layers import GSAOptions

DEPTHS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _param_count(model, size=224):
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  return sum(math.prod(p.shape) for p in jax.tree.leaves(shapes['params']))


def closed_form_count(stage_sizes, attention, *, image=224, width=64, classes=1000, key_ratio=0.5):
  """Parameters of a (GSA-)ResNet by arithmetic over its architecture (docs/method.md)."""
  total = 7 * 7 * 3 * width + 2 * width  # stem conv + BN
  size = math.ceil(math.ceil(image / 2) / 2)  # 7x7/2 conv, 3x3/2 max pool
  c_in = width
  for i, blocks in enumerate(stage_sizes):
    f = width * 2**i
    for j in range(blocks):
      stride = 2 if i > 0 and j == 0 else 1
      total += c_in * f + 2 * f  # 1x1 reduce + BN
      if attention[i]:
        dk = int(f * key_ratio)
        rel_length = 2 * size - 1  # global, at the block's input resolution
        total += f * (2 * dk + f) + 2 * rel_length * dk + 2 * f  # qkv, R_col + R_row, BN
      else:
        total += 3 * 3 * f * f
      total += 2 * f  # BN after the spatial layer
      total += f * 4 * f + 2 * 4 * f  # 1x1 expand + BN
      if stride != 1 or c_in != 4 * f:
        total += c_in * 4 * f + 2 * 4 * f  # projection shortcut + BN
      size = math.ceil(size / stride)
      c_in = 4 * f
  return total + c_in * classes + classes


def test_resnet50_has_the_standard_parameter_count():
  assert _param_count(networks.ResNet50(num_classes=1000)) == 25_557_032
  assert closed_form_count(DEPTHS[50], (False,) * 4) == 25_557_032


@pytest.mark.parametrize('depth', [26, 38, 50, 101])
def test_parameter_counts_match_closed_form(depth):
  gsa = networks.create_model(f'gsa_resnet{depth}')
  assert _param_count(gsa) == closed_form_count(DEPTHS[depth], (True,) * 4)
  conv = networks.create_model(f'resnet{depth}')
  assert _param_count(conv) == closed_form_count(DEPTHS[depth], (False,) * 4)


def test_attention_stages_and_key_ratio_counts():
  model = networks.GSAResNet26(attention_stages=(False, False, True, True), key_ratio=0.25)
  want = closed_form_count(DEPTHS[26], (False, False, True, True), key_ratio=0.25)
  assert _param_count(model) == want


@pytest.mark.parametrize('name', ['resnet_tiny', 'gsa_resnet_tiny'])
def test_non_square_forward_and_train_mode(name):
  # Two stages (one strided, with shortcut projection) keep the compile short.
  model = networks.create_model(name, num_classes=7, stage_sizes=(1, 1))
  x = jnp.asarray(np.random.standard_normal((3, 21, 13, 3)), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  logits, updates = train_apply(variables, x)
  assert np.isfinite(np.asarray(logits)).all()
  changed = jax.tree.map(
    lambda a, b: not np.allclose(a, b), variables['batch_stats'], updates['batch_stats']
  )
  assert all(jax.tree.leaves(changed))


def test_gsa_resnet_uses_gsa_in_every_block_and_no_3x3_conv():
  model = networks.GSAResNet26(num_classes=10)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  )
  blocks = [k for k in shapes['params'] if k.startswith('BottleneckBlock')]
  assert len(blocks) == sum(DEPTHS[26])
  for name in blocks:
    block = shapes['params'][name]
    assert 'GSA_0' in block
    kernels = [leaf.shape for leaf in jax.tree.leaves(block) if leaf.ndim == 4]
    assert all(k[:2] == (1, 1) for k in kernels)


def test_bfloat16_close_to_float32():
  model = networks.GSAResNetTiny(num_classes=10, stage_sizes=(1, 1))
  x = jnp.asarray(np.random.standard_normal((2, 16, 24, 3)), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x)
  # Non-zero final BN scales so the residual branches contribute.
  variables = jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, variables)
  f32 = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  bf16_model = networks.GSAResNetTiny(num_classes=10, stage_sizes=(1, 1), dtype=jnp.bfloat16)
  bf16 = jax.jit(lambda v, x: bf16_model.apply(v, x, train=False))(variables, x)
  err = np.abs(np.asarray(bf16) - np.asarray(f32)).max() / np.abs(np.asarray(f32)).max()
  assert err < 5e-2


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match='gsa_resnet50') as info:
    networks.create_model('gsa_resnet51')
  assert 'resnet101' in str(info.value)


def test_downsampling_factor():
  assert networks.downsampling(networks.ResNet50()) == 32
  assert networks.downsampling(networks.GSAResNetTiny()) == 8


@pytest.mark.parametrize('config', [imagenet.get_config(), imagenet_resnet50.get_config()])
def test_build_from_config_matches_closed_form(config):
  model = networks.build(networks.architecture_of(config), num_classes=1000)
  attention = config.model.startswith('gsa_')
  assert _param_count(model) == closed_form_count(DEPTHS[50], (attention,) * 4)
  assert model.dtype == jnp.bfloat16 and model.gsa.num_heads == 8


def test_counterpart_names():
  for depth in DEPTHS:
    assert networks.counterpart(f'gsa_resnet{depth}') == f'resnet{depth}'
    assert networks.counterpart(f'resnet{depth}') == f'gsa_resnet{depth}'
  assert all(networks.counterpart(name) in networks.MODELS for name in networks.MODELS)


@pytest.mark.parametrize('small_stem,strides', [(False, (4, 8, 16, 32)), (True, (1, 2, 4, 8))])
def test_features_are_the_stage_outputs(small_stem, strides):
  model = networks.GSAResNetTiny(
    num_classes=5, small_stem=small_stem, num_filters=8, gsa=GSAOptions(num_heads=2)
  )
  x = jnp.asarray(np.random.standard_normal((2, 64, 32, 3)), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  features = jax.jit(lambda v, x: model.apply(v, x, train=False, features=True))(variables, x)
  assert list(features) == ['stage1', 'stage2', 'stage3', 'stage4']
  for i, (name, stride) in enumerate(zip(features, strides, strict=True)):
    assert features[name].shape == (2, 64 // stride, 32 // stride, 4 * 8 * 2**i), name
  # The last stage's output, pooled and classified, is the logits.
  head = variables['params'][networks.HEAD]
  pooled = np.asarray(features['stage4']).mean(axis=(1, 2))
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  np.testing.assert_allclose(
    pooled @ np.asarray(head['kernel']) + np.asarray(head['bias']), logits, rtol=1e-4, atol=1e-5
  )


def test_every_parameter_belongs_to_a_part():
  model = networks.GSAResNet26(num_classes=10)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  )
  parts = [networks.part_of(model, name) for name in shapes['params']]
  blocks = {f'stage{i + 1}': n for i, n in enumerate(DEPTHS[26])}
  # Each block holds one GSA module; the stem has a conv and a BN; the head one Dense.
  assert {p: parts.count(p) for p in blocks} == blocks
  assert parts.count('stem') == 2 and parts.count('head') == 1
  with pytest.raises(ValueError, match='no part'):
    networks.part_of(model, 'Dense_7')


def _tiny_config(**overrides):
  config = default.get_config()
  config.stage_sizes = (1, 1)
  config.num_filters = 8
  config.gsa.num_heads = 2
  config.gsa.attention_stages = (True, False)  # a tuple in the config, a list in the file
  config.dtype = 'bfloat16'
  for name, value in overrides.items():
    config[name] = value
  return config


def _random(shapes, rng):
  return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes)


def test_load_pretrained_rebuilds_the_exported_network(tmp_path):
  rng = np.random.default_rng(125)
  config = _tiny_config()
  model = networks.build(networks.architecture_of(config), num_classes=7)
  variables = _random(networks.abstract_variables(model, config.image_size), rng)
  card = weights.make_card(config, variables, num_classes=7)
  path = weights.export(tmp_path / 'w.msgpack', config, variables, card)
  loaded = pretrained.load_pretrained(path)
  assert type(loaded.model) is networks.GSAResNet and loaded.card == card
  assert loaded.model.num_classes == 7 and loaded.model.dtype == jnp.bfloat16
  assert tuple(loaded.model.stage_attention()) == (True, False)
  assert loaded.config.to_dict() == {
    **config.to_dict(),
    'stage_sizes': [1, 1],
    'gsa': {**config.gsa.to_dict(), 'attention_stages': [True, False]},
  }
  x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(
    np.asarray(loaded.model.apply(loaded.variables, x, train=False)),
    np.asarray(model.apply(variables, x, train=False)),
  )


def test_load_pretrained_refuses_variables_its_config_does_not_describe(tmp_path):
  config = _tiny_config()
  variables = _random(
    networks.abstract_variables(networks.build(networks.architecture_of(config), 10), 16),
    np.random.default_rng(126),
  )
  wider = _tiny_config(num_filters=16)  # the file claims another width
  path = weights.export(tmp_path / 'w.msgpack', wider, variables, {})
  with pytest.raises(weights.WeightsError) as error:
    pretrained.load_pretrained(path)
  message = str(error.value)
  assert str(path) in message and '\n' not in message
  assert (
    'params/BottleneckBlock_0/BatchNorm_0/bias is (8,) in the file, (16,) in the network' in message
  )


@pytest.mark.parametrize(
  'stage_sizes, words',
  [
    ((3000, 1, 1, 1), 'stage_sizes=(3000, 1, 1, 1) is beyond any real network: use 1 to 64'),
    # Within the bounds, but 41 blocks where the file holds 2: refused from the file's tree,
    # before 41 blocks are shaped.
    ((40, 1), 'stage_sizes [40, 1]: 41 residual blocks); the file holds 2'),
  ],
)
def test_a_file_claiming_a_larger_network_is_refused_before_it_is_built(
  tmp_path, stage_sizes, words
):
  config = _tiny_config()
  variables = _random(
    networks.abstract_variables(networks.build(networks.architecture_of(config), 10), 16),
    np.random.default_rng(127),
  )
  path = weights.export(
    tmp_path / 'w.msgpack', _tiny_config(stage_sizes=stage_sizes), variables, {}
  )
  started = time.perf_counter()
  with pytest.raises(weights.WeightsError) as error:
    pretrained.load_pretrained(path)
  assert time.perf_counter() - started < 2  # 400 blocks took 137 s to build
  message = str(error.value)
  assert message.startswith(str(path)) and words in message and '\n' not in message, message


def test_a_file_written_by_flax_with_sorted_keys_is_read_by_every_loader(tmp_path):
  rng = np.random.default_rng(128)
  config = _tiny_config()
  model = networks.build(networks.architecture_of(config), num_classes=7)
  variables = _random(networks.abstract_variables(model, config.image_size), rng)
  ours = weights.export(tmp_path / 'ours.msgpack', config, variables, {'model': 'x'})
  contents = serialization.msgpack_restore(ours.read_bytes())
  resaved = serialization.msgpack_serialize(contents)  # flax's own writer: keys sorted
  assert next(iter(serialization.msgpack_restore(resaved))) == 'card'  # the tag is not first
  path = tmp_path / 'flax.msgpack'
  path.write_bytes(resaved)
  weights.check_header(path)
  assert transfer.locate(path).kind == 'weights'  # what config.init_from reads first
  loaded = pretrained.load_pretrained(path)  # what it reads next
  x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(
    np.asarray(loaded.model.apply(loaded.variables, x, train=False)),
    np.asarray(model.apply(variables, x, train=False)),
  )


def test_remat_changes_memory_not_the_network():
  """The same parameters and (to float32 rounding) the same gradients as without remat."""
  plain = networks.GSAResNetTiny(
    num_classes=5, stage_sizes=(1, 1), num_filters=8, gsa=GSAOptions(num_heads=2)
  )
  x = jnp.asarray(np.random.standard_normal((2, 16, 12, 3)), jnp.float32)
  variables = plain.init(jax.random.key(1), x, train=False)
  # Non-zero final BN scales so every layer of the residual branches gets a gradient.
  variables = jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, variables)

  def grads(model):
    def loss(params):
      logits, _ = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        x,
        train=True,
        mutable=['batch_stats'],
      )
      return jnp.sum(logits * jnp.arange(5.0))

    return jax.jit(jax.grad(loss))(variables['params'])

  want = grads(plain)
  for remat in networks.REMAT_POLICIES:
    rematted = plain.clone(remat=remat)
    shapes = jax.eval_shape(functools.partial(rematted.init, train=False), jax.random.key(1), x)
    assert jax.tree.structure(shapes) == jax.tree.structure(variables), remat
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max()),
      want,
      grads(rematted),
    )
  with pytest.raises(ValueError, match='remat='):
    jax.eval_shape(
      lambda: networks.GSAResNetTiny(remat='everything').init(jax.random.key(0), x, train=False)
    )
