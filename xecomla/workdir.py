"""What stages share: the work directory layout, the teacher, the latest student.

W/config.json          the run's config
W/teacher_hf/          the teacher converted from llama2.c (when teacher.path is a .bin)
W/init/                the SVD-initialised student: ckpt/, report.json, report.md
W/distill/, W/dpo/     training stages: ckpt/, metrics.jsonl, tb/
W/results.json, .md    what `eval` measured
W/export/hf/           the Hugging Face export
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
from absl import logging

from xecomla import ckpt
from xecomla.cli import UsageError
from xecomla.convert import hf, llama2c
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig, MLAConfig

STUDENT_STAGES = ('dpo', 'distill', 'init')  # latest first
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(config) -> Any:
  if config.dtype not in DTYPES:
    raise UsageError(f'dtype {config.dtype!r} is not supported: use float32 or bfloat16.')
  return DTYPES[config.dtype]


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def checkpoints(workdir: str, stage: str, keep: int = 2) -> ckpt.StageCheckpoints:
  return ckpt.StageCheckpoints(os.path.join(stage_dir(workdir, stage), 'ckpt'), keep=keep)


def has_checkpoint(workdir: str, stage: str) -> bool:
  d = os.path.join(stage_dir(workdir, stage), 'ckpt')
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


# ----------------------------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------------------------

def hf_dir(path: str, tokenizer: str, workdir: str, name: str = 'teacher_hf') -> str:
  """A Hugging Face Llama directory for `path`: itself, or its conversion (llama2.c .bin)."""
  if not path:
    raise UsageError('teacher.path is empty: set --config.teacher.path to a Hugging Face Llama '
                     'directory or a llama2.c .bin.')
  if os.path.isdir(path):
    return path
  if not os.path.exists(path):
    raise UsageError(f'teacher path {path} does not exist: point it to a Hugging Face Llama '
                     'directory or a llama2.c .bin (is ../shared/data beside the project?).')
  if not path.endswith('.bin'):
    raise UsageError(f'teacher path {path} is a file but not a llama2.c .bin: give a directory.')
  if not tokenizer:
    raise UsageError(f'teacher path {path} is a llama2.c checkpoint: set teacher.tokenizer to '
                     'its tok*.bin.')
  out = os.path.join(workdir, name)
  if not os.path.exists(os.path.join(out, 'config.json')):
    logging.info('converting llama2.c %s -> %s', path, out)
    if os.path.isdir(out) and not os.listdir(out):
      os.rmdir(out)
    llama2c.convert(path, tokenizer, out)
  return out


def teacher_dir(config, workdir: str) -> str:
  return hf_dir(config.teacher.path, config.teacher.tokenizer, workdir)


def load_teacher(config, workdir: str) -> tuple[str, LlamaConfig, dict]:
  directory = teacher_dir(config, workdir)
  llama, params = hf.load_llama(directory)
  return directory, llama, params


# ----------------------------------------------------------------------------------------------
# Student
# ----------------------------------------------------------------------------------------------

def load_student_from(workdir: str, stage: str, step: int | None = None) -> tuple[MLAConfig, dict, dict]:
  """(architecture, float32 parameters, meta) of a stage's checkpoint (default its latest)."""
  cks = checkpoints(workdir, stage)
  try:
    meta = cks.read_meta(step)
    cfg = MLAConfig.from_dict(meta['model'])
    restored = cks.restore(step, abstract={'params': transformer.abstract_params(cfg)},
                           items=('params',))
  finally:
    cks.close()
  return cfg, restored['params'], meta


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
