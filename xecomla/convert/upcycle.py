"""Llama parameters -> MLA student parameters (X-EcoMLA initialisation), layer by layer.

Per layer, with W^Q [D, n_h, d_h], and W^K, W^V repeated per query head for GQA ([D, n_h, d_h]):
  1. choose the RoPE dimensions (`rope_dims`) and reorder each head to [no-RoPE dims, RoPE dims];
  2. shared RoPE key W^KR from the heads' RoPE key columns (`rope_key`: mean, or fit with the
     query compensated);
  3. query: r_q None keeps W^Q (split into W^UQ and W^QR); otherwise W^Q = U S V^T,
     W^DQ = U_r, S_r V_r^T reshaped (r_q, n_h, d_h) and split into W^UQ (d_qk) and W^QR (d_r);
  4. key/value: one SVD of [W^K, W^V] (`kv_svd`='joint', the paper; 'nope' leaves out the RoPE
     key columns, which the latent never serves), W^DKV = U_r, S_r V_r^T gives W^UK (each head's
     no-RoPE key columns) and W^UV;
  5. ranks: fixed, per-layer by retained energy (delta), or allocated under a KV budget.
Everything else (embeddings, norms, MLP, W^O) is the teacher's. The arithmetic is numpy float64
(see svd.py), cast to float32 once per parameter at the end. With `method='activation'` every
factorisation minimises the error on calibration activations instead (see svd.py); with
'random' the attention weights are freshly initialised at the same ranks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from xecomla.convert import rope_dims, svd
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig, MLAConfig

METHODS = ('svd', 'activation', 'random')
KV_SVD = ('joint', 'nope')


@dataclasses.dataclass(frozen=True)
class InitOptions:
  method: str = 'svd'
  r_kv: int = 64
  r_q: int | None = None
  d_r: int = 32
  rope_dims: str = 'paper'
  rope_key: str = 'mean'
  sigma: str = 'up'
  kv_svd: str = 'joint'
  kv_energy: float | None = None
  q_energy: float | None = None
  kv_budget: float | None = None
  round_to: int = 8
  keep_ends_fixed: bool = True
  latent_norm: bool = False

  def __post_init__(self):
    for name, value, allowed in (('method', self.method, METHODS), ('kv_svd', self.kv_svd, KV_SVD),
                                 ('rope_dims', self.rope_dims, rope_dims.CHOICES),
                                 ('rope_key', self.rope_key, rope_dims.KEYS),
                                 ('sigma', self.sigma, tuple(svd.SIGMA))):
      if value not in allowed:
        raise ValueError(f'mla.{name}={value!r}: choose one of {", ".join(allowed)}.')
    if self.kv_energy is not None and self.kv_budget is not None:
      raise ValueError('set either mla.kv_energy or mla.kv_budget, not both.')
    if self.round_to < 1:
      raise ValueError(f'mla.round_to={self.round_to} must be >= 1.')


def _ranks(spectra, fixed, energy, budget_values, opts) -> list[int]:
  n = len(spectra)
  caps = [len(s) for s in spectra]
  if budget_values is not None:
    return svd.allocate_budget(spectra, budget_values, opts.round_to)
  if energy is not None:
    ranks = [svd.rank_for_energy(s, energy, opts.round_to) for s in spectra]
    if opts.keep_ends_fixed and n > 1:
      ranks[0], ranks[-1] = min(fixed, caps[0]), min(fixed, caps[-1])
    return ranks
  for l, cap in enumerate(caps):
    if fixed > cap:
      raise ValueError(f'layer {l}: rank {fixed} exceeds the full rank {cap} of the matrix it '
                       'factorises: lower it.')
  return [fixed] * n


def upcycle(llama: LlamaConfig, params: dict, opts: InitOptions, *, whiteners: list | None = None,
            seed: int = 0) -> tuple[MLAConfig, dict, dict[str, Any]]:
  """Returns the student's config, its float32 parameters and a conversion report."""
  if opts.method == 'activation' and whiteners is None:
    raise ValueError("method='activation' needs calibration whiteners (see convert/calib.py)")
  n_h, d_h = llama.n_heads, llama.head_dim
  d_r, d_qk = opts.d_r, d_h - opts.d_r
  if d_qk < 0:
    raise ValueError(f'd_r={d_r} exceeds the teacher head_dim {d_h}.')
  layers = [_svd_layer(llama, params['layers'][l]['attn'], opts,
                       whiteners[l] if opts.method == 'activation' else None)
            for l in range(llama.n_layers)]

  n = llama.n_layers
  budget = None
  if opts.kv_budget is not None:
    budget = int(math.floor(opts.kv_budget * llama.kv_values_per_token() + 1e-9)) - n * d_r
  r_kv = _ranks([x['kv_svd'][1] for x in layers], opts.r_kv, opts.kv_energy, budget, opts)
  r_q: list[int | None] = [None] * n
  if opts.r_q is not None:
    r_q = _ranks([x['q_svd'][1] for x in layers], opts.r_q, opts.q_energy, None, opts)

  config = MLAConfig(llama=llama, r_kv=tuple(r_kv), r_q=tuple(r_q), d_r=d_r, d_qk=d_qk, d_v=d_h,
                     rope_pairs=tuple(x['pairs'] for x in layers), latent_norm=opts.latent_norm)
  if opts.method == 'random':
    fresh = transformer.init_params(config, seed)
    attn = [fresh['layers'][l]['attn'] for l in range(n)]
  else:
    attn = [_factor_layer(x, r_kv[l], r_q[l], d_qk, n_h, d_h, opts.sigma) for l, x in enumerate(layers)]
    for l in range(n):
      if opts.latent_norm:
        attn[l]['kv_norm'] = {'scale': np.ones((r_kv[l],), np.float32)}
        if r_q[l] is not None:
          attn[l]['q_norm'] = {'scale': np.ones((r_q[l],), np.float32)}
  student = {k: v for k, v in params.items() if k != 'layers'}
  student['layers'] = {}
  for l in range(n):
    layer = {k: v for k, v in params['layers'][l].items() if k != 'attn'}
    layer['attn'] = {**attn[l], 'o': np.asarray(params['layers'][l]['attn']['o'], np.float32)}
    student['layers'][l] = layer
  return config, student, _report(config, layers, opts)


def _svd_layer(llama: LlamaConfig, a: dict, opts: InitOptions, whiten) -> dict[str, Any]:
  """One layer's RoPE split, shared key and SVDs (steps 1-4 before the ranks are known)."""
  d_model, d_h, d_r = llama.dim, llama.head_dim, opts.d_r
  wq = np.asarray(a['q'], np.float64)
  wk = np.repeat(np.asarray(a['k'], np.float64), llama.group_size, axis=1)
  wv = np.repeat(np.asarray(a['v'], np.float64), llama.group_size, axis=1)
  pairs, rope, nope = rope_dims.choose(opts.rope_dims, d_h, d_r, wq, wk)
  wkr, wq_rope = rope_dims.shared_key(opts.rope_key, wk[:, :, rope], wq[:, :, rope])
  wq_blocks = np.concatenate([wq[:, :, nope], wq_rope], axis=-1)          # [D, n_h, d_qk + d_r]
  k_cols = wk[:, :, nope + rope] if opts.kv_svd == 'joint' else wk[:, :, nope]
  kv = np.concatenate([k_cols.reshape(d_model, -1), wv.reshape(d_model, -1)], axis=1)
  return dict(pairs=pairs, wkr=wkr, wq=wq_blocks, k_width=k_cols.shape[-1], kv=kv,
              kv_svd=svd.spectrum_svd(kv, whiten), whiten=whiten,
              q_svd=None if opts.r_q is None else svd.spectrum_svd(
                  wq_blocks.reshape(d_model, -1), whiten))


def _factor_layer(x, r_kv, r_q, d_qk, n_h, d_h, sigma) -> dict[str, np.ndarray]:
  u, s, vt = x['kv_svd']
  if r_kv > u.shape[1]:  # past what the fast SVD resolves (see svd.spectrum_svd)
    u, s, vt = svd.spectrum_svd(x['kv'], x['whiten'], lapack=True)
  dkv, up = svd.factor(u, s, vt, r_kv, sigma, x['whiten'])
  kw = x['k_width']
  uk = up[:, :n_h * kw].reshape(r_kv, n_h, kw)[:, :, :d_qk]
  uv = up[:, n_h * kw:].reshape(r_kv, n_h, d_h)
  out = {'dkv': dkv, 'uk': np.ascontiguousarray(uk), 'uv': uv, 'kr': x['wkr']}
  if r_q is None:
    out['uq'], out['qr'] = x['wq'][:, :, :d_qk], x['wq'][:, :, d_qk:]
  else:
    u, s, vt = x['q_svd']
    if r_q > u.shape[1]:
      u, s, vt = svd.spectrum_svd(x['wq'].reshape(len(u), -1), x['whiten'], lapack=True)
    dq, upq = svd.factor(u, s, vt, r_q, sigma, x['whiten'])
    upq = upq.reshape(r_q, n_h, d_h)
    out.update(dq=dq, uq=upq[:, :, :d_qk], qr=upq[:, :, d_qk:])
  if not d_qk:  # every head dim is RoPE: the model has no W^UQ / W^UK
    del out['uq'], out['uk']
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _report(config: MLAConfig, layers, opts: InitOptions) -> dict[str, Any]:
  rows = []
  for l, x in enumerate(layers):
    kv_e = svd.retained_energy(x['kv_svd'][1])[config.r_kv[l] - 1]
    q_e = 1.0 if config.r_q[l] is None else svd.retained_energy(x['q_svd'][1])[config.r_q[l] - 1]
    rows.append({'layer': l, 'r_kv': config.r_kv[l], 'r_q': config.r_q[l],
                 'kv_energy': float(kv_e), 'q_energy': float(q_e),
                 'rope_pairs': None if x['pairs'] is None else list(x['pairs']),
                 'kv_values': config.layer_kv_values(l)})
  return {
      'options': dataclasses.asdict(opts),
      'layers': rows,
      'kv_values_per_token': config.kv_values_per_token(),
      'teacher_kv_values_per_token': config.llama.kv_values_per_token(),
      'kv_fraction': config.kv_fraction(),
      'ranks': {'r_kv': list(config.r_kv), 'r_q': list(config.r_q)},
  }


def report_markdown(report: dict[str, Any]) -> str:
  """The conversion report as a Markdown table."""
  lines = [f"KV cache: {report['kv_values_per_token']} of {report['teacher_kv_values_per_token']} "
           f"values per token ({report['kv_fraction']:.1%}); init {report['options']['method']}, "
           f"RoPE dims {report['options']['rope_dims']}, key {report['options']['rope_key']}",
           '', '| layer | r_kv | kv energy | r_q | q energy | RoPE pairs | KV values |',
           '|---|---|---|---|---|---|---|']
  for r in report['layers']:
    lines.append(f"| {r['layer']} | {r['r_kv']} | {r['kv_energy']:.4f} | {r['r_q']} | "
                 f"{r['q_energy']:.4f} | {r['rope_pairs'] if r['rope_pairs'] is not None else 'fresh'} "
                 f"| {r['kv_values']} |")
  return '\n'.join(lines) + '\n'
