"""Stage `init`: the X-EcoMLA conversion of the teacher into an MLA student (W/init)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging

from xecomla import fileio, workdir as wd
from xecomla.cli import UsageError
from xecomla.convert import calib, upcycle
from xecomla.tokenizer import Tokenizer


def init_options(config, head_dim: int) -> upcycle.InitOptions:
  m = config.mla
  if m.d_qk + m.d_r != head_dim:
    raise UsageError(f'mla.d_qk + mla.d_r = {m.d_qk} + {m.d_r} must equal the teacher head_dim '
                     f'{head_dim}: set mla.d_qk={head_dim - m.d_r}.')
  try:
    return upcycle.InitOptions(
        method=m.init, r_kv=m.r_kv, r_q=m.r_q or None, d_r=m.d_r, rope_dims=m.rope_dims,
        rope_key=m.rope_key, sigma=m.sigma, kv_svd=m.kv_svd, kv_energy=m.kv_energy,
        q_energy=m.q_energy, kv_budget=m.kv_budget, round_to=m.round_to,
        keep_ends_fixed=m.keep_ends_fixed, latent_norm=m.latent_norm)
  except ValueError as e:
    raise UsageError(str(e)) from e


def run(config, workdir: str) -> dict[str, Any]:
  directory, llama, params = wd.load_teacher(config, workdir)
  opts = init_options(config, llama.head_dim)
  wanted = dataclasses.asdict(opts)
  if wd.has_checkpoint(workdir, 'init'):
    cks = wd.checkpoints(workdir, 'init')
    meta = cks.read_meta()
    cks.close()
    if meta['report']['options'] != wanted:
      raise UsageError(f'{wd.stage_dir(workdir, "init")} holds a student made with other mla '
                       'settings: use a new --workdir, or delete that directory to redo init.')
    logging.info('init: already done')
    return meta['report']
  whiteners = None
  if opts.method == 'activation':
    path = config.mla.calib_path or config.data.train_path
    if not path or not os.path.exists(path):
      raise UsageError(f'mla.init=activation needs calibration text: {path!r} does not exist '
                       '(set mla.calib_path or data.train_path).')
    seqs = calib.calibration_seqs(Tokenizer(directory), path, llama.bos_id, llama.max_seq_len,
                                  config.mla.calib_docs, config.mla.calib_tokens)
    whiteners = calib.whiteners(calib.attention_input_grams(llama, params, seqs, llama.max_seq_len))
  try:
    student, student_params, report = upcycle.upcycle(llama, params, opts, whiteners=whiteners,
                                                      seed=config.seed)
  except ValueError as e:
    raise UsageError(str(e)) from e
  cks = wd.checkpoints(workdir, 'init', keep=1)
  cks.save(0, params=student_params, meta={'stage': 'init', 'model': student.to_dict(),
                                           'report': report, 'teacher': directory})
  cks.close()
  out = wd.stage_dir(workdir, 'init')
  fileio.atomic_write_json(os.path.join(out, 'report.json'), report)
  fileio.atomic_write_text(os.path.join(out, 'report.md'), upcycle.report_markdown(report))
  logging.info('init: KV %d of %d values per token (%.1f%%), ranks r_kv=%s',
               report['kv_values_per_token'], report['teacher_kv_values_per_token'],
               100 * report['kv_fraction'], report['ranks']['r_kv'])
  return report
