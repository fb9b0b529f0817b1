"""Stage `init`: the X-EcoMLA conversion of the teacher into an MLA student (W/init)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from etils import epath

from xecomla import console, data_checks, distributed, fileio, workdir as wd
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


def check_mla(config, llama) -> upcycle.InitOptions:
  """The mla settings against the teacher's shapes: what upcycle would refuse half-way, refused
  before anything is written."""
  m, d_h, n_h, dim, n = config.mla, llama.head_dim, llama.n_heads, llama.dim, llama.n_layers
  evens = ', '.join(str(r) for r in range(2, d_h + 1, 2))
  if not isinstance(m.d_r, int) or m.d_r < 2 or m.d_r % 2 or m.d_r > d_h:
    raise UsageError(f'mla.d_r={m.d_r} must be even (RoPE rotates pairs of dims), positive and at '
                     f'most the teacher head_dim {d_h}: set mla.d_r to one of {evens} and '
                     f'mla.d_qk to {d_h} minus it.')
  opts = init_options(config, d_h)
  for name in ('kv_energy', 'q_energy'):
    if m[name] is not None and not 0 < m[name] <= 1:
      raise UsageError(f'mla.{name}={m[name]} is outside (0, 1]: give the fraction of energy to '
                       'retain, e.g. 0.95, or leave it unset for a fixed rank.')
  kv_cols = n_h * d_h + n_h * (d_h if m.kv_svd == 'joint' else m.d_qk)
  kv_cap, q_cap = min(dim, kv_cols), min(dim, n_h * d_h)
  if m.r_kv < 1 or (m.kv_energy is None and m.kv_budget is None and m.r_kv > kv_cap):
    raise UsageError(f'mla.r_kv={m.r_kv} is outside 1..{kv_cap}, the full rank of the {dim} x '
                     f'{kv_cols} matrix [W^K, W^V] it factorises (min(D, 2*n_h*d_h) for the '
                     f'joint SVD): set mla.r_kv between 1 and {kv_cap}.')
  if m.r_q is not None and (m.r_q < 0 or (m.r_q and m.q_energy is None and m.r_q > q_cap)):
    raise UsageError(f'mla.r_q={m.r_q} is outside 1..{q_cap}, the full rank of the {dim} x '
                     f'{n_h * d_h} query matrix it factorises: set mla.r_q between 1 and {q_cap}, '
                     'or 0 for an uncompressed query.')
  if m.kv_budget is not None:
    teacher = llama.kv_values_per_token()
    need = n * (m.round_to + m.d_r)
    if not 0 < m.kv_budget <= 1 or int(math.floor(m.kv_budget * teacher + 1e-9)) < need:
      raise UsageError(f'mla.kv_budget={m.kv_budget} keeps {int(m.kv_budget * teacher)} of '
                       f'{teacher} KV values per token, below one chunk (mla.round_to='
                       f'{m.round_to}) per layer plus the RoPE key ({n} x ({m.round_to} + '
                       f'{m.d_r}) = {need}): raise mla.kv_budget to at least '
                       f'{math.ceil(need / teacher * 1000) / 1000} (at most 1) or lower '
                       'mla.round_to.')
  if m.init == 'activation':
    if m.calib_len < 2:
      raise UsageError(f'mla.calib_len={m.calib_len} must be at least 2 (BOS and one token per '
                       'calibration row): raise it, e.g. to 2048.')
    path = m.calib_path or config.data.train_path
    if not path or not epath.Path(path).exists():
      raise UsageError(f'mla.init=activation needs calibration text: {path!r} does not exist: set '
                       'mla.calib_path or data.train_path.')
  return opts


def validate(config, workdir: str | None, llama, stages: list[str]) -> None:
  opts = check_mla(config, llama)
  if workdir:
    wd.check_resume(config, workdir, dataclasses.asdict(opts))
  if config.mla.init == 'activation' and 'init' in stages:
    data_checks.check_text(config.mla.calib_path or config.data.train_path,
                           'mla.calib_path' if config.mla.calib_path else 'data.train_path')


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
    console.say('init: already done')
    return meta['report']
  whiteners = None
  if opts.method == 'activation':
    path = config.mla.calib_path or config.data.train_path
    if not path or not epath.Path(path).exists():
      raise UsageError(f'mla.init=activation needs calibration text: {path!r} does not exist '
                       '(set mla.calib_path or data.train_path).')
    row = calib.row_length(config.mla.calib_len, llama.max_seq_len)
    seqs = calib.calibration_seqs(Tokenizer(directory), path, llama.bos_id, row,
                                  config.mla.calib_docs, config.mla.calib_tokens)
    whiteners = calib.whiteners(calib.attention_input_grams(llama, params, seqs, row))
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
  if distributed.is_writer():
    fileio.atomic_write_json(os.path.join(out, 'report.json'), report)
    fileio.atomic_write_text(os.path.join(out, 'report.md'), upcycle.report_markdown(report))
  console.say('init: KV %d of %d values per token (%.1f%%), ranks r_kv=%s',
              report['kv_values_per_token'], report['teacher_kv_values_per_token'],
              100 * report['kv_fraction'], report['ranks']['r_kv'])
  return report
