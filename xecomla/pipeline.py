"""Runs the stages of config.stages in order; each resumes from its own checkpoints."""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

from absl import logging

from xecomla import fileio, workdir as wd
from xecomla.cli import UsageError

STAGES = ('init', 'distill', 'dpo', 'eval', 'export')
MODULES = {'init': 'init', 'distill': 'distill', 'dpo': 'dpo', 'eval': 'evaluate', 'export': 'export'}


def parse_stages(stages: str) -> list[str]:
  names = [s.strip() for s in stages.split(',') if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown or not names:
    bad = unknown[0] if unknown else '(none)'
    raise UsageError(f'config.stages={stages!r}: unknown stage {bad!r}; choose a comma-separated '
                     f'list from {",".join(STAGES)}.')
  return names


def validate(config, stages: list[str], workdir: str | None = None) -> None:
  """Checks everything that can be checked before anything is written, from cheap facts only
  (the teacher's config.json and safetensors headers or llama2.c header, the first document of a
  text file, JSONL rows, the work directory's config.json and checkpoint metadata): one clear error
  per problem. With `workdir`, also that resuming it is consistent with this config."""
  wd.model_kwargs(config, train=True)
  wd.frozen_dtype(config)
  for name in ('steps', 'batch_size', 'seq_len', 'accum', 'log_every', 'ckpt_every', 'keep',
               'max_nonfinite'):
    if config.train[name] < 1:
      raise UsageError(f'train.{name}={config.train[name]} must be at least 1: raise it.')
  if config.eval.max_len < 1:
    raise UsageError(f'eval.max_len={config.eval.max_len} must be at least 1 (tokens predicted per '
                     'document): raise it, e.g. to 2048.')
  if config.train.lr <= 0:
    raise UsageError(f'train.lr={config.train.lr} must be positive: raise it.')
  if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f'--workdir {workdir} is a file: give a directory.')
  teacher = wd.check_teacher(config.teacher.path, config.teacher.tokenizer, workdir)
  checked = set(stages) | {'init'}  # the mla settings and the resume check always apply
  for stage in STAGES:
    if stage in checked:
      module = importlib.import_module(f'xecomla.stages.{MODULES[stage]}')
      module.validate(config, workdir, teacher, stages)


def run(config, workdir: str) -> dict[str, Any]:
  """Runs config.stages in order; returns what each stage returned."""
  stages = parse_stages(config.stages)
  validate(config, stages, workdir)
  os.makedirs(workdir, exist_ok=True)
  fileio.atomic_write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  out = {}
  for stage in stages:
    t0 = time.perf_counter()
    logging.info('stage %s', stage)
    module = importlib.import_module(f'xecomla.stages.{MODULES[stage]}')
    out[stage] = module.run(config, workdir)
    logging.info('stage %s done in %.1f s', stage, time.perf_counter() - t0)
    if isinstance(out[stage], dict) and out[stage].get('interrupted'):
      logging.info('stage %s stopped early (train.stop_after): later stages not run', stage)
      break
  return out
