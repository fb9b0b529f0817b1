"""What stages share: the work directory layout, the teacher, the latest student.

W/config.json          the run's config
W/teacher_hf/          the teacher converted from llama2.c (when teacher.path is a .bin)
W/init/                the SVD-initialised student: ckpt/, report.json, report.md
W/distill/, W/dpo/     training stages: ckpt/, metrics.jsonl, tb/
W/results.json, .md    what `eval` measured
W/export/hf/           the Hugging Face export

W and the model paths may be gs:// URIs: every check and read here goes through etils.epath
(xecomla/fileio.py), and no URI is made absolute (os.path.abspath would make it a local path).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import logging
from etils import epath

from xecomla import ckpt, distributed, fileio, hub
from xecomla.cli import UsageError
from xecomla.convert import hf, llama2c
from xecomla.models import transformer
from xecomla.model_options import (DTYPES, REMAT, compute_dtype, frozen_dtype,  # noqa: F401
                                   model_kwargs)  # how stages build models (re-exported)
from xecomla.models.config import LlamaConfig, MLAConfig

STUDENT_STAGES = ('dpo', 'distill', 'align', 'init')  # latest first


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def checkpoints(workdir: str, stage: str, keep: int = 2) -> ckpt.StageCheckpoints:
  return ckpt.StageCheckpoints(os.path.join(stage_dir(workdir, stage), 'ckpt'), keep=keep)


def has_checkpoint(workdir: str, stage: str) -> bool:
  return latest_step_dir(workdir, stage) is not None


# ----------------------------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------------------------

def hf_dir(path: str, tokenizer: str, workdir: str, name: str = 'teacher_hf',
           field: str = 'teacher.path') -> str:
  """A Hugging Face Llama directory for `path`: itself, its Hub snapshot (a Hub id), or its
  conversion (llama2.c .bin)."""
  if not path:
    raise UsageError(f'{field} is empty: set --config.{field} to a Hugging Face Llama directory, '
                     'a Hub id or a llama2.c .bin.')
  path = hub.resolve(path, field)
  if epath.Path(path).is_dir():
    return path
  if not epath.Path(path).exists():
    raise UsageError(f'teacher path {path} does not exist: point it to a Hugging Face Llama '
                     'directory or a llama2.c .bin (is ../shared/data beside the project?).')
  if not path.endswith('.bin'):
    raise UsageError(f'teacher path {path} is a file but not a llama2.c .bin: give a directory.')
  if not tokenizer:
    raise UsageError(f'teacher path {path} is a llama2.c checkpoint: set teacher.tokenizer to '
                     'its tok*.bin.')
  out = os.path.join(workdir, name)
  if not epath.Path(out, 'config.json').exists() and distributed.is_writer():
    logging.info('converting llama2.c %s -> %s', path, out)
    if epath.Path(out).is_dir() and not fileio.is_nonempty_dir(out):
      epath.Path(out).rmdir()
    llama2c.convert(path, tokenizer, out)
  distributed.barrier('xecomla_teacher_hf')  # the others read what process 0 converted
  return out


def check_teacher(path: str, tokenizer: str, workdir: str | None, name: str = 'teacher_hf',
                  field: str = 'teacher.path') -> LlamaConfig:
  """What `hf_dir` would give, checked from cheap facts only (config.json and safetensors headers,
  or the llama2.c header, size and tokenizer), writing nothing (but the Hugging Face cache, when a
  Hub id not cached there is downloaded: hub.py)."""
  if not path:
    raise UsageError(f'{field} is empty: set --config.{field} to a Hugging Face Llama directory, '
                     'a Hub id or a llama2.c .bin.')
  path = hub.resolve(path, field)
  if epath.Path(path).is_dir():
    return hf.check_llama_dir(path)
  if not epath.Path(path).exists():
    raise UsageError(f'{field}={path} does not exist: point it to a Hugging Face Llama directory '
                     'or a llama2.c .bin (is ../shared/data beside the project?).')
  if not path.endswith('.bin'):
    raise UsageError(f'{field}={path} is a file but not a llama2.c .bin: give a Hugging Face '
                     'Llama directory.')
  converted = os.path.join(workdir, name) if workdir else None
  if converted and epath.Path(converted, 'config.json').exists():
    return hf.check_llama_dir(converted)
  if not tokenizer:
    raise UsageError(f'{field}={path} is a llama2.c checkpoint: set teacher.tokenizer to its '
                     'tok*.bin.')
  if not epath.Path(tokenizer).is_file():
    raise UsageError(f'teacher.tokenizer={tokenizer} does not exist: set it to the tok*.bin of '
                     f'{path}.')
  config = llama2c.read_config(path)
  from xecomla.convert.tokenizer import LlamaC2Tokenizer
  try:
    pieces = LlamaC2Tokenizer.load(tokenizer).vocab_size
  except Exception as e:  # noqa: BLE001 - any unreadable tokenizer is bad input
    raise UsageError(f'teacher.tokenizer={tokenizer} is not a llama2.c tokenizer ({e}): give the '
                     f'tok*.bin of {path}.') from e
  if pieces != config.vocab_size:
    raise UsageError(f'teacher.tokenizer={tokenizer} has {pieces} pieces, the checkpoint '
                     f'{config.vocab_size}: give the tokenizer the checkpoint was trained with.')
  return config


def converted_dir(path: str, workdir: str, name: str = 'teacher_hf') -> str | None:
  """The Hugging Face directory of a teacher if it exists already (itself, or its conversion)."""
  if epath.Path(path).is_dir():
    return path
  out = os.path.join(workdir, name)
  return out if epath.Path(out, 'config.json').exists() else None


def teacher_dir(config, workdir: str) -> str:
  return hf_dir(config.teacher.path, config.teacher.tokenizer, workdir)


def load_teacher(config, workdir: str) -> tuple[str, LlamaConfig, dict]:
  directory = teacher_dir(config, workdir)
  llama, params = hf.load_llama(directory)
  return directory, llama, params


# ----------------------------------------------------------------------------------------------
# Student
# ----------------------------------------------------------------------------------------------

def load_student_from(workdir: str, stage: str, step: int | None = None,
                      shardings: Any = None) -> tuple[MLAConfig, dict, dict]:
  """(architecture, float32 parameters, meta) of a stage's checkpoint (default its latest).
  With `shardings`, restored straight into them: each process reads only its devices' shards."""
  cks = checkpoints(workdir, stage)
  try:
    meta = cks.read_meta(step)
    cfg = MLAConfig.from_dict(meta['model'])
    abstract = transformer.abstract_params(cfg)
    if shardings is None and jax.process_count() > 1:  # a whole copy on a local device each
      local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: local, abstract)
    if shardings is not None:
      abstract = ckpt.abstract_like(abstract, shardings)
    restored = cks.restore(step, abstract={'params': abstract}, items=('params',))
  finally:
    cks.close()
  return cfg, restored['params'], meta


def latest_step_dir(workdir: str, stage: str) -> str | None:
  d = os.path.join(stage_dir(workdir, stage), 'ckpt')
  steps = ([int(p.name) for p in epath.Path(d).iterdir() if p.name.isdigit()]
           if epath.Path(d).is_dir() else [])
  return os.path.join(d, str(max(steps))) if steps else None


def peek_meta(workdir: str, stage: str) -> dict | None:
  """The JSON meta of a stage's latest checkpoint, read from its file without orbax (which would
  create directories): None when the stage has no checkpoint."""
  step = latest_step_dir(workdir, stage)
  if step is None:
    return None
  path = os.path.join(step, 'meta', 'metadata')
  try:
    return fileio.read_json(path)
  except (OSError, ValueError) as e:
    raise UsageError(f'{path} cannot be read ({e}): the work directory {workdir} is damaged; use a '
                     'new --workdir, or delete it to start fresh.') from e


def latest_student(workdir: str, before: str | None = None) -> tuple[str, MLAConfig, dict, dict] | None:
  """The student of the latest stage that has one (dpo, then distill, then init); with `before`,
  only stages that come before it in the pipeline."""
  stages = STUDENT_STAGES
  if before is not None:
    stages = stages[stages.index(before) + 1:] if before in stages else stages
  for stage in stages:
    if has_checkpoint(workdir, stage):
      cfg, params, meta = load_student_from(workdir, stage)
      return stage, cfg, params, meta
  return None


# ----------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------

FRESH = 'use a new --workdir, or delete {w} to start fresh'
RESUME_SECTIONS = ('teacher', 'mla')  # what a work directory's students were made from


def _normalised(section: str, values: dict) -> dict:
  out = dict(values)
  if section == 'mla' and not out.get('r_q'):
    out['r_q'] = None  # 0 and None both mean an uncompressed query
  if section == 'teacher':
    out = {k: hub.normalised(v) if isinstance(v, str) and v else v for k, v in out.items()}
  return out


def check_resume(config, workdir: str, init_options: dict[str, Any]) -> None:
  """Refuses a work directory whose run was made with other teacher or mla settings (its
  config.json, or the options its init student records): resuming would mix two experiments."""
  fix = FRESH.format(w=workdir)
  path = os.path.join(workdir, 'config.json')
  if epath.Path(path).exists():
    try:
      old = fileio.read_json(path)
    except (OSError, ValueError) as e:
      raise UsageError(f'{path} is not valid JSON ({e}): {fix}.') from e
    new = json.loads(config.to_json_best_effort())
    diffs = []
    for section in RESUME_SECTIONS:
      a, b = (_normalised(section, c.get(section) or {}) for c in (old, new))
      diffs += [f'{section}.{k} {a[k]!r} -> {b[k]!r}' for k in sorted(set(a) & set(b))
                if a[k] != b[k]]
    if diffs:
      raise UsageError(f'{workdir} holds a run with other settings ({", ".join(diffs)}): refusing '
                       f'to resume it; {fix}.')
  meta = peek_meta(workdir, 'init')
  if meta is not None:
    old = meta.get('report', {}).get('options', {})
    diffs = [f'mla.{k} {old[k]!r} -> {v!r}' for k, v in init_options.items()
             if k in old and old[k] != v]
    if diffs:
      raise UsageError(f'{stage_dir(workdir, "init")} holds a student made with other mla settings '
                       f'({", ".join(diffs)}): refusing to resume it; {fix}.')
