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


def _need_file(path: str, field: str) -> None:
  if not path:
    raise UsageError(f'{field} is empty: set --config.{field}=PATH.')
  if not os.path.exists(path):
    raise UsageError(f'{field}={path} does not exist: fix --config.{field} (is ../shared/data '
                     'beside the project, or XECOMLA_DATA set?).')


def validate(config, stages: list[str]) -> None:
  """Checks what can be checked before anything is written: one clear error per problem."""
  wd.compute_dtype(config)
  _need_file(config.teacher.path, 'teacher.path')
  if 'distill' in stages:
    _need_file(config.data.train_path, 'data.train_path')
    if config.distill.teacher_path:
      _need_file(config.distill.teacher_path, 'distill.teacher_path')
  if 'dpo' in stages:
    _need_file(config.dpo.path, 'dpo.path')
  if 'eval' in stages:
    for i, p in enumerate([config.eval.path] + [p for p in config.eval.extra_paths.split(',') if p]):
      if p:
        _need_file(p, 'eval.path' if i == 0 else 'eval.extra_paths')
  for name in ('steps', 'batch_size', 'seq_len', 'accum', 'log_every', 'ckpt_every', 'keep'):
    if config.train[name] < 1:
      raise UsageError(f'train.{name}={config.train[name]} must be at least 1.')
  if config.train.lr <= 0:
    raise UsageError(f'train.lr={config.train.lr} must be positive.')


def run(config, workdir: str) -> dict[str, Any]:
  """Runs config.stages in order; returns what each stage returned."""
  stages = parse_stages(config.stages)
  validate(config, stages)
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
