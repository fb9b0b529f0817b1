"""Runs the stages of config.stages in order; each resumes from its own checkpoints. The work
directory may be a gs:// URI (etils.epath; see xecomla/workdir.py)."""

from __future__ import annotations

import importlib
import json
import os
import time
from typing import Any

from etils import epath

from xecomla import console, distributed, fileio, hub, workdir as wd
from xecomla.cli import UsageError

STAGES = ('init', 'align', 'distill', 'dpo', 'eval', 'export')
MODULES = {'init': 'init', 'align': 'align', 'distill': 'distill', 'dpo': 'dpo', 'eval': 'evaluate',
           'export': 'export'}


def parse_stages(stages: str) -> list[str]:
  names = [s.strip() for s in stages.split(',') if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown or not names:
    bad = unknown[0] if unknown else '(none)'
    raise UsageError(f'config.stages={stages!r}: unknown stage {bad!r}; choose a comma-separated '
                     f'list from {",".join(STAGES)}.')
  return names


def validate(config, stages: list[str], workdir: str | None = None) -> dict:
  """Checks everything that can be checked before anything is written, from cheap facts only
  (the teacher's config.json and safetensors headers or llama2.c header, the first document of a
  text file, JSONL rows, the work directory's config.json and checkpoint metadata): one clear error
  per problem. With `workdir`, also that resuming it is consistent with this config. Hub ids are
  resolved first (a model not cached is downloaded into the Hugging Face cache, not the work
  directory); returns what they resolved to (hub.resolve_config)."""
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
  if workdir and epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
    raise UsageError(f'--workdir {workdir} is a file: give a directory.')
  resolved = hub.resolve_config(config, workdir)  # Hub ids -> cached (or downloaded) snapshots
  teacher = wd.check_teacher(config.teacher.path, config.teacher.tokenizer, workdir)
  checked = set(stages) | {'init'}  # the mla settings and the resume check always apply
  for stage in STAGES:
    if stage in checked:
      module = importlib.import_module(f'xecomla.stages.{MODULES[stage]}')
      module.validate(config, workdir, teacher, stages)
  return resolved


def run(config, workdir: str) -> dict[str, Any]:
  """Runs config.stages in order; returns what each stage returned."""
  stages = parse_stages(config.stages)
  resolved = validate(config, stages, workdir)
  if distributed.is_writer():
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    record = json.loads(config.to_json_best_effort())
    if resolved:  # which snapshot (commit) each Hub id named in this run
      record['resolved'] = resolved
    fileio.atomic_write_json(os.path.join(workdir, 'config.json'), record)
  distributed.barrier('xecomla_validated')  # every process checked the work directory as it was
  console.log_to(workdir)  # the log file (with xecomla.main): W/logs/
  out = {}
  for stage in stages:
    t0 = time.perf_counter()
    console.say('stage %s', stage)
    module = importlib.import_module(f'xecomla.stages.{MODULES[stage]}')
    out[stage] = module.run(config, workdir)
    console.say(console.stage_summary(stage, time.perf_counter() - t0, out[stage]))
    if isinstance(out[stage], dict) and out[stage].get('interrupted'):
      console.say('stage %s stopped early (train.stop_after): later stages not run', stage)
      break
  return out
