"""Sizing a run before having the accelerator: compile for a TPU slice or an NVIDIA GPU here.

XLA compiles for a Cloud TPU topology (libtpu) or an NVIDIA H100, A100, L4 or T4 (the XLA
GPU compiler and a target description) on a machine without either; nothing executes. This
module names those targets and reads, per chip, what the compiled program implies:

* :func:`get_target` gives a target's devices, its one-axis ``data`` mesh (the trainer's),
  its host count and its chip's facts (HBM capacity and bandwidth, peak bf16 FLOP/s);
* :func:`analyze` gives FLOPs, an HBM-traffic estimate from the optimized HLO and the memory
  plan (arguments, outputs, temporaries, donated bytes, the HBM the program needs);
* :func:`roofline` turns those into a step time, examples/s and MFU;
* :func:`fit_batch` finds the largest per-chip batch whose memory fits the chip.

Compiling for TPU needs ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` when more than one process loads
libtpu; compiling for a GPU without one needs ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``.
Run with ``JAX_PLATFORMS=cpu`` so that neither runtime looks for local chips.

The FLOPs and the HBM-traffic estimate come from :mod:`gsa_flax.tools.sizing.hlo`, which reads
the optimized HLO (how the traffic is counted, and how a Pallas kernel is priced, is
described there).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gsa_flax.tools.sizing import traffic
from gsa_flax.tools.sizing.hlo import CustomCallCosts

DATA_AXIS = 'data'

# Fraction of a chip's HBM kept free for what the runtime itself holds (its own allocations,
# fragmentation, the program's constants), which no memory analysis shows.
HBM_MARGIN = 0.05

_GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip facts for the roofline and the memory fit.

  Attributes:
    name: the chip, as its vendor calls it.
    hbm_bytes: HBM capacity.
    hbm_bandwidth: HBM bandwidth, bytes/s.
    peak_flops: peak dense bfloat16 FLOP/s (a multiply-add counts 2).
    mxu: a TPU's MXU width (128 up to v5, 256 from v6); None on GPUs.
    vector_flops: a GPU's peak float32 FLOP/s on its CUDA cores (no tensor cores); None
      on TPUs.
  """

  name: str
  hbm_bytes: int
  hbm_bandwidth: float
  peak_flops: float
  mxu: int | None = None
  vector_flops: float | None = None


# Vendor figures per chip.
#   v4:  cloud.google.com/tpu/docs/v4   -- 275 TFLOPS (bf16), HBM2 32 GiB, 1200 GBps.
#   v5e: cloud.google.com/tpu/docs/v5e  -- 197 TFLOPS (bf16), HBM2 16 GB, 819 GBps.
#   v5p: cloud.google.com/tpu/docs/v5p  -- 459 TFLOPS (bf16), HBM2e 95 GB, 2765 GBps.
#   v6e: cloud.google.com/tpu/docs/v6e  -- 918 TFLOPS (bf16), HBM 32 GB, 1638 GBps.
#   H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet -- BF16 Tensor Core 1979 TFLOPS with 2:4
#     sparsity, i.e. 989 dense; 80 GB HBM3 at 3.35 TB/s. The capacity below is what the CUDA
#     driver reports for the 80 GB part (``device_memory_size`` of ``h100.txtpb``).
#   A100 SXM4 40GB: NVIDIA A100 datasheet -- BF16 Tensor Core 312 TFLOPS dense, HBM2 1555 GB/s.
#   L4: NVIDIA L4 datasheet -- BF16 Tensor Core 242 TFLOPS with sparsity, i.e. 121 dense;
#     24 GB GDDR6 at 300 GB/s.
#   T4: NVIDIA T4 datasheet -- FP16 Tensor Core 65 TFLOPS (Turing has no bfloat16 tensor
#     cores: the FP16 peak stands in for it); 16 GB GDDR6 at 320 GB/s.
# GPU capacities are the driver's figures, as in each chip's ``<chip>.txtpb``.
# CUDA-core (non-tensor) float32 peaks, same datasheets: H100 SXM5 67 TFLOPS, A100 19.5,
# L4 30.3, T4 8.1. MXU widths: JAX's ``pltpu.TpuInfo.mxu_column_size`` (128 before v6).
# Google gives the TPU capacities as GB for 16/32/95 GiB parts (two, two and six HBM stacks).
CHIPS: dict[str, Chip] = {
  'tpu-v4': Chip('TPU v4', 32 * _GIB, 1.2e12, 275e12, mxu=128),
  'tpu-v5e': Chip('TPU v5e', 16 * _GIB, 819e9, 197e12, mxu=128),
  'tpu-v5p': Chip('TPU v5p', 95 * _GIB, 2.765e12, 459e12, mxu=128),
  'tpu-v6e': Chip('TPU v6e', 32 * _GIB, 1.638e12, 918e12, mxu=256),
  'h100': Chip('NVIDIA H100 SXM5 80GB', 84_942_979_072, 3.35e12, 989e12, vector_flops=67e12),
  'a100': Chip('NVIDIA A100 SXM4 40GB', 42_314_694_656, 1.555e12, 312e12, vector_flops=19.5e12),
  'l4': Chip('NVIDIA L4', 23_580_639_232, 300e9, 121e12, vector_flops=30.3e12),
  't4': Chip('NVIDIA Tesla T4', 15_828_320_256, 320e9, 65e12, vector_flops=8.1e12),
}

# NVIDIA GPUs, each compiled for from its XLA target description ``<chip>.txtpb`` here.
GPUS = ('h100', 'a100', 'l4', 't4')

# The topology a chip name alone means (the smallest single-host slice libtpu accepts).
DEFAULT_TOPOLOGY = {
  'tpu-v4': '2x2x1',
  'tpu-v5e': '2x2',
  'tpu-v5p': '2x2x1',
  'tpu-v6e': '2x2',
  'h100': '1x1x1',
  'a100': '1x1x1',
  'l4': '1x1x1',
  't4': '1x1x1',
}

# v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore", as on a
# real slice); without this libtpu describes each core as a device.
_TPU_CHIP_CONFIG = {'tpu-v4': 'megacore', 'tpu-v5p': 'megacore'}

# The named targets; any topology libtpu accepts may follow a TPU chip's name instead.
TARGETS = ('tpu-v4:2x2x1', 'tpu-v5e:2x2', 'tpu-v5p:2x2x1', 'tpu-v6e:2x2', *GPUS)


@dataclasses.dataclass(frozen=True)
class Target:
  """A slice of chips to compile for.

  Attributes:
    name: the target's name, e.g. ``'tpu-v5e:4x4'``.
    platform: ``'tpu'`` or ``'cuda'``.
    topology: the topology string, e.g. ``'4x4'``.
    chip: the chip's facts.
    mesh: one axis, ``data``, over every chip of the slice, as the trainer builds it.
  """

  name: str
  platform: str
  topology: str
  chip: Chip
  mesh: jax.sharding.Mesh

  @property
  def devices(self) -> tuple[Any, ...]:
    """The slice's devices, in mesh order."""
    return tuple(self.mesh.devices.flat)

  @property
  def num_chips(self) -> int:
    """Chips (devices) in the slice."""
    return self.mesh.devices.size

  @property
  def num_hosts(self) -> int:
    """How many processes (hosts) drive the slice."""
    return len({d.process_index for d in self.devices})

  def sharding(self, *spec: Any) -> NamedSharding:
    """``NamedSharding`` over the mesh: ``sharding()`` replicates, ``sharding('data')``
    splits the leading axis over the chips."""
    return NamedSharding(self.mesh, P(*spec))


def gpu_target_config(chip: str = 'h100') -> str:
  """The XLA ``GpuTargetConfig`` text proto of one GPU of :data:`GPUS`, shipped with the
  package (SMs, memory, bandwidth, shared memory, compute capability)."""
  return importlib.resources.files(__package__).joinpath(f'{chip}.txtpb').read_text()


def h100_target_config() -> str:
  """The XLA ``GpuTargetConfig`` text proto of one H100 SXM5 80GB."""
  return gpu_target_config('h100')


@functools.cache
def get_target(name: str) -> Target:
  """The target called ``name``: ``<chip>[:<topology>]``.

  Args:
    name: one of :data:`TARGETS`, or a TPU chip with any slice topology libtpu accepts
      (``'tpu-v5e:4x4'``: 16 chips on 4 hosts), or a GPU of :data:`GPUS` (one GPU;
      ``'h100:1x1x8'`` is one host with 8, ``'h100:1x8x1'`` 8 hosts with one each).

  Returns:
    The target.

  Raises:
    ValueError: the chip is unknown or the topology is not one of the chip's.
  """
  chip_name, _, topology = name.partition(':')
  if chip_name not in CHIPS:
    raise ValueError(
      f'unknown target {name!r}; valid: {", ".join(TARGETS)} (a TPU chip also takes any slice '
      f'topology, e.g. tpu-v5e:4x4).'
    )
  topology = topology or DEFAULT_TOPOLOGY[chip_name]
  try:
    if chip_name in GPUS:
      platform = 'cuda'
      desc = topologies.get_topology_desc(
        platform='cuda',
        topology_name=chip_name,
        topology=topology,
        target_config=gpu_target_config(chip_name),
      )
    else:
      platform = 'tpu'
      desc = topologies.get_topology_desc(
        platform='tpu',
        topology_name=f'{chip_name.removeprefix("tpu-")}:{topology}',
        chip_config_name=_TPU_CHIP_CONFIG.get(chip_name, 'default'),
      )
  except Exception as e:  # libtpu / the GPU client say why (XlaRuntimeError)
    raise ValueError(
      f'target {name!r}: topology {topology!r} is not valid for {chip_name} ({e}); '
      f'e.g. {chip_name}:{DEFAULT_TOPOLOGY[chip_name]}.'
    ) from e
  devices = desc.devices
  mesh = jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices)
  one_gpu = chip_name in GPUS and topology == DEFAULT_TOPOLOGY[chip_name]
  full = chip_name if one_gpu else f'{chip_name}:{topology}'
  return Target(full, platform, topology, CHIPS[chip_name], mesh)


# ----------------------------------------------------------------------------- analysis


@dataclasses.dataclass(frozen=True)
class Analysis:
  """What one compiled program costs on each chip.

  Attributes:
    flops: executed FLOPs: libtpu's count on TPU (it includes a Pallas kernel's own
      ``CostEstimate``), the dot/convolution count of the HLO elsewhere; plus the FLOPs of
      custom calls priced by the caller.
    hbm_bytes: estimated HBM traffic (see :func:`gsa_flax.tools.sizing.traffic.hlo_costs`).
    onchip_bytes: operand and result bytes of buffers in on-chip memory (TPU VMEM), not
      part of ``hbm_bytes``.
    matmul_flops: dot and convolution FLOPs counted from the HLO (every kernel tap, padding
      included).
    argument_bytes, output_bytes, temp_bytes, alias_bytes, code_bytes: XLA's memory plan;
      ``alias_bytes`` are outputs written into donated arguments.
    xla_flops, xla_bytes: the compiler's own cost analysis ('flops', 'bytes accessed');
      ``None`` where it has none (the GPU compiler).
    unpriced_custom_calls: custom calls counted only by their operands and results.
    unknown_trip_counts: while loops whose trip count the HLO does not give (counted once).
    collectives: ``{opcode: count}`` of collectives in the program.
    kernel_flops: the part of ``flops`` that priced custom calls (Pallas kernels) execute.
    kernel_padded_flops: ``{MXU width: FLOPs}``: what a TPU's MXU does for those kernels,
      each dot's operands rounded up to its tiles (equal to ``kernel_flops`` where no
      padding is known).
    kernel_vector_flops: the part of ``kernel_flops`` on a GPU's CUDA cores.
  """

  flops: float
  hbm_bytes: float
  onchip_bytes: float
  matmul_flops: float
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  code_bytes: int
  xla_flops: float | None
  xla_bytes: float | None
  unpriced_custom_calls: tuple[str, ...]
  unknown_trip_counts: int
  collectives: dict[str, int]
  kernel_flops: float = 0.0
  kernel_padded_flops: dict[int, float] = dataclasses.field(default_factory=dict)
  kernel_vector_flops: float = 0.0

  def mxu_occupancy(self, mxu: int) -> float | None:
    """Executed over MXU-padded FLOPs of the kernels (None without kernels)."""
    padded = self.kernel_padded_flops.get(mxu, self.kernel_flops)
    return self.kernel_flops / padded if padded else None

  @property
  def hbm_needed(self) -> int:
    """Peak HBM the program needs on a chip: arguments + outputs + temporaries - donated
    (aliased) + generated code."""
    return (
      self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes + self.code_bytes
    )


def _cost_analysis(compiled: jax.stages.Compiled) -> dict[str, float] | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older JAX: one dict per device
    cost = cost[0] if cost else None
  return cost or None


def hbm_needed(compiled: jax.stages.Compiled) -> int:
  """Peak HBM ``compiled`` needs per chip (see :attr:`Analysis.hbm_needed`)."""
  m = compiled.memory_analysis()
  return int(
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    + m.temp_size_in_bytes
    - m.alias_size_in_bytes
    + m.generated_code_size_in_bytes
  )


def analyze(
  compiled: jax.stages.Compiled, custom_call_costs: CustomCallCosts | None = None
) -> Analysis:
  """Per-chip FLOPs, HBM traffic and memory of a compiled (SPMD) program.

  Args:
    compiled: ``jax.jit(f).lower(...).compile()`` for a :class:`Target`'s devices.
    custom_call_costs: costs of custom calls XLA cannot see into (Pallas kernels), by
      target, instruction name or op name (a kernel's ``name=``); each value a
      :class:`CustomCallCost` (or ``pl.CostEstimate``) per execution, or a function of the
      :class:`CustomCall` (its operand and result shapes) that returns one. None: the
      project's kernels (:func:`gsa_flax.model.kernels.costs.custom_call_costs`). A TPU kernel
      that carries its own ``CostEstimate`` adds no FLOPs here: libtpu has counted them.

  Returns:
    The analysis.
  """
  costs = traffic.hlo_costs(compiled.as_text(), custom_call_costs)
  xla = _cost_analysis(compiled)
  xla_flops = float(xla['flops']) if xla and 'flops' in xla else None
  xla_bytes = float(xla['bytes accessed']) if xla and 'bytes accessed' in xla else None
  m = compiled.memory_analysis()
  base_flops = xla_flops if xla_flops is not None else costs['matmul_flops']
  return Analysis(
    flops=base_flops + costs['custom_call_flops'],
    hbm_bytes=costs['hbm_bytes'],
    onchip_bytes=costs['onchip_bytes'],
    matmul_flops=costs['matmul_flops'],
    argument_bytes=int(m.argument_size_in_bytes),
    output_bytes=int(m.output_size_in_bytes),
    temp_bytes=int(m.temp_size_in_bytes),
    alias_bytes=int(m.alias_size_in_bytes),
    code_bytes=int(m.generated_code_size_in_bytes),
    xla_flops=xla_flops,
    xla_bytes=xla_bytes,
    unpriced_custom_calls=costs['unpriced_custom_calls'],
    unknown_trip_counts=costs['unknown_trip_counts'],
    collectives=costs['collectives'],
    kernel_flops=costs['kernel_flops'],
    kernel_padded_flops=costs['kernel_padded_flops'],
    kernel_vector_flops=costs['kernel_vector_flops'],
  )


# ----------------------------------------------------------------------------- roofline


@dataclasses.dataclass(frozen=True)
class Roofline:
  """A step's lower bound on time from the chip's peaks, and what it implies.

  Attributes:
    compute_seconds: FLOPs / peak FLOP/s, with the kernels' FLOPs as the chip's units
      take them (:func:`roofline`).
    memory_seconds: HBM bytes / HBM bandwidth.
    step_seconds: the larger of the two (compute and memory overlap perfectly).
    bound: ``'compute'`` or ``'memory'``.
    examples_per_second: the whole slice's rate at that step time (``None`` without a batch).
    mfu: model FLOPs utilisation at that rate (``None`` without model FLOPs).
  """

  compute_seconds: float
  memory_seconds: float
  step_seconds: float
  bound: str
  examples_per_second: float | None
  mfu: float | None


def roofline(
  analysis: Analysis,
  target: Target,
  *,
  batch_per_chip: int | None = None,
  model_flops_per_example: float | None = None,
) -> Roofline:
  """Step time ``max(FLOPs / peak, bytes / bandwidth)`` per chip, and its consequences.

  The FLOPs of the Pallas kernels count as the chip's units execute them: on a TPU, each
  kernel dot with its operands padded to the MXU's tiles (``analysis.kernel_padded_flops``
  at ``target.chip.mxu``); on a GPU, the kernels' CUDA-core work at the CUDA cores' float32
  peak, the rest at the tensor cores' peak. Everything else is at the chip's peak.

  Args:
    analysis: the step's per-chip :class:`Analysis`.
    target: where it runs.
    batch_per_chip: examples each chip processes per step.
    model_flops_per_example: the model's FLOPs per example (e.g. 3x the forward pass for
      a training step), for MFU; executed FLOPs include rematerialisation, model FLOPs not.

  Returns:
    The roofline.
  """
  chip = target.chip
  matrix_flops = analysis.flops - analysis.kernel_vector_flops
  if chip.mxu is not None:
    padded = analysis.kernel_padded_flops.get(chip.mxu, analysis.kernel_flops)
    matrix_flops += padded - analysis.kernel_flops
  compute = matrix_flops / chip.peak_flops
  if analysis.kernel_vector_flops:
    compute += analysis.kernel_vector_flops / (chip.vector_flops or chip.peak_flops)
  memory = analysis.hbm_bytes / target.chip.hbm_bandwidth
  step = max(compute, memory)
  rate = mfu = None
  if batch_per_chip is not None and step > 0:
    rate = batch_per_chip * target.num_chips / step
    if model_flops_per_example is not None:
      mfu = model_flops_per_example * batch_per_chip / (step * target.chip.peak_flops)
  return Roofline(compute, memory, step, 'compute' if compute >= memory else 'memory', rate, mfu)


# ----------------------------------------------------------------------------- batch fit


@dataclasses.dataclass(frozen=True)
class BatchFit:
  """HBM need as an affine function of the per-chip batch, and the largest batch that fits.

  Attributes:
    batches: the per-chip batches compiled.
    hbm_needed: the HBM each needed (bytes).
    fixed_bytes: ``a`` of ``a + b * batch`` (state, code, batch-independent buffers).
    bytes_per_example: ``b``.
    max_residual_bytes: largest distance of a compiled point from the line (0 with two).
    usable_bytes: the chip's HBM less the margin.
    largest_batch: the largest batch (a multiple of ``multiple``) predicted to fit; 0 if
      none does.
  """

  batches: tuple[int, ...]
  hbm_needed: tuple[int, ...]
  fixed_bytes: float
  bytes_per_example: float
  max_residual_bytes: float
  usable_bytes: float
  largest_batch: int

  def predict(self, batch: int) -> float:
    """Predicted HBM need at ``batch`` examples per chip."""
    return self.fixed_bytes + self.bytes_per_example * batch


def fit_batch(
  compile_at: Callable[[int], jax.stages.Compiled],
  chip: Chip,
  batches: Sequence[int] = (8, 16, 32),
  *,
  margin: float = HBM_MARGIN,
  multiple: int = 1,
) -> BatchFit:
  """Fits ``hbm_needed = a + b * batch`` over a few compiles and solves for the chip's HBM.

  Args:
    compile_at: compiles the program at a per-chip batch.
    chip: the chip whose HBM must hold it.
    batches: at least two per-chip batches; a third checks that the need is affine.
    margin: fraction of HBM left to the runtime (:data:`HBM_MARGIN`).
    multiple: the batch returned is a multiple of this (8 keeps TPU tiles full).

  Returns:
    The fit.

  Raises:
    ValueError: fewer than two distinct batches, or memory that does not grow with the batch.
  """
  batches = tuple(sorted(set(batches)))
  if len(batches) < 2:
    raise ValueError(f'fit_batch needs two or more distinct batches, got {batches}.')
  needed = tuple(hbm_needed(compile_at(b)) for b in batches)
  b, a = np.polyfit(np.asarray(batches, float), np.asarray(needed, float), 1)
  if b < 1.0:  # less than a byte per example: not a function of the batch
    raise ValueError(
      f'HBM need does not grow with the batch ({dict(zip(batches, needed, strict=True))}); '
      'is the batch dimension really an input of compile_at?'
    )
  residual = max(abs(n - (a + b * x)) for x, n in zip(batches, needed, strict=True))
  usable = chip.hbm_bytes * (1.0 - margin)
  largest = max(0, math.floor((usable - a) / b))
  largest -= largest % multiple
  return BatchFit(batches, needed, float(a), float(b), float(residual), usable, largest)
