"""The kernels against the einsum ops on the device a run is about to train on.

The Pallas kernels are proven by compiling for each accelerator, but a compile does not
prove the values: a wrong result on a new chip, compiler or driver would otherwise first
show as a run that learns worse. Before a run's first step, :func:`verify` takes every
distinct GSA layer geometry of the network (input size, channels, heads, ``d_k``, the
knobs), at a small batch, and compares the layer on the kernel path with the same layer on
the einsum path: the training forward pass (batch statistics), the evaluation forward pass
and the gradients of the parameters and of the input, in the run's compute dtype. Its
cost is two small compiles per geometry (seven geometries for GSA-ResNet-50 at 224); on
CPU the kernels run in the Pallas interpreter, tens of seconds per geometry.

An error is the largest absolute difference of a result over the largest magnitude of the
einsum path's (so one scale serves every layer and output). A wrong kernel (a transposed
axis, a wrong offset, a missing branch) is off by tens of percent; rounding is not:
:data:`TOLERANCE` leaves room for bfloat16's 8 bits of mantissa summed over a layer, and
the einsum path runs with float32 matmuls at full precision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gsa_flax import errors
from gsa_flax.model import dispatch
from gsa_flax.model.layers import GSA

# Largest error (relative to the einsum path's largest magnitude) accepted, per compute dtype.
TOLERANCE = {'float32': 1e-2, 'bfloat16': 5e-2, 'float16': 5e-2}
FIX = '--config.gsa.implementation=xla'


class SelfCheckError(errors.UserError):
  """The kernels and the einsum ops disagree on this device.

  Not a mistake of the user, but one the user fixes (with :data:`FIX`): the command lines
  print it as one line, as they do a user error."""


@dataclasses.dataclass(frozen=True)
class Layer:
  """One distinct GSA layer geometry of a network.

  Attributes:
    name: the path of its first instance in the network (``'stage1/block0/gsa'``).
    module: the layer, unbound.
    input_shape: its input ``[batch, height, width, channels]`` at the check's batch.
    dtype: its input's dtype.
  """

  name: str
  module: GSA
  input_shape: tuple[int, ...]
  dtype: Any

  def describe(self) -> str:
    """``'stage1/gsa (56x56, 64 -> 64 channels, 8 heads, d_k 32)'``."""
    _, h, w, c = self.input_shape
    m = self.module
    dk = m.features // 2 if m.key_features is None else m.key_features
    return f'{self.name} ({h}x{w}, {c} -> {m.features} channels, {m.num_heads} heads, d_k {dk})'


@dataclasses.dataclass(frozen=True)
class Result:
  """What one layer's check found.

  Attributes:
    layer: the layer.
    errors: ``{'train output', 'eval output', 'parameter gradients', 'input gradient'}``
      -> error (see the module docstring).
    tolerance: the largest error accepted.
  """

  layer: Layer
  errors: dict[str, float]
  tolerance: float

  @property
  def ok(self) -> bool:
    """Every error within the tolerance (a NaN is not)."""
    return all(e <= self.tolerance for e in self.errors.values())

  @property
  def worst(self) -> tuple[str, float]:
    """The result with the largest error (a NaN first)."""
    return max(self.errors.items(), key=lambda kv: np.inf if np.isnan(kv[1]) else kv[1])


def _kernel_capable(module: GSA) -> bool:
  return module.position_embedding == 'relative' and module.positional != 'none'


def _key(module: GSA, x) -> tuple:
  fields = tuple(
    (f.name, getattr(module, f.name))
    for f in dataclasses.fields(module)
    if f.name not in ('parent', 'name')
  )
  return (tuple(x.shape[1:]), jnp.dtype(x.dtype).name, fields)


def gsa_layers(model: nn.Module, image_size: int, *, batch: int = 2) -> list[Layer]:
  """The distinct GSA layer geometries of ``model`` on ``image_size`` images that the
  kernels cover (relative embeddings, a positional branch), in network order.

  Args:
    model: a network (e.g. :func:`gsa_flax.model.networks.build`'s) or a GSA layer.
    image_size: the images' height and width.
    batch: the batch each layer is checked at.

  Returns:
    One :class:`Layer` per distinct geometry (nothing is computed: shapes only).
  """
  found: dict[tuple, Layer] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, GSA) and context.method_name == '__call__' and _kernel_capable(module):
      x = args[0]
      key = _key(module, x)
      if key not in found:
        unbound = module.clone(parent=None, name=None)
        shape = (batch, *x.shape[1:])
        found[key] = Layer('/'.join(module.path) or 'gsa', unbound, shape, x.dtype)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return list(found.values())


def _error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(float(np.abs(want).max()), 1e-12)
  return float(np.abs(got - want).max() / scale)


def _results(module: GSA, variables, x, g):
  def loss(params, x):
    out, _ = module.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(out.astype(jnp.float32) * g), out

  (_, train_out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
    variables['params'], x
  )
  eval_out = module.apply(variables, x, train=False)
  return train_out, eval_out, grads[0], grads[1]


def check_layer(
  layer: Layer,
  *,
  implementation: str | None = 'pallas',
  candidate: Callable[[GSA], nn.Module] | None = None,
  seed: int = 0,
) -> Result:
  """One layer on the kernel path against the einsum path, on random inputs.

  Args:
    layer: the geometry.
    implementation: the kernel path's ``implementation`` (``None``: what the device takes
      by default; ``'pallas'``: the kernels, in the interpreter on CPU).
    candidate: builds the module checked from ``layer.module`` (a seam for tests and for
      checking another implementation); default ``module.clone(implementation=...)``.
    seed: seeds the inputs, parameters and output gradient.

  Returns:
    The errors of both forward passes and of both gradients.
  """
  reference = layer.module.clone(implementation='xla')
  checked = (candidate or (lambda m: m.clone(implementation=implementation)))(layer.module)
  k_init, k_x, k_g, k_stats = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k_x, layer.input_shape, jnp.float32).astype(layer.dtype)
  variables = reference.init(k_init, x, train=False)
  # Running statistics away from (0, 1), so the evaluation pass tests their use.
  stats = variables.get('batch_stats', {})
  leaves, tree = jax.tree.flatten(stats)
  keys = jax.random.split(k_stats, max(len(leaves), 1))
  leaves = [
    jax.random.uniform(k, a.shape, a.dtype, 0.5, 1.5) for k, a in zip(keys, leaves, strict=False)
  ]
  variables = {**variables, 'batch_stats': jax.tree.unflatten(tree, leaves)} if stats else variables
  out_shape = jax.eval_shape(lambda: reference.apply(variables, x, train=False)).shape
  g = jax.random.normal(k_g, out_shape, jnp.float32)
  with jax.default_matmul_precision('float32'):
    want = jax.jit(lambda v, x: _results(reference, v, x, g))(variables, x)
  got = jax.jit(lambda v, x: _results(checked, v, x, g))(variables, x)
  names = ('train output', 'eval output', 'parameter gradients', 'input gradient')
  errors = {}
  for name, a, b in zip(names, got, want, strict=True):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    errors[name] = max(_error(u, v) for u, v in pairs)
  dtype = jnp.dtype(layer.module.dtype or layer.dtype).name
  return Result(layer, errors, TOLERANCE.get(dtype, TOLERANCE['bfloat16']))


def check(
  model: nn.Module,
  image_size: int,
  *,
  batch: int = 2,
  implementation: str | None = 'pallas',
  candidate: Callable[[GSA], nn.Module] | None = None,
  seed: int = 0,
) -> list[Result]:
  """:func:`check_layer` for every distinct GSA layer geometry of ``model``.

  Args:
    model: the network.
    image_size: the images' height and width.
    batch: the batch each layer is checked at.
    implementation: the kernel path's ``implementation`` (see :func:`check_layer`).
    candidate: see :func:`check_layer`.
    seed: seeds every layer's inputs.

  Returns:
    One :class:`Result` per geometry, in network order.
  """
  return [
    check_layer(layer, implementation=implementation, candidate=candidate, seed=seed)
    for layer in gsa_layers(model, image_size, batch=batch)
  ]


def failure(results: Sequence[Result]) -> str | None:
  """One line naming the first layer that failed and the fix, or None if all passed."""
  for result in results:
    if not result.ok:
      what, error = result.worst
      return (
        f'GSA self-check failed: layer {result.layer.describe()}: the kernels differ from the '
        f'einsum ops by {error:.3g} in the {what} (tolerance {result.tolerance:g}); train '
        f'with the einsum ops: {FIX}'
      )
  return None


def summary(results: Sequence[Result]) -> str:
  """One line: how many geometries passed and the largest error seen."""
  worst = max((r.worst[1] for r in results), default=0.0)
  passed = sum(r.ok for r in results)
  return (
    f'GSA self-check: kernels match the einsum ops on {passed}/{len(results)} layer '
    f'geometries (largest error {worst:.2g}).'
  )


def verify(model: nn.Module, image_size: int, **kwargs: Any) -> list[Result]:
  """:func:`check`, raising :class:`SelfCheckError` (one line, :func:`failure`) on a
  mismatch.

  Args:
    model: the network.
    image_size: the images' height and width.
    **kwargs: passed to :func:`check`.

  Returns:
    The results (all within tolerance).
  """
  results = check(model, image_size, **kwargs)
  message = failure(results)
  if message:
    raise SelfCheckError(message)
  return results


def kernels_selected(model: nn.Module) -> bool:
  """Whether a run of ``model`` on this process's devices takes the kernels: a TPU or GPU
  they support and a model whose GSA layers leave the choice to the device
  (``implementation`` None or ``'pallas'``)."""
  backend = jax.default_backend()
  if backend not in ('tpu', 'gpu'):
    return False
  devices = jax.devices()
  platform = backend
  if backend == 'gpu':
    platform = 'rocm' if 'rocm' in devices[0].client.platform_version.lower() else 'cuda'
  return implementation_of(model) != 'xla' and dispatch.kernels_supported(platform, devices)


def implementation_of(model: nn.Module) -> str | None:
  """The ``implementation`` a network's GSA layers are built with (its ``gsa`` options), or a
  GSA layer's own."""
  return getattr(getattr(model, 'gsa', model), 'implementation', None)
