"""What a Colab runtime lacks for this project, and the pip command that installs it.

Colab's runtimes differ: the CPU and GPU runtimes ship JAX, Flax, TensorFlow and TFDS; the
TPU runtime ships JAX for TPU and no TensorFlow, which the input pipelines need. The
notebooks call :func:`install_command` before anything of the package is imported, so this
module uses the standard library only.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable


def has_module(name: str) -> bool:
  """Whether ``name`` can be imported here (without importing it)."""
  return importlib.util.find_spec(name) is not None


def install_command(
  repo: str, *, python: str = sys.executable, has: Callable[[str], bool] = has_module
) -> list[str]:
  """The pip command that installs the repository at ``repo`` with what the runtime lacks.

  The package's own dependencies always come from ``pyproject.toml``; TensorFlow is an
  extra (TPU VMs and Colab's CPU/GPU runtimes ship their own build, which pip must not
  replace), added here only where it is missing: Colab's TPU runtime.

  Args:
    repo: the repository's checkout.
    python: the interpreter whose pip installs.
    has: whether a module is importable (a seam for tests).

  Returns:
    ``[python, '-m', 'pip', 'install', '-q', repo or repo[tf]]``.
  """
  target = repo if has('tensorflow') else f'{repo}[tf]'
  return [python, '-m', 'pip', 'install', '-q', target]
