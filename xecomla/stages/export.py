"""Stage `export`: the latest student as a Hugging Face directory (default W/export/hf); with
export.deepseek also a native deepseek_v3 directory (W/export/deepseek_v3) when compatible."""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from xecomla import export, workdir as wd
from xecomla.cli import UsageError


def export_latest(workdir: str, out: str, *, deepseek: bool = False,
                  tokenizer_dir: str | None = None) -> dict[str, Any]:
  found = wd.latest_student(workdir)
  if found is None:
    raise UsageError(f'no student checkpoint in {workdir}: run the init stage (and training) first.')
  stage, cfg, params, _ = found
  if tokenizer_dir is None:  # the teacher the student was made from carries the tokenizer
    tokenizer_dir = wd.checkpoints(workdir, 'init').read_meta().get('teacher')
  if not tokenizer_dir or not os.path.exists(os.path.join(tokenizer_dir, 'tokenizer.json')):
    raise UsageError(f'no tokenizer.json in {tokenizer_dir}: pass --tokenizer_dir.')
  export.export_hf(out, cfg, params, tokenizer_dir, deepseek=deepseek)
  logging.info('exported the %s student to %s', stage, out)
  return {'path': out, 'stage': stage, 'deepseek_v3': deepseek}


def run(config, workdir: str) -> dict[str, Any]:
  out = config.export.out or os.path.join(workdir, 'export', 'hf')
  if os.path.exists(out) and os.listdir(out):
    logging.info('export: %s already exists, kept as it is', out)
    result = {'path': out, 'existing': True}
  else:
    result = export_latest(workdir, out, tokenizer_dir=wd.teacher_dir(config, workdir))
  if config.export.deepseek:
    found = wd.latest_student(workdir)
    why = export.deepseek_incompatibility(found[1])
    if why:
      raise UsageError(f'export.deepseek: {why}.')
    ds = os.path.join(os.path.dirname(out), 'deepseek_v3')
    if not (os.path.exists(ds) and os.listdir(ds)):
      export_latest(workdir, ds, deepseek=True, tokenizer_dir=wd.teacher_dir(config, workdir))
    result['deepseek_v3_path'] = ds
  return result
