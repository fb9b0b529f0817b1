"""Distillation data sampled from the teacher: unlimited in-distribution text (`data.teacher_stories`).

Stories are drawn with `rollout` (BOS-started, jit-compiled decode through the teacher's cache,
ending at EOS/BOS or `data.teacher_max_len`), `data.teacher_batch` rows per call, each row from
its own key (seed, row id): the stories do not depend on the batch size or the machine's devices,
only on the settings below. They are cached on disk under a key of those settings,

  <data.teacher_cache or W/teacher_data>/<key>/settings.json, part-00000.npz, ..., done.json

one part per batch, each written atomically: a rerun (or another run with the same settings: a
study points every run at one cache) reads them instead of generating, an interrupted generation
resumes at the first missing part, and a run asking for more stories than the cache holds adds
the missing ones (story i does not depend on the count, so the count is not in the key).
done.json holds how many are complete and the throughput measured while generating (stories and
tokens per second, compilation excluded).

The teacher is named in the key by its source (teacher.path or distill.teacher_path as resolved:
a llama2.c file, a directory, a Hub snapshot) and each file's size and a hash of its bytes when
it is at most HASH_BYTES (so a re-copied or re-downloaded small teacher keeps its cache), or its
modification time when larger (hashing gigabytes of weights per run would cost more than it
protects against). The stories are drawn on the stage's mesh, the teacher in the trainer's
shardings and the rows over the batch axes, by every process together; process 0 writes the
parts and done.json, then all read them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time

import numpy as np
from etils import epath

from xecomla import console, distributed, fileio, rollout, sharding
from xecomla.cli import UsageError
from xecomla.generate import Sampling
from xecomla.models import transformer

VERSION = 1  # of the sampling procedure: bump when rollout's draws change
HASH_BYTES = 64 << 20  # files up to this size are named by their bytes, larger ones by mtime


def _fingerprint(p: epath.Path, size: int) -> str:
  if size > HASH_BYTES:
    return f'mtime:{int(p.stat().mtime)}'
  h = hashlib.sha256()
  with p.open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return f'sha256:{h.hexdigest()[:16]}'


def identity(source: str) -> list:
  """(name, size, fingerprint) of the teacher's source file, or of each file of its directory."""
  path = epath.Path(source)
  files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
  sizes = [int(p.stat().length) for p in files]
  return sorted((p.name, n, _fingerprint(p, n)) for p, n in zip(files, sizes))


def settings(config, source: str, max_seq_len: int) -> dict:
  """What the stories depend on (the cache key). Not their number: story i is the same whatever
  the count, so a cache of N stories is the first N of a longer one."""
  d = config.data
  return {'version': VERSION, 'teacher': str(source), 'teacher_files': identity(source),
          'temperature': float(d.teacher_temperature), 'top_p': float(d.teacher_top_p),
          'top_k': int(d.teacher_top_k), 'max_len': int(d.teacher_max_len or max_seq_len),
          'seed': int(d.teacher_seed)}


def cache_dir(config, workdir: str, s: dict) -> str:
  root = config.data.teacher_cache or os.path.join(workdir, 'teacher_data')
  key = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(root, key)


def check(config, max_seq_len: int) -> None:
  """The settings, against the generating teacher's maximum length."""
  d = config.data
  if d.teacher_stories < 0:
    raise UsageError(f'data.teacher_stories={d.teacher_stories} is negative: use 0 (off) or a count.')
  if not d.teacher_stories:
    return
  if not 0.0 < d.teacher_fraction <= 1.0:
    raise UsageError(f'data.teacher_fraction={d.teacher_fraction} must be in (0, 1]: the share of '
                     'training examples drawn from the teacher (1 = teacher stories only).')
  if d.teacher_temperature <= 0:
    raise UsageError(f'data.teacher_temperature={d.teacher_temperature} must be positive: sample at '
                     'e.g. 1.0 (greedy decoding would repeat one story).')
  if not 0.0 < d.teacher_top_p <= 1.0:
    raise UsageError(f'data.teacher_top_p={d.teacher_top_p} must be in (0, 1]: 1 samples from the '
                     'whole distribution.')
  if d.teacher_batch < 1 or d.teacher_max_len < 0 or d.teacher_top_k < 0:
    raise UsageError(f'data.teacher_batch={d.teacher_batch}, data.teacher_max_len='
                     f'{d.teacher_max_len}, data.teacher_top_k={d.teacher_top_k}: the batch must be '
                     'at least 1, the others not negative (0 = the model\'s length / all tokens).')
  if not 2 <= (d.teacher_max_len or max_seq_len) <= max_seq_len:
    raise UsageError(f'data.teacher_max_len={d.teacher_max_len} is outside 2..{max_seq_len} (the '
                     'teacher\'s maximum length): lower it, or 0 for the whole length.')
  if config.data.format != 'text':
    raise UsageError('data.teacher_stories needs data.format=text (teacher stories are plain text '
                     'documents): set data.teacher_stories=0 for chat data.')


def _part(directory: str, i: int) -> epath.Path:
  return epath.Path(directory, f'part-{i:05d}.npz')


def _write_part(path: epath.Path, docs: list[np.ndarray]) -> None:
  buf = io.BytesIO()
  np.savez(buf, tokens=np.concatenate(docs).astype(np.int32),
           lengths=np.asarray([len(x) for x in docs], np.int64))
  tmp = epath.Path(f'{path}.tmp-{os.getpid()}')
  tmp.write_bytes(buf.getvalue())
  tmp.replace(path)  # over a shorter part of a smaller count


def _read_part(path: epath.Path) -> list[np.ndarray]:
  with np.load(io.BytesIO(path.read_bytes())) as z:
    return np.split(z['tokens'], np.cumsum(z['lengths'])[:-1])


def _lengths(path: epath.Path) -> np.ndarray:
  with np.load(io.BytesIO(path.read_bytes())) as z:
    return z['lengths']


def read_cache(directory: str, n: int) -> list[np.ndarray]:
  """The first n stories of a cache directory, in row order."""
  batch = int(fileio.read_json(os.path.join(directory, 'settings.json'))['batch'])
  docs = [d for i in range(-(-n // batch)) for d in _read_part(_part(directory, i))]
  return docs[:n]


def missing(directory: str, n: int, batch: int, have: int = 0) -> list[int]:
  """The parts the first n stories need that are absent or shorter (the last of a smaller count).
  `have`: the count done.json records; a part holds at least its share of those, so only the parts
  it cannot vouch for (written since, or the short last one) are opened to count their rows."""
  out = []
  for i in range(-(-n // batch)):
    path, need = _part(directory, i), min(batch, n - i * batch)
    if not path.exists() or (min(batch, have - i * batch) < need and len(_lengths(path)) < need):
      out.append(i)
  return out


def batch_of(directory: str, batch: int) -> int:
  """The batch the cache's parts were written with (settings.json), else `batch`."""
  recorded = epath.Path(directory, 'settings.json')
  return int(fileio.read_json(recorded).get('batch', batch)) if recorded.exists() else batch


def generate(directory: str, s: dict, n: int, llama, params, batch: int, mesh,
             todo: list[int]) -> dict:
  """Draws parts `todo` of `directory` on `mesh` (every process calls this; process 0 writes
  each part and done.json); returns the stats. `batch` is the cache's (batch_of)."""
  if distributed.is_writer():
    fileio.atomic_write_json(epath.Path(directory, 'settings.json'), {**s, 'batch': batch})
  shardings = sharding.tree_shardings(transformer.abstract_params(llama),
                                      transformer.param_axes(llama), mesh)
  params = sharding.put(params, shardings)
  gen = rollout.Generator(transformer.graphdef(llama), mesh, shardings, batch=batch,
                          length=s['max_len'], bos_id=llama.bos_id, eos_ids=tuple(llama.eos_ids),
                          sampling=Sampling(temperature=s['temperature'], top_p=s['top_p'],
                                            top_k=s['top_k']))
  timed_s, timed_rows, timed_tokens = 0.0, 0, 0
  for j, i in enumerate(todo):
    rows = min(batch, n - i * batch)
    t0 = time.perf_counter()
    docs = gen(params, seed=s['seed'], first_row=i * batch, rows=rows)
    dt = time.perf_counter() - t0
    if j:  # the first call compiles: not timed
      timed_s, timed_rows, timed_tokens = timed_s + dt, timed_rows + rows, timed_tokens + sum(map(len, docs))
    if distributed.is_writer():
      _write_part(_part(directory, i), docs)
    console.status(f'teacher data: part {j + 1}/{len(todo)} ({min((i + 1) * batch, n)}/{n} '
                   'stories)', j + 1 == len(todo))
  stats = {'stories': n, 'batch': batch, 'devices': int(mesh.devices.size),
           'stories_per_s': timed_rows / timed_s if timed_s else None,
           'tokens_per_s': timed_tokens / timed_s if timed_s else None,
           'decoded_positions_per_s': timed_rows * (s['max_len'] - 1) / timed_s if timed_s else None,
           'timed_s': timed_s}
  done = epath.Path(directory, 'done.json')
  if done.exists() and timed_s == 0.0:  # nothing timed here: keep the throughput measured before
    stats = {**fileio.read_json(done), 'stories': n}
  if distributed.is_writer():
    stats['tokens'] = int(sum(_lengths(_part(directory, i))[:min(batch, n - i * batch)].sum()
                              for i in range(-(-n // batch))))
    fileio.atomic_write_json(done, stats)
  return stats


def stories(config, workdir: str, source: str, teacher_dir: str,
            mesh) -> tuple[list[np.ndarray], dict]:
  """The teacher's first data.teacher_stories stories (token ids, BOS first) for this config,
  generated once on `mesh` by the model in `teacher_dir` (converted from `source`, which names it
  in the key); a cache holding fewer is extended. Every process takes part."""
  from xecomla.convert import hf, hf_config  # the length is read without loading the weights
  s = settings(config, source, hf_config.read_llama_config(teacher_dir).max_seq_len)
  n = int(config.data.teacher_stories)
  directory = cache_dir(config, workdir, s)
  batch = batch_of(directory, int(config.data.teacher_batch))
  done = epath.Path(directory, 'done.json')
  have = int(fileio.read_json(done)['stories']) if done.exists() else 0
  todo = missing(directory, n, batch, have)
  needed = bool(todo) or have < n
  distributed.barrier('xecomla_teacher_data_seen')  # nobody writes before everyone has looked
  if needed:
    if distributed.is_writer():
      epath.Path(directory).mkdir(parents=True, exist_ok=True)
    llama, params = hf.load_llama(teacher_dir)
    stats = generate(directory, s, n, llama, params, batch, mesh, todo)
    console.say('teacher data: %d stories in %s (%.0f tokens/s on %d devices)', n, directory,
                stats['tokens_per_s'] or 0.0, mesh.devices.size)
  distributed.barrier('xecomla_teacher_data')
  stats = fileio.read_json(done)
  docs = read_cache(directory, n)
  return docs, {**stats, 'stories': n, 'directory': directory,
                'mean_tokens': float(np.mean([len(d) for d in docs]))}


def for_config(config, workdir: str, kd_dir: str, mesh) -> list[np.ndarray] | None:
  """The stories a distill/align stage trains on (None when data.teacher_stories is 0), drawn
  on the stage's mesh when the cache lacks them."""
  if not config.data.teacher_stories:
    return None
  from xecomla import hub
  field = 'distill.teacher_path' if config.distill.teacher_path else 'teacher.path'
  source = hub.resolve(config.distill.teacher_path or config.teacher.path, field)
  docs, stats = stories(config, workdir, source, kd_dir, mesh)
  console.say('teacher data: %d stories, %.0f tokens each on average (%s)', len(docs),
              stats['mean_tokens'], stats['directory'])
  return docs
