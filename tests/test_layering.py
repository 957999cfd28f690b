"""Imports run one way: the layering contract in pyproject.toml holds, and it can fail."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

LINT_IMPORTS = Path(sys.executable).parent / 'lint-imports'


def _lint(root: Path) -> subprocess.CompletedProcess:
  return subprocess.run(
    [str(LINT_IMPORTS), '--config', str(root / 'pyproject.toml'), '--no-cache'],
    cwd=root,
    env={'PYTHONPATH': str(root), 'PATH': str(Path(sys.executable).parent)},
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.fixture
def tree(tmp_path):
  """A copy of the package and the contract, to break on purpose."""
  shutil.copytree(REPO / 'gsa_flax', tmp_path / 'gsa_flax', ignore=shutil.ignore_patterns('*.pyc'))
  shutil.copy(REPO / 'pyproject.toml', tmp_path / 'pyproject.toml')
  return tmp_path


def test_the_package_keeps_its_layers(tree):
  result = _lint(tree)
  assert result.returncode == 0, result.stdout[-3000:]
  assert 'Contracts: 3 kept, 0 broken.' in result.stdout


@pytest.mark.parametrize(
  'module,statement',
  [
    ('model/ops.py', 'from gsa_flax.tools import plots'),  # the model imports a tool
    ('model/networks.py', 'from gsa_flax.train import trainer'),  # ... the trainer
    ('data/input_pipeline.py', 'from gsa_flax.model import networks'),  # data imports model
    ('model/kernels/gsa.py', 'from gsa_flax.model import layers'),  # a kernel imports a layer
    ('train/workdir.py', 'from gsa_flax.tools import cli'),  # training imports a tool
    # A function-local import that would break a circle is still an import.
    ('train/checkpoints.py', 'def _late():\n  from gsa_flax.tools import export\n'),
  ],
)
def test_an_import_against_the_layers_fails(tree, module, statement):
  path = tree / 'gsa_flax' / module
  path.write_text(path.read_text() + '\n' + statement + '\n')
  result = _lint(tree)
  assert result.returncode != 0
  dotted = 'gsa_flax.' + module[: -len('.py')].replace('/', '.')
  assert 'BROKEN' in result.stdout and dotted in result.stdout


@pytest.mark.parametrize('module', ['gsa_flax.train.lock', 'gsa_flax.tools.cli'])
def test_the_ledger_and_the_command_line_import_no_model(module):
  """The workdir lock and main.py's first imports load neither the kernels nor the model
  (nor TensorFlow): a mistake on the command line is reported in seconds."""
  program = (
    f'import sys, {module}\n'
    "loaded = sorted(m for m in sys.modules if m.startswith(('gsa_flax.model', 'tensorflow'))"
    " or m == 'jax.experimental.pallas')\n"
    'print(loaded)\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', program], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == '[]'
