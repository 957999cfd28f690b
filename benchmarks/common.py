"""Shared helpers for the benchmark scripts: timing, load, cost analysis, matmul peak.

Benchmarks are not tests: they run by hand (``python -m benchmarks.<name>``) and print
markdown that goes into ``BENCHMARKS.md``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
