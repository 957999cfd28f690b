"""The README and docs/ stay true: every relative link resolves, every module a command or
an import names exists, every config file a command passes is there, and the README's
GSA snippet runs as written."""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
from helpers import REPO

DOCS = [REPO / 'README.md', REPO / 'BENCHMARKS.md', *sorted((REPO / 'docs').glob('*.md'))]
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
MODULE_COMMAND = re.compile(r'python3? -m ((?:gsa_flax|benchmarks)(?:\.\w+)*)')
CONFIG_FLAG = re.compile(r'--config=(configs/[\w/]+\.py)')
IMPORT = re.compile(r'^\s*from (gsa_flax[\w.]*) import ([\w, ]+)$', re.M)


def _ids(paths):
  return [str(p.relative_to(REPO)) for p in paths]


@pytest.mark.parametrize('doc', DOCS, ids=_ids(DOCS))
def test_relative_links_resolve(doc):
  broken = []
  for target in LINK.findall(doc.read_text()):
    if target.startswith(('http://', 'https://', '#', 'mailto:')):
      continue
    path = target.split('#')[0]
    if path and not (doc.parent / path).exists():
      broken.append(target)
  assert not broken, f'{doc.name} links to missing files: {broken}'


@pytest.mark.parametrize('doc', DOCS, ids=_ids(DOCS))
def test_commands_name_modules_and_configs_that_exist(doc):
  text = doc.read_text()
  for module in set(MODULE_COMMAND.findall(text)):
    assert importlib.util.find_spec(module) is not None, f'{doc.name}: python -m {module}'
  for config in set(CONFIG_FLAG.findall(text)):
    assert (REPO / config).is_file(), f'{doc.name}: --config={config} does not exist'


@pytest.mark.parametrize('doc', DOCS, ids=_ids(DOCS))
def test_imports_in_code_name_what_exists(doc):
  for module_name, names in IMPORT.findall(doc.read_text()):
    module = importlib.import_module(module_name)
    for name in (n.strip().split(' as ')[0] for n in names.split(',')):
      assert hasattr(module, name) or importlib.util.find_spec(f'{module_name}.{name}'), (
        f'{doc.name}: from {module_name} import {name}'
      )


def test_the_links_checker_finds_a_broken_link(tmp_path):
  """The checks above can fail: a link to a missing file is found."""
  doc = tmp_path / 'doc.md'
  doc.write_text('[ok](doc.md) [broken](missing.md#part) [web](https://example.org)\n')
  targets = [t for t in LINK.findall(doc.read_text()) if not t.startswith('https://')]
  assert [t for t in targets if not (tmp_path / t.split('#')[0]).exists()] == ['missing.md#part']


def test_the_readme_gsa_snippet_runs():
  text = (REPO / 'README.md').read_text()
  snippet = re.search(r'```python\n(import jax.*?layer = GSA.*?)```', text, re.S).group(1)
  scope = {}
  exec(compile(snippet, 'README.md', 'exec'), scope)  # noqa: S102  the README's own code
  assert scope['y'].shape == (8, 28, 28, 64)
  assert set(scope['updates']['batch_stats']['bn_col']) == {'mean', 'var'}


def test_readme_is_a_front_door():
  """The README introduces and links; the manual lives in docs/."""
  lines = (REPO / 'README.md').read_text().splitlines()
  assert len(lines) <= 250
  assert all(Path(REPO, 'docs', name).is_file() for name in ('method.md', 'training.md'))
