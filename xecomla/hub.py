"""Hugging Face Hub model ids for teacher.path and distill.teacher_path.

A model field holds a local path (a Hugging Face directory or a llama2.c .bin), kept as it is, or
a Hub id `org/name` or `org/name@revision` (a branch, tag or commit), resolved to a snapshot
directory of the Hugging Face cache:
  1. from the cache, without network: HF_HUB_CACHE, else HF_HOME/hub, else
     ~/.cache/huggingface/hub (read at each call, not at import), in its snapshot layout
     models--org--name/refs/<revision> -> snapshots/<commit>/ (a commit names its snapshot);
  2. else downloaded with huggingface_hub.snapshot_download (config, safetensors, tokenizer and
     generation config files only), unless HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1).
A value that exists on disk is a local path even when it looks like an id. The cache wins over the
network: a cached revision is used until it is downloaded anew (pin `@commit` to be sure).
Neither cached nor downloadable: one UsageError line naming the id, the cache and the fix.

The lookup is huggingface_hub's own `snapshot_download(local_files_only=True)` with the cache
directory passed explicitly (its default is read when huggingface_hub is imported): it follows
refs/<revision> and commit hashes, and refuses a snapshot its cached file listing shows
incomplete; `complete` checks what a run needs where no listing was cached (older caches).
The cache is a local directory (huggingface_hub's), so `missing` checks it with os.path; a model
field that is a URI (gs://bucket/llama) is a path, never an id, and stays as it is.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

from etils import epath

from xecomla import fileio
from xecomla.cli import UsageError

ALLOW_PATTERNS = ('config.json', 'generation_config.json', '*.safetensors',
                  '*.safetensors.index.json', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                  'tokenizer.model', 'chat_template.jinja')
FIELDS = ('teacher.path', 'distill.teacher_path')
_PART = r'\w(?:[\w.-]*\w)?'  # huggingface_hub's repo id rule: word characters, '-', '.' inside
_ID = re.compile(rf'(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[\w.-]+(?:/[\w.-]+)*))?')


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """What a Hub id resolved to: `commit` names the revision a run used."""
  id: str
  revision: str
  commit: str
  path: str
  source: str  # 'cache' or 'download'


def parse(value) -> tuple[str, str] | None:
  """(repo id, revision) when `value` names a Hub model: shaped like `org/name[@revision]` and
  not a path that exists; None for anything else (local paths, URIs, llama2.c .bin files)."""
  if (not isinstance(value, str) or not fileio.is_local(value) or value.endswith('.bin') or
      epath.Path(value).exists()):
    return None
  m = _ID.fullmatch(value)
  if (not m or '--' in m['repo'] or '..' in m['repo'] or m['repo'].endswith('.git') or
      len(m['repo']) > 96):
    return None
  return m['repo'], m['revision'] or 'main'


def normalised(value: str) -> str:
  """How a resume compares a model field: a Hub id by its repo (its commit is compared from
  W/config.json's record), a local path as an absolute path, a URI as it is."""
  parsed = parse(value)
  if parsed:
    return parsed[0]
  return os.path.abspath(value) if fileio.is_local(value) else value


def cache_dir() -> str:
  """The Hugging Face hub cache as huggingface_hub computes it, from the environment now."""
  env = os.environ.get
  home = env('HF_HOME') or os.path.join(env('XDG_CACHE_HOME') or os.path.join('~', '.cache'),
                                        'huggingface')
  path = env('HF_HUB_CACHE') or env('HUGGINGFACE_HUB_CACHE') or os.path.join(
      os.path.expandvars(os.path.expanduser(home)), 'hub')
  return os.path.expandvars(os.path.expanduser(path))


def offline() -> bool:
  return any(os.environ.get(k, '').upper() in ('1', 'ON', 'YES', 'TRUE')
             for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'))


def missing(directory: str) -> list[str]:
  """What a run needs from a model directory and it lacks: config.json, tokenizer.json and
  every safetensors shard (model.safetensors, or all those its index names)."""
  out = [n for n in ('config.json', 'tokenizer.json')
         if not os.path.isfile(os.path.join(directory, n))]
  index = os.path.join(directory, 'model.safetensors.index.json')
  if os.path.isfile(index):
    try:
      with open(index, encoding='utf-8') as f:
        shards = sorted(set(json.load(f).get('weight_map', {}).values()))
    except (OSError, ValueError, AttributeError):
      return out + ['a readable model.safetensors.index.json']
    out += [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
  elif not glob.glob(os.path.join(directory, '*.safetensors')):
    out.append('model.safetensors')
  return out


def _cached(repo: str, revision: str, cache: str, patterns) -> tuple[str | None, str]:
  """(snapshot directory, '') from the cache without network, or (None, why not)."""
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import (HFValidationError, IncompleteSnapshotError,
                                      LocalEntryNotFoundError)
  try:
    path = snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True,
                             allow_patterns=list(patterns))
  except HFValidationError as e:
    return None, f'is not a valid Hub id ({str(e).strip()})'
  except IncompleteSnapshotError as e:
    return None, f'has an incomplete snapshot {e.snapshot_path} in the Hugging Face cache {cache}'
  except LocalEntryNotFoundError:
    return None, f'is not in the Hugging Face cache {cache}'
  lacks = missing(path) if patterns == ALLOW_PATTERNS else [
      p for p in patterns if not os.path.isfile(os.path.join(path, p))]
  if lacks:
    return None, (f'has a snapshot without {", ".join(lacks)} in the Hugging Face cache '
                  f'{cache} ({path})')
  return path, ''


def cached(value: str) -> str | None:
  """The cached snapshot of a Hub id that holds a config.json (enough for a plan), or None;
  never touches the network."""
  parsed = parse(value)
  if parsed is None:
    return None
  return _cached(*parsed, cache_dir(), ('config.json',))[0]


def _fix(repo: str, revision: str) -> str:
  rev = '' if revision == 'main' else f' --revision {revision}'
  return (f'run `hf download {repo}{rev}` on a machine with network (then copy its cache here), '
          'set HF_HUB_CACHE (or HF_HOME) to a cache that holds it, or give a local directory')


def _download(repo: str, revision: str, cache: str) -> str:
  from huggingface_hub import snapshot_download
  return snapshot_download(repo, revision=revision, cache_dir=cache,
                           allow_patterns=list(ALLOW_PATTERNS))


def _downloaded(repo: str, revision: str, cache: str, label: str, head: str) -> str:
  """_download, each failure one UsageError line (`head`: why the cache did not serve it)."""
  from huggingface_hub import errors
  try:
    return _download(repo, revision, cache)
  except errors.GatedRepoError as e:
    raise UsageError(f'{label}: {repo} is a gated repository this machine is not allowed to '
                     f'download: accept its licence at https://huggingface.co/{repo}, then log in '
                     'with `hf auth login` or set HF_TOKEN.') from e
  except errors.RevisionNotFoundError as e:
    raise UsageError(f'{label}: {repo} has no revision {revision!r}: give one of its branches, '
                     'tags or commits after the @, or none for main.') from e
  except errors.RepositoryNotFoundError as e:
    raise UsageError(f'{label}: {repo} is neither a model on the Hub that this machine can read '
                     f'nor in the Hugging Face cache {cache}: check the id; for a private '
                     'repository log in with `hf auth login` or set HF_TOKEN.') from e
  except errors.HfHubHTTPError as e:
    status = getattr(e.response, 'status_code', None)
    if status in (401, 403):
      raise UsageError(f'{label}: the Hub refused {repo} (HTTP {status}): log in with `hf auth '
                       'login` or set HF_TOKEN to a token that can read it.') from e
    reason = e
  except Exception as e:  # noqa: BLE001 - no network, a proxy, a full disk: the same advice
    reason = e
  first = (str(reason).strip().splitlines() or [''])[0][:200]
  raise UsageError(f'{head}; downloading it failed ({type(reason).__name__}: {first}): '
                   f'{_fix(repo, revision)}.') from reason


def snapshot(value: str, field: str) -> Snapshot | None:
  """The snapshot a Hub id names (from the cache, else downloaded), or None for a local path."""
  parsed = parse(value)
  if parsed is None:
    return None
  repo, revision = parsed
  cache = cache_dir()
  path, why = _cached(repo, revision, cache, ALLOW_PATTERNS)
  if path:
    return Snapshot(repo, revision, os.path.basename(path), path, 'cache')
  label = f'{field}={value}'
  if why.startswith('is not a valid Hub id'):
    raise UsageError(f'{label} is neither a local path nor a valid Hub id: give a local Hugging '
                     f'Face directory or an id org/name[@revision] {why[22:]}.')
  head = f'{label} is not a local path and {repo} (revision {revision}) {why}'
  if offline():
    raise UsageError(f'{head}; HF_HUB_OFFLINE=1 forbids downloading it: {_fix(repo, revision)}.')
  path = _downloaded(repo, revision, cache, label, head)
  lacks = missing(path)
  if lacks:
    raise UsageError(f'{label}: the Hub repository {repo} has no {", ".join(lacks)} (downloaded '
                     f'into {path}): give a Llama saved as safetensors with a tokenizer.json.')
  return Snapshot(repo, revision, os.path.basename(path), path, 'download')


def resolve(value: str, field: str) -> str:
  """A local path for a model field: the value itself, or the snapshot directory of its Hub id."""
  found = snapshot(value, field)
  return found.path if found else value


def resolve_config(config, workdir: str | None = None) -> dict[str, dict]:
  """Resolves the Hub ids of a config's model fields (early, so that a bad id fails before
  anything is written): {field: Snapshot as a dict}, for W/config.json's `resolved` record.
  Refuses to resume a work directory whose record has another commit of the same id."""
  out = {}
  for field in FIELDS:
    section, name = field.split('.')
    found = snapshot(config[section][name], field) if config[section][name] else None
    if found:
      out[field] = dataclasses.asdict(found)
  path = os.path.join(workdir, 'config.json') if workdir else ''
  if out and epath.Path(path).is_file():
    try:
      old = fileio.read_json(path).get('resolved') or {}
    except (OSError, ValueError):
      old = {}  # check_resume names a damaged config.json
    for field, new in out.items():
      was = old.get(field) or {}
      if was.get('id') == new['id'] and was.get('commit') != new['commit']:
        raise UsageError(f'{workdir} was run with {field}={new["id"]} at commit {was["commit"]}, '
                         f'which now resolves to {new["commit"]}: set {field}={new["id"]}@'
                         f'{was["commit"]} to resume it, or use a new --workdir.')
  return out
