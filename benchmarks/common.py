"""Shared helpers for the benchmark scripts: timing, load, cost analysis, ceilings, the
real train step, and a git revision of the package for before/after comparisons.

Benchmarks are not tests: they run by hand (``python -m benchmarks.<name>``) and print
markdown that goes into ``BENCHMARKS.md``. Nothing here imports ``gsa_flax`` at module
level, so a case process can still choose where the package comes from
(:func:`import_package_from`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

# Where benchmarks.pipeline writes its generated ImageNet-like records (a few GB), and
# benchmarks.train_throughput reads them: under the checkout's runs/, which git ignores.
RECORDS_DIR = os.path.join('runs', 'pipeline_benchmark')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_relative(path: str) -> str:
  """``path`` relative to the repository if it lies inside it (what saved results record)."""
  path = os.path.abspath(path)
  return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def loadavg() -> float:
  """One-minute load average (the machine is shared; we record it with every number)."""
  return os.getloadavg()[0]


def machine() -> str:
  """A one-line description of this machine."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return f'{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}'


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, iters: int = 5) -> dict[str, float]:
  """Median wall time of ``fn()`` (which must block until its result is ready).

  Returns:
    ``{'median_s', 'min_s', 'first_s', 'load'}``; ``first_s`` is the first call (compile
    for jitted JAX functions), excluded from the median.
  """
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {
    'median_s': statistics.median(times),
    'min_s': min(times),
    'first_s': first,
    'load': loadavg(),
  }


def maxrss_mib() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def xla_flops(compiled: Any) -> float:
  """FLOPs of a compiled JAX computation from XLA's cost analysis (a multiply-add is 2)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older jax returned one dict per device
    cost = cost[0]
  return float(cost.get('flops', 0.0)) if cost else 0.0


def xla_bytes(compiled: Any) -> float:
  """Bytes accessed according to XLA's cost analysis (an estimate of memory traffic)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0]
  return float(cost.get('bytes accessed', 0.0)) if cost else 0.0


def xla_peak_bytes(compiled: Any) -> int:
  """Peak device memory XLA plans for: arguments + outputs + temporaries (minus aliasing)."""
  m = compiled.memory_analysis()
  return int(
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def matmul_peak_flops(n: int = 2048, dtype: str = 'float32', iters: int = 5) -> float:
  """This machine's measured dense matmul rate (FLOP/s) with JAX: the practical ceiling."""
  import jax

  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  t = time_fn(lambda: f(a, b).block_until_ready(), warmup=2, iters=iters)
  return 2 * n**3 / t['min_s']


def run_isolated(
  module: str, args: list[str], python: str | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
  """Runs ``python -m module args`` in a fresh process; it prints one JSON line last.

  A fresh process per case makes ru_maxrss a per-case peak and keeps allocator state
  from one case out of the next.
  """
  cmd = [python or sys.executable, '-m', module, *args]
  proc = subprocess.run(
    cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})}
  )
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
  if proc.returncode != 0 or not lines:
    return {'error': (proc.stderr.strip().splitlines() or ['?'])[-1], 'rc': proc.returncode}
  return json.loads(lines[-1])


def memory_bandwidth(mib: int = 256, iters: int = 5) -> float:
  """Measured streaming bandwidth (bytes/s): read + write of a ``mib`` MiB float32 array."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001 + 1.0)
  t = time_fn(lambda: f(x).block_until_ready(), warmup=2, iters=iters)
  return 2 * x.nbytes / t['min_s']


def fit_exponent(xs: list[float], ys: list[float]) -> float:
  """Least-squares slope of log(y) against log(x): the growth exponent."""
  import numpy as np

  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def compile_fwd_bwd(module: Any, x: Any) -> tuple[Any, Any]:
  """Compiles forward + backward of a linen layer: gradients of its params and its input.

  The layer runs in training mode; its non-parameter collections (GSA's BatchNorm
  statistics) are updated as in training. The loss is the sum of squared outputs,
  accumulated in float32.

  Returns:
    ``(compiled, params)``: call ``compiled(params, x)``.
  """
  import jax
  import jax.numpy as jnp

  variables = module.init(jax.random.key(1), x, train=False)
  state = {k: v for k, v in variables.items() if k != 'params'}

  def loss(params, x):
    if state:
      y, _ = module.apply({'params': params, **state}, x, train=True, mutable=list(state))
    else:
      y = module.apply({'params': params}, x, train=True)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return step.lower(variables['params'], x).compile(), variables['params']


# ----------------------------------------------------------------------------- the train step


def imagenet_config(model: str, batch: int, image_size: int, dtype: str = 'float32'):
  """``configs/imagenet.py`` with ``model``, the global batch, the resolution and dtype set.

  The ``*_tiny`` models (quick runs) get the tiny networks' width, stem and heads.
  """
  from configs import imagenet

  config = imagenet.get_config()
  config.model = model
  config.batch_size = batch
  config.image_size = image_size
  config.dtype = dtype
  if model.endswith('_tiny'):
    config.num_filters, config.small_stem, config.gsa.num_heads = 16, True, 4
  return config


@dataclasses.dataclass
class TrainStep:
  """A compiled train step with its state and a fixed batch; call it to time one step.

  Attributes:
    compiled: the compiled ``steps.jit_train_step``.
    state: the current train state (donated to each step and replaced by its result).
    batch: the fixed global batch, sharded on the mesh's data axis.
    compile_s: seconds to lower and compile.
  """

  compiled: Any
  state: Any
  batch: dict[str, Any]
  compile_s: float

  def __call__(self) -> float:
    """Runs one step (the state advances); returns its wall time in seconds."""
    import jax

    t0 = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t0


def compile_train_step(config: Any, num_classes: int, devices: list | None = None) -> TrainStep:
  """The project's train step exactly as the trainer builds it, on a random fixed batch.

  ``state.setup`` + ``state.create`` (jitted, replicated) + ``steps.jit_train_step`` over
  ``steps.make_mesh(devices)``: the batch sharded on the data axis, the state replicated and
  donated. The batch is ``config.batch_size`` random images (the input pipeline is out of
  the measurement); the schedule is that of a 10,000-step run.

  Args:
    config: the experiment (``model``, ``batch_size``, ``image_size``, ``dtype``, ...).
    num_classes: classifier outputs.
    devices: the mesh's devices; default every device.
  """
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from gsa_flax.train import experiment, steps
  from gsa_flax.train import state as state_lib

  mesh = steps.make_mesh(devices)
  pieces = experiment.setup(config, num_classes, steps_per_epoch=1000, num_train_steps=10_000)
  state = jax.jit(
    functools.partial(state_lib.create, pieces, image_size=config.image_size),
    out_shardings=NamedSharding(mesh, P()),
  )(jax.random.key(config.seed))
  rng = np.random.default_rng(0)
  size = config.image_size
  batch = steps.to_global(
    {
      'image': rng.standard_normal((config.batch_size, size, size, 3), np.float32),
      'label': rng.integers(0, num_classes, (config.batch_size,), np.int32),
    },
    NamedSharding(mesh, P(steps.DATA_AXIS)),
  )
  step = steps.jit_train_step(mesh, pieces.schedule, num_classes, config.label_smoothing)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  return TrainStep(compiled, state, batch, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- a git revision


def resolve_rev(rev: str) -> str:
  """The abbreviated commit hash of a git revision of this repository (a ValueError if none)."""
  proc = subprocess.run(
    ['git', 'rev-parse', '--verify', '--short', f'{rev}^{{commit}}'],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  if proc.returncode != 0:
    raise ValueError(f'--before={rev!r} is not a commit of this repository (git rev-parse).')
  return proc.stdout.strip()


@contextlib.contextmanager
def git_worktree(rev: str) -> Iterator[str]:
  """This repository at ``rev``, checked out into a temporary ``git worktree``.

  Yields the worktree's root. A case process given it imports ``gsa_flax`` from there
  (:func:`import_package_from`) while the benchmark scripts still come from the current
  tree. The worktree and its administrative files are removed however the block ends.
  """
  root = tempfile.mkdtemp(prefix='gsa-flax-before-')
  path = os.path.join(root, 'tree')
  subprocess.run(
    ['git', 'worktree', 'add', '--detach', '--quiet', path, resolve_rev(rev)],
    cwd=REPO,
    check=True,
    capture_output=True,
  )
  try:
    yield path
  finally:
    subprocess.run(['git', 'worktree', 'remove', '--force', path], cwd=REPO, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(['git', 'worktree', 'prune'], cwd=REPO, capture_output=True)


def import_package_from(root: str) -> None:
  """Makes ``import gsa_flax`` in this process load the package under ``root``.

  Call before anything imports ``gsa_flax``.

  Raises:
    RuntimeError: ``gsa_flax`` was already imported from elsewhere.
  """
  sys.path.insert(0, root)
  import gsa_flax

  if not os.path.abspath(gsa_flax.__file__).startswith(os.path.abspath(root) + os.sep):
    raise RuntimeError(f'gsa_flax was already imported from {gsa_flax.__file__}, not {root}.')
