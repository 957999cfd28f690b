"""Which implementation of the attention a program runs: the fused Pallas kernels of
:mod:`gsa_flax.model.kernels` or the einsum ops of :mod:`gsa_flax.model.ops`.

``implementation=None`` decides for the device the program is compiled for, when it is
lowered (so an ahead-of-time compile for another chip gets that chip's choice): the
kernels on TPU v5 and later and on NVIDIA GPUs of compute capability 8.0 and later, the
einsums elsewhere (CPU, TPU v2-v4, T4/V100/P100, ROCm). ``'xla'`` forces the einsums;
``'pallas'`` forces the kernels (in the Pallas interpreter on CPU) and refuses devices they
do not support. Under ``None``, images whose lines are all :data:`SHORT_LINE` positions or
shorter (GSA-ResNet-50's 7x7 stage at 224x224) take the einsums on every device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.interpreters import mlir

from gsa_flax.model.kernels import axial_gpu, axial_tpu

IMPLEMENTATIONS = (None, 'xla', 'pallas')

# Under ``implementation=None``, images of at most this many rows and columns take the einsum
# ops. The kernels give each head 128 offset lanes on TPU (and a 16-wide tile on GPU) however
# short the line, so on a 7x7 image most of what they multiply is padding; compiled for a
# v5e, GSA-ResNet-50's 7x7 module (512 channels, 32 per chip, forward + backward) has a
# roofline of 27 us with the einsums against 147 us with the kernels (H100: 59 against 70);
# at 14x14 the kernels win (258 against 377 us; H100 44 against 108).
SHORT_LINE = 8


def check_implementation(implementation: str | None) -> None:
  """Raises ValueError unless ``implementation`` is one of :data:`IMPLEMENTATIONS`."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"implementation={implementation!r}; valid: None (the best for the platform), 'xla' "
      "(einsum ops) or 'pallas' (the Pallas kernels)."
    )


def dispatch(implementation: str | None, reference: Callable, kernel: Callable, *args):
  """Runs ``kernel(*args, backend=...)`` or ``reference(*args)`` as ``implementation`` says.

  The choice is made when the program is lowered, for the device it is compiled for, so
  an ahead-of-time compile for a device this machine lacks gets it right too:
  :func:`jax.lax.platform_dependent` picks by platform (Mosaic kernels on TPU, Triton
  kernels on NVIDIA GPUs) and, within a TPU or GPU program, :func:`_kernels_supported`
  by the compile target's devices. Devices the kernels do not support (TPU v2-v4, NVIDIA
  GPUs below compute capability 8.0 such as the T4, V100 and P100, and ROCm GPUs) take
  ``reference`` under ``None``; ``'pallas'`` refuses them with a ``ValueError``. Other
  platforms (CPU) take ``reference`` under ``None`` and the Mosaic kernels in the Pallas
  interpreter under ``'pallas'``. Under ``None``, an image (``args[0]``, ``[batch, height,
  width, ...]``) of at most :data:`SHORT_LINE` rows and columns takes ``reference`` on
  every device.
  """
  if implementation == 'xla':
    return reference(*args)
  if implementation is None and max(args[0].shape[1:3]) <= SHORT_LINE:
    return reference(*args)
  default = reference
  if implementation == 'pallas':
    default = functools.partial(kernel, backend='mosaic', interpret=True)

  def where_supported(backend):
    def run(*args):
      # A constant of the lowered program: XLA keeps only the branch it selects (the
      # other one, a kernel the device cannot compile, never reaches the GPU compiler).
      index = _kernels_supported.bind(implementation=implementation)
      return jax.lax.switch(index, (reference, functools.partial(kernel, backend=backend)), *args)

    return run

  return jax.lax.platform_dependent(
    *args,
    tpu=where_supported('mosaic'),
    cuda=where_supported('triton'),
    rocm=reference if implementation is None else where_supported('triton'),
    default=default,
  )


# ------------------------------------------------------------ what the compile target supports


def kernels_supported(platform: str, devices: Sequence, implementation: str | None = None) -> bool:
  """Whether the kernels compile for ``devices`` of ``platform`` (``'tpu'``, ``'cuda'``,
  ``'rocm'``, ``'cpu'``): TPU v5 or later, NVIDIA GPUs of compute capability 8.0 or later;
  on CPU the Pallas interpreter runs them.

  Args:
    platform: the lowering platform.
    devices: the devices compiled for (``jax.Device`` or a topology's devices); none means
      unknown, taken as supported.
    implementation: ``'pallas'`` turns an unsupported device into a ``ValueError``.

  Returns:
    True where the kernels run.

  Raises:
    ValueError: ``implementation='pallas'`` for a device the kernels do not support.
  """
  fix = "use implementation=None (the einsum ops there) or 'xla'."
  need = None
  if platform == 'rocm':
    kind = devices[0].device_kind if devices else 'a ROCm GPU'
    need, what = 'the GPU kernels (Triton) are built for NVIDIA GPUs', f'{kind} (ROCm)'
  elif platform == 'tpu':
    old = [d.device_kind for d in devices if not axial_tpu.supports(d.device_kind)]
    if old:
      need, what = f'the TPU kernels need TPU v{axial_tpu.MIN_GENERATION} or later', old[0]
  elif platform == 'cuda':
    old = [d for d in devices if not axial_gpu.supports(getattr(d, 'compute_capability', '9.0'))]
    if old:
      major, minor = axial_gpu.MIN_COMPUTE_CAPABILITY
      need = (
        f'the GPU kernels (Triton) need an NVIDIA GPU of compute capability {major}.{minor} or '
        'later (A100, L4, H100)'
      )
      what = f'{old[0].device_kind} (compute capability {old[0].compute_capability})'
  if need is None:
    return True
  if implementation == 'pallas':
    raise ValueError(
      f"implementation='pallas': {need}, and this program is compiled for {what}; {fix}"
    )
  return False


def _lower_kernels_supported(ctx, *, implementation):
  platforms = ctx.module_context.platforms
  # One platform: the backend is the compile target's client (a topology's, ahead of time).
  backend = ctx.module_context.backend if len(platforms) == 1 else None
  devices = backend.devices() if backend is not None else ()
  supported = kernels_supported(platforms[0], devices, implementation)
  return [mlir.ir_constant(np.int32(supported))]


@functools.cache
def _kernels_supported_here(implementation):
  return jax.jit(functools.partial(_kernels_supported.bind, implementation=implementation))


# 1 where the kernels compile for the lowering target's devices, else 0: a primitive whose
# value is only known when the program is lowered (as ``lax.platform_dependent``'s index).
_kernels_supported = jax.extend.core.Primitive('gsa_kernels_supported')
_kernels_supported.def_abstract_eval(lambda **_: jax.core.ShapedArray((), jnp.int32))
_kernels_supported.def_impl(lambda *, implementation: _kernels_supported_here(implementation)())
mlir.register_lowering(_kernels_supported, _lower_kernels_supported)
