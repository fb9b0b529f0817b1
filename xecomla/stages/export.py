"""Stage `export`: the latest student as a Hugging Face directory (default W/export/hf); with
export.deepseek also a native deepseek_v3 directory (W/export/deepseek_v3) when compatible."""

from __future__ import annotations

import os
from typing import Any

from etils import epath

from xecomla import console, distributed, export, fileio, workdir as wd
from xecomla.cli import UsageError


SOURCE = 'xecomla_source.json'  # which checkpoint an export was made from


def source_of(found) -> dict[str, Any]:
  stage, _, _, meta = found
  return {'stage': stage, 'step': meta.get('summary', {}).get('steps', 0)}


def export_latest(workdir: str, out: str, *, deepseek: bool = False,
                  tokenizer_dir: str | None = None) -> dict[str, Any]:
  found = wd.latest_student(workdir)
  if found is None:
    raise UsageError(f'no student checkpoint in {workdir}: run the init stage (and training) first.')
  stage, cfg, params, _ = found
  if tokenizer_dir is None:  # the teacher the student was made from carries the tokenizer
    tokenizer_dir = wd.checkpoints(workdir, 'init').read_meta().get('teacher')
  if not tokenizer_dir or not epath.Path(tokenizer_dir, 'tokenizer.json').exists():
    raise UsageError(f'no tokenizer.json in {tokenizer_dir}: pass --tokenizer_dir.')
  if distributed.is_writer():  # every process read the student (orbax reads collectively)
    export.export_hf(out, cfg, params, tokenizer_dir, deepseek=deepseek,
                     extra_json={SOURCE: source_of(found)})
    console.say('exported the %s student to %s', stage, out)
  distributed.barrier('xecomla_exported')
  return {'path': out, 'stage': stage, 'deepseek_v3': deepseek}


def up_to_date(workdir: str, out: str) -> bool:
  """True if `out` holds an export of the latest student; raises if it holds another one."""
  if not fileio.is_nonempty_dir(out):
    return False
  path = os.path.join(out, SOURCE)
  made_from = fileio.read_json(path) if epath.Path(path).exists() else None
  latest = source_of(wd.latest_student(workdir))
  if made_from != latest:
    raise UsageError(f'{out} holds an export of {made_from}, but the latest student is {latest}: '
                     'delete that directory or set export.out to a new one.')
  return True


def predicted_source(config, workdir: str, stages: list[str]) -> dict[str, Any] | None:
  """Which student the export stage will find after this run's earlier stages: the latest of dpo,
  distill, init that this run trains or that has a checkpoint (None if unknown)."""
  steps = {'dpo': config.dpo.steps, 'distill': config.train.steps, 'init': 0}
  for stage in wd.STUDENT_STAGES:
    if stage in stages:
      return {'stage': stage, 'step': steps[stage]}
    meta = wd.peek_meta(workdir, stage)
    if meta is not None:
      return {'stage': stage, 'step': meta.get('summary', {}).get('steps', 0)}
  return None


def validate(config, workdir: str | None, teacher, stages: list[str]) -> None:
  """The export target must be empty, or hold an export of the very student this run ends with."""
  if not workdir:
    return
  latest = predicted_source(config, workdir, stages)
  if latest is None:
    raise UsageError(f'no student checkpoint in {workdir}: run the init stage (and training) '
                     'first.')
  if config.export.deepseek:
    m = config.mla
    if not m.latent_norm or m.kv_energy is not None or m.q_energy is not None or (
        m.kv_budget is not None) or m.rope_dims != 'paper':
      raise UsageError('export.deepseek: DeepseekV3 needs mla.latent_norm=True, fixed ranks and '
                       'mla.rope_dims=paper: change those settings or set export.deepseek=False.')
  outs = [config.export.out or os.path.join(workdir, 'export', 'hf')]
  if config.export.deepseek:
    outs.append(os.path.join(os.path.dirname(outs[0]), 'deepseek_v3'))
  for out in outs:
    if epath.Path(out).is_file():
      raise UsageError(f'export.out={out} is a file: set export.out to a new directory.')
    if not (epath.Path(out).is_dir() and fileio.is_nonempty_dir(out)):
      continue
    path = os.path.join(out, SOURCE)
    made_from = fileio.read_json(path) if epath.Path(path).is_file() else None
    if made_from is None:
      raise UsageError(f'export directory {out} exists and is not empty: set export.out to a new '
                       'directory, or empty it.')
    if made_from != latest:
      raise UsageError(f'{out} holds an export of {made_from}, but the latest student is '
                       f'{latest} after this run: delete that directory or set export.out to a '
                       'new one.')


def run(config, workdir: str) -> dict[str, Any]:
  out = config.export.out or os.path.join(workdir, 'export', 'hf')
  tokenizer_dir = wd.teacher_dir(config, workdir)
  ds = os.path.join(os.path.dirname(out), 'deepseek_v3')
  existing = up_to_date(workdir, out), config.export.deepseek and up_to_date(workdir, ds)
  distributed.barrier('xecomla_export_checked')  # every process decided before process 0 writes
  if existing[0]:
    console.say('export: %s already holds the latest student', out)
    result = {'path': out, 'existing': True}
  else:
    result = export_latest(workdir, out, tokenizer_dir=tokenizer_dir)
  if config.export.deepseek:
    why = export.deepseek_incompatibility(wd.latest_student(workdir)[1])
    if why:
      raise UsageError(f'export.deepseek: {why}.')
    if not existing[1]:
      export_latest(workdir, ds, deepseek=True, tokenizer_dir=tokenizer_dir)
    result['deepseek_v3_path'] = ds
  return result
