"""notebooks/quickstart.ipynb runs end to end in a real Jupyter kernel (shortened by env vars)."""

import nbformat
from helpers import REPO
from nbclient import NotebookClient

NOTEBOOK = REPO / 'notebooks' / 'quickstart.ipynb'


def _text(cell) -> str:
  parts = []
  for output in cell.get('outputs', []):
    parts.append(output.get('text', ''))
    parts.append(output.get('data', {}).get('text/plain', ''))
  return ''.join(parts)


def test_quickstart_notebook(digits_dir, tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  # The kernel inherits these: a short run, on the test's digits, on one CPU device.
  monkeypatch.setenv('GSA_QUICKSTART_STEPS', '6')
  monkeypatch.setenv('GSA_QUICKSTART_FINETUNE_STEPS', '2')
  monkeypatch.setenv('GSA_QUICKSTART_WORKDIR', str(workdir))
  monkeypatch.setenv('GSA_QUICKSTART_DATA_DIR', digits_dir)
  # LLVM's optimizations cost more compile time than they save on a dozen steps.
  monkeypatch.setenv(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0'
  )
  monkeypatch.setenv('GSA_REPO', str(REPO))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
  NotebookClient(
    notebook,
    kernel_name='python3',
    timeout=240,
    resources={'metadata': {'path': str(tmp_path)}},  # not the repo: the setup must find it
  ).execute()

  outputs = '\n'.join(_text(cell) for cell in notebook.cells if cell.cell_type == 'code')
  assert f'repository: {REPO}' in outputs
  assert 'params total' in outputs and 'resnet_tiny' in outputs
  assert 'step 6: eval accuracy' in outputs
  assert 'exit status 1' in outputs  # the non-image file failed, the digit was classified
  # The fine-tune at 32x32 from the run's checkpoint: every GSA layer's table (4 stages,
  # small stem: maps of 16, 16, 8 and 4 pixels at 16x16, the strided blocks attending before
  # they pool) resized from 2 * size - 1 entries to the global length of twice the size.
  tables = 'position table lengths, 16x16 -> 32x32 (one per GSA layer): '
  assert tables + '31 -> 63, 31 -> 63, 15 -> 31, 7 -> 15' in outputs
  assert 'step 2 at 32x32: eval accuracy' in outputs
  assert (tmp_path / 'run_32' / 'checkpoints' / '2').is_dir()
  assert (workdir / 'config.json').exists()
  for png in ('learning_curves.png', 'attention_map.png'):
    assert (workdir / png).stat().st_size > 10_000, png
  images = [
    o
    for cell in notebook.cells
    for o in cell.get('outputs', [])
    if 'image/png' in o.get('data', {})
  ]
  assert len(images) == 2  # the learning curves and the attention maps are shown
