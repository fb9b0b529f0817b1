"""Sweep points: what a config file's `get_sweep(arg)` returns, checked (one-line UsageErrors
naming the point and the fix), turned into xecomla.main's arguments and config, and whether a
point's work directory already holds its finished run (xecomla/sweep.py runs them)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re

from etils import epath

from xecomla.cli import UsageError

NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')
KEYS = {'name', 'arg', 'overrides'}
RESERVED = {'logs', 'sweep.json', 'sweep.md', 'sweep.png'}  # what else ROOT holds


@dataclasses.dataclass(frozen=True)
class Point:
  name: str
  arg: str = ''
  overrides: tuple[tuple[str, str], ...] = ()


def one_line(e: Exception) -> str:
  """An exception's message on one line: the innermost message of wrapped ones (ml_collections
  wraps a KeyError in an AttributeError), its lines joined; the last line of a traceback."""
  while e.args and isinstance(e.args[0], Exception):
    e = e.args[0]
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if 'Traceback' in text:
    lines = lines[-1:]
  return ' '.join(lines) or type(e).__name__


def flag_value(field: str, value) -> str:
  """A config value as ml_collections parses it from `--config.field=value`."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if value is None or isinstance(value, (dict, list, tuple)):
    raise UsageError(f'sweep override {field}={value!r}: give a number, string or bool')
  return str(value)


def load_module(path: str):
  """The config file as a module (configs import `configs.*`: run from the project root)."""
  if not os.path.isfile(path):
    raise UsageError(f'--config={path}: no such file: give a config file, e.g. '
                     'configs/stories260k_sweep.py')
  spec = importlib.util.spec_from_file_location(f'_sweep_{os.path.basename(path)[:-3]}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - whatever the config file raised
    raise UsageError(f'--config={path} cannot be loaded ({one_line(e)}): fix the file') from e
  return module


def parse_point(raw, path: str) -> Point:
  where = f'a sweep point of {path}'
  if not isinstance(raw, dict) or not isinstance(raw.get('name'), str):
    raise UsageError(f'{where} is {raw!r}: give a dict with a "name" (and "arg", "overrides")')
  unknown = sorted(set(raw) - KEYS)
  if unknown:
    raise UsageError(f'sweep point {raw["name"]!r} has unknown keys {unknown}: use only '
                     f'{sorted(KEYS)}')
  if not NAME.match(raw['name']) or raw['name'] in RESERVED:
    raise UsageError(f'sweep point name {raw["name"]!r}: use letters, digits, ".", "_", "-" '
                     f'(it names the work directory), and none of {sorted(RESERVED)}')
  overrides = raw.get('overrides') or {}
  if not isinstance(raw.get('arg', ''), str) or not isinstance(overrides, dict):
    raise UsageError(f'sweep point {raw["name"]!r}: "arg" must be a string and "overrides" a '
                     'dict {field: value}')
  return Point(raw['name'], raw.get('arg', ''),
               tuple((k, flag_value(k, v)) for k, v in overrides.items()))


def load_sweep(config_spec: str) -> tuple[str, list[Point]]:
  """(config file, its points) for --config=FILE[:ARG]."""
  path, _, arg = config_spec.partition(':')
  module = load_module(path)
  if not callable(getattr(module, 'get_sweep', None)):
    raise UsageError(f'{path} defines no sweep: add get_sweep(arg) returning the points (see '
                     'configs/stories260k_sweep.py), or run it with python -m xecomla.main')
  try:
    raw = module.get_sweep(arg or None)
  except Exception as e:  # noqa: BLE001 - whatever the config file raised
    raise UsageError(f'{path}: get_sweep({arg!r}) failed ({one_line(e)}): fix the argument') from e
  points = [parse_point(r, path) for r in (raw or [])]
  if not points:
    raise UsageError(f'{path}: get_sweep({arg!r}) returned no points: return at least one')
  names = [p.name for p in points]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise UsageError(f'{path}: sweep point names {dup} repeat: give every point its own name')
  return path, points


def select(points: list[Point], only: str | None) -> list[Point]:
  if not only:
    return points
  wanted = [n.strip() for n in only.split(',') if n.strip()]
  names = [p.name for p in points]
  unknown = [n for n in wanted if n not in names]
  if unknown or not wanted:
    raise UsageError(f'--only={only}: unknown sweep point {(unknown or ["(none)"])[0]!r}; choose '
                     f'from {",".join(names)}')
  return [p for p in points if p.name in wanted]


def main_args(path: str, point: Point, workdir: str) -> list[str]:
  """The arguments of `python -m xecomla.main` for a point."""
  config = f'{path}:{point.arg}' if point.arg else path
  return ([f'--config={config}', f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in point.overrides])


def point_config(path: str, point: Point):
  """The point's config exactly as xecomla.main builds it (ml_collections' own flag parsing)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ['sweep'] + [a for a in main_args(path, point, '') if not a.startswith('--workdir')]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, sys_argv=argv)
  try:
    fv(argv)
    config = fv.config
    config.keys()
  except Exception as e:  # noqa: BLE001 - flag and config errors of every kind are bad input
    what = 'unknown config field' if isinstance(e, (AttributeError, KeyError)) else 'bad value'
    raise UsageError(f'sweep point {point.name!r} of {path}: {what} ({one_line(e)}): fix its '
                     '"arg" or "overrides" in get_sweep') from e
  return config


def status(workdir: str, config) -> str:
  """'done' (results.json, and config.json equal to this config), 'differs' (a run with other
  settings: xecomla.main resumes or refuses it), 'todo', or 'unchecked: why' (not readable
  from here); only 'done' is skipped."""
  w = epath.Path(workdir)
  try:
    if not (w / 'config.json').exists():
      return 'todo'
  except (ImportError, OSError) as e:  # e.g. gs:// without gcsfs here: the job itself will know
    return f'unchecked: {one_line(e)}'
  try:
    old = json.loads((w / 'config.json').read_text())
  except ValueError:
    return 'differs'
  # every field of the config, as the run recorded it (a run adds records, e.g. `resolved`)
  same = all(k in old and old[k] == v for k, v in json.loads(config.to_json_best_effort()).items())
  if not same:
    return 'differs'
  return 'done' if (w / 'results.json').exists() else 'todo'
