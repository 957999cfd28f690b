"""A run's workdir as a ledger with one writer: its paths, its lock and its record.

- **The lock** is :mod:`gsa_flax.train.lock`'s: one run per workdir. Every file here is
  written whole (:mod:`gsa_flax.files`), never through a symbolic link.
- **The record**: ``config.json`` is written once, when a run starts from scratch. A
  restart compares its config with it and refuses a change to a field that changes what is
  trained unless the field is listed in ``config.allow_config_changes``; an accepted change
  is appended to ``config_history.jsonl`` (time, step, old and new values) and written into
  ``config.json``. Fields that do not change what is trained (intervals, eval settings,
  ``data_dir``, ``init_from``) may differ freely and are not recorded. A record is read as
  this code knows it: keys it does not know are reported once and ignored, fields added
  after it was written take the values runs had before them (:class:`RecordRules`).

What the record's fields mean is the trainer's to say (:class:`RecordRules`: which fields a
restart may change, how a record is checked), so the ledger imports no model. The
checkpoints under ``<workdir>/checkpoints`` are :mod:`gsa_flax.train.checkpoints`'s. Every
path goes through ``etils.epath``, so a workdir on ``gs://`` works like a local one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from gsa_flax import errors, files


class WorkdirError(errors.UserError):
  """A workdir cannot be used as it is (the message says why and what to do)."""


class WorkdirBusyError(WorkdirError):
  """Another run holds the workdir."""


class ConfigChangedError(WorkdirError):
  """A restart's config differs from the run's record in what is trained."""


CONFIG_FILE = 'config.json'
HISTORY_FILE = 'config_history.jsonl'
LOCK_FILE = 'lock.json'
# The largest record and lock file read: anything larger is not one.
MAX_RECORD_BYTES = 16 * files.MiB


@dataclasses.dataclass(frozen=True)
class RecordRules:
  """What the ledger needs to know of the config's fields.

  Attributes:
    free_fields: dotted names of the fields that do not change what is trained (a restart
      may change them; a record may lack them).
    check: raises ``ValueError`` (one line, naming the field) for a record that is not a
      usable config.
    allowed_changes: the fields a config accepts changes of (its
      ``allow_config_changes``).
    fields: dotted names of every field this code knows; a record's other keys (written by
      another version, or by hand) are reported once and ignored. Empty: keep every key.
    defaults: the values of fields that a record written before they existed lacks (what
      such a run trained with); a record lacking one takes it, with a log line.
  """

  free_fields: frozenset[str]
  check: Callable[[ml_collections.ConfigDict], None]
  allowed_changes: Callable[[ml_collections.ConfigDict], list[str]]
  fields: frozenset[str] = frozenset()
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` is on a cloud file system (``gs://``, ``s3://``) rather than a local disk."""
  return str(path).startswith(('gs://', 's3://'))


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as an ``epath.Path``, absolute if local (orbax requires absolute paths)."""
  return epath.Path(workdir if is_remote(workdir) else os.path.abspath(workdir))


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """``<workdir>/checkpoints``."""
  return workdir_path(workdir) / 'checkpoints'


def has_checkpoints(workdir: str | os.PathLike) -> bool:
  """Whether ``<workdir>/checkpoints`` holds a step directory (readable or not)."""
  directory = checkpoint_dir(workdir)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_workdir(workdir: str | os.PathLike, *, evaluate_only: bool = False) -> None:
  """Checks that a run can use ``workdir``, before anything is compiled.

  Args:
    workdir: the ``--workdir``.
    evaluate_only: the run only evaluates (``config.eval_only``): the workdir must hold a
      checkpoint, and nothing is created. Otherwise a local workdir is created if missing
      and must be writable.

  Raises:
    WorkdirError: it cannot be written (the message names ``--workdir``).
    WorkdirError: ``evaluate_only`` and there is no checkpoint to evaluate.
  """
  if evaluate_only:
    directory = checkpoint_dir(workdir)
    if not has_checkpoints(workdir):
      raise WorkdirError(
        f'config.eval_only=True, but {workdir} holds no checkpoint ({directory}): train first, '
        'or pass the --workdir of a training run.'
      )
    return
  if is_remote(workdir):
    return  # permission errors surface on the first write
  path = workdir_path(workdir)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f'--workdir={workdir} is not a directory; choose a directory.')
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test'):
      pass
  except OSError as error:
    raise WorkdirError(
      f'--workdir={workdir} cannot be written ({error.strerror}); choose a directory you can write.'
    ) from None


def now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


# ----------------------------------------------------------------------------- the record


def write_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Writes ``config`` as the run's record, ``<workdir>/config.json`` (process 0 only)."""
  if jax.process_index() == 0:
    path = workdir_path(workdir) / CONFIG_FILE
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
    files.write_atomically(path, text)


def has_config(workdir: str | os.PathLike) -> bool:
  """Whether the workdir holds a record (``config.json``)."""
  return (workdir_path(workdir) / CONFIG_FILE).exists()


def read_config(workdir: str | os.PathLike, rules: RecordRules) -> ml_collections.ConfigDict:
  """The config a run recorded in ``<workdir>/config.json``, checked field by field.

  Every field must be present (except those a restart may change freely, which a record
  may lack), of its type and in range (``rules.check``), so a damaged file is one clear
  error rather than a crash where a field is first used.

  Raises:
    WorkdirError: no such workdir or file, or a file that is not a usable record (not
      JSON, not an object, a field missing or of the wrong type), naming the field.
  """
  root = workdir_path(workdir)
  path = root / CONFIG_FILE
  if not root.is_dir():
    missing = 'does not exist' if not root.exists() else 'is not a directory'
    raise WorkdirError(f'workdir {workdir} {missing}; pass the --workdir of a training run.')
  if not path.exists():
    raise WorkdirError(
      f'{path} is missing: {workdir} is not a training workdir (main.py writes it).'
    )
  fix = (
    'restore it from a copy (every checkpoint keeps one, under "config" in '
    f'{checkpoint_dir(workdir)}/<step>/meta/metadata) or use a new --workdir.'
  )
  value = _read_record(path, fix)
  config = ml_collections.ConfigDict(_reconcile(path, value, rules))
  try:
    rules.check(config)
  except ValueError as error:
    raise WorkdirError(f'{path} is not a usable record ({str(error).rstrip(".")}); {fix}') from None
  return config


def _read_record(path: epath.Path, fix: str) -> dict[str, Any]:
  """The JSON object of ``config.json``, as written."""
  try:
    value = json.loads(files.read_bytes(path, limit=MAX_RECORD_BYTES, what='a config.json'))
  except files.FileError as error:
    raise WorkdirError(f'{error}; {fix}') from None
  except (ValueError, UnicodeDecodeError) as error:
    raise WorkdirError(f'{path} is not valid JSON ({error}); {fix}') from None
  if not isinstance(value, dict):
    raise WorkdirError(f'{path} holds a JSON {type(value).__name__}, not a config object; {fix}')
  return value


# (record, field) pairs already reported: a run reads its record several times.
_reported: set[tuple[str, str]] = set()


def _report_once(path: epath.Path, name: str, message: str, *args: Any) -> None:
  if (str(path), name) not in _reported:
    _reported.add((str(path), name))
    logging.warning(message, *args)


def _reconcile(path: epath.Path, record: dict[str, Any], rules: RecordRules) -> dict[str, Any]:
  """The record as this code reads it: keys it does not know dropped (each reported once),
  fields newer than the record given the value a run without them trained with."""
  flat = _flat(record)
  if rules.fields:
    for name in sorted(set(flat) - rules.fields):
      _report_once(
        path,
        name,
        '%s holds %s, which this gsa-flax does not know (a field of another version, or '
        'added by hand): ignored.',
        path,
        name,
      )
      del flat[name]
  for name, default in rules.defaults.items():
    if name not in flat:
      _report_once(
        path,
        name,
        '%s has no %s (written before the field existed): it takes the value runs had '
        'without it, %r.',
        path,
        name,
        default,
      )
      flat[name] = default
  nested: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split('.')
    target = nested
    for parent in parents:
      target = target.setdefault(parent, {})
    target[leaf] = value
  return nested


_ABSENT = '(absent)'


def _flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """``{'gsa.num_heads': 4, ...}`` with JSON values (tuples as lists), for comparing."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = json.loads(json.dumps(value, default=str))
  return flat


def changed_fields(
  record: ml_collections.ConfigDict, config: ml_collections.ConfigDict, free_fields: frozenset[str]
) -> dict[str, tuple[Any, Any]]:
  """The fields that change what is trained and differ: ``{name: (recorded, new)}``.

  Fields of ``free_fields`` are left out; a field present on one side only is a
  change from or to ``'(absent)'``.
  """
  old, new = _flat(record.to_dict()), _flat(config.to_dict())
  changes = {}
  for name in sorted(old.keys() | new.keys()):
    if name in free_fields:
      continue
    before, after = old.get(name, _ABSENT), new.get(name, _ABSENT)
    if before != after:
      changes[name] = (before, after)
  return changes


def check_against_record(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike, rules: RecordRules
) -> dict[str, tuple[Any, Any]]:
  """Compares ``config`` with the run's record; returns the changes it is allowed to make.

  Returns:
    ``{name: (recorded, new)}`` for the fields listed in ``config.allow_config_changes``
    that differ (empty when nothing that is trained changed, or there is no record).

  Raises:
    ConfigChangedError: a field that changes what is trained differs and is not listed;
      one line naming every such field with both values.
    WorkdirError: the record is damaged (see :func:`read_config`).
  """
  if not has_config(workdir):
    return {}
  changes = changed_fields(read_config(workdir, rules), config, rules.free_fields)
  allowed = set(rules.allowed_changes(config))
  refused = [name for name in changes if name not in allowed]
  if refused:
    listed = ', '.join(
      f'{name} {json.dumps(changes[name][0])} -> {json.dumps(changes[name][1])}' for name in refused
    )
    raise ConfigChangedError(
      f'the config differs from {workdir_path(workdir) / CONFIG_FILE}, the record of this run, '
      f'in what is trained: {listed}. Rerun with the recorded values, use a new --workdir, or '
      f'accept the change with --config.allow_config_changes={",".join(refused)} (it is '
      f'recorded in {HISTORY_FILE}).'
    )
  return changes


def record_changes(
  workdir: str | os.PathLike, changes: dict[str, tuple[Any, Any]], step: int, rules: RecordRules
) -> None:
  """Appends accepted changes to ``config_history.jsonl`` and writes them into the record.

  Process 0 only. Each line of the history is ``{"time", "step", "changes": {name: {"old",
  "new"}}}``; ``step`` is the step the run resumes from.
  """
  if not changes or jax.process_index() > 0:
    return
  root = workdir_path(workdir)
  entry = {
    'time': now(),
    'step': step,
    'changes': {name: {'old': old, 'new': new} for name, (old, new) in changes.items()},
  }
  history = root / HISTORY_FILE
  previous = b''
  if history.exists():
    previous = files.read_bytes(history, limit=MAX_RECORD_BYTES, what='a config history')
  files.write_atomically(history, previous + (json.dumps(entry, sort_keys=True) + '\n').encode())
  read_config(workdir, rules)  # checked; the file's own keys are kept, unknown ones too
  record = _read_record(root / CONFIG_FILE, '')
  for name, (_, new) in changes.items():
    *parents, leaf = name.split('.')
    target = record
    for parent in parents:
      target = target.setdefault(parent, {})
    if new == _ABSENT:
      target.pop(leaf, None)
    else:
      target[leaf] = new
  files.write_atomically(root / CONFIG_FILE, json.dumps(record, indent=2, sort_keys=True))
