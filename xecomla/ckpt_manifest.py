"""What a committed checkpoint step must hold: its manifest (the size of every file of every
item, written inside the step before orbax commits it) and the checks `ckpt.restore` runs before
reading a step (see xecomla/ckpt.py for why sizes, not hashes). Through etils.epath, so a step on
gs:// is checked as a local one is (a listing per directory and a stat per file)."""

from __future__ import annotations

from etils import epath

from xecomla import fileio

MANIFEST = 'xecomla_manifest.json'
COMMIT = 'commit_success.txt'


def _sizes(directory: epath.Path, prefix: str) -> dict[str, int]:
  """{relative path: size} of every file below `directory` (os.walk's relpaths: '/'-joined)."""
  out = {}
  for p in sorted(directory.iterdir()):
    rel = f'{prefix}/{p.name}'
    if p.is_dir():
      out.update(_sizes(p, rel))
    else:
      out[rel] = p.stat().length
  return out


def manifest_of(step_dir: fileio.PathLike) -> dict:
  """{'items': [...], 'files': {relative path: size}} of the item subdirectories of a step."""
  step = epath.Path(step_dir)
  items = sorted(p.name for p in step.iterdir() if p.is_dir())
  files = {}
  for item in items:
    files.update(_sizes(step / item, item))
  return {'items': items, 'files': files}


def check_step_dir(step_dir: fileio.PathLike, items: tuple[str, ...] = ()) -> str | None:
  """Why the step directory cannot be restored, or None if it looks complete."""
  step = epath.Path(step_dir)
  if not step.is_dir():
    return 'missing'
  if not (step / COMMIT).exists():
    return f'half-written: no {COMMIT}'
  path = step / MANIFEST
  if path.exists():
    try:
      manifest = fileio.read_json(path)
      files = manifest['files']
    except (ValueError, KeyError, OSError) as e:
      return f'{MANIFEST} unreadable ({e})'
    for item in manifest.get('items', []):
      if not (step / item).is_dir():
        return f'item {item!r} is missing'
    for rel, size in sorted(files.items()):
      p = step / rel
      if not p.exists():
        return f'{rel} is missing'
      if (got := p.stat().length) != size:
        return f'{rel} is {got} bytes, {size} were written (truncated?)'
  for item in items:
    if not (step / item / COMMIT).exists():
      return f'item {item!r} is missing'
  return None
