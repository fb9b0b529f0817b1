"""Time of the SVD initialisation (the init stage's `upcycle.upcycle`) of a Llama-3.2-1B-shaped
teacher: dim 2048, 32 query / 8 KV heads of 64, MLP 8192, random weights, with the options the
paper's configs give the init stage (configs/r_kv_64.py: fixed r_kv 64, r_q 1424, d_r 32;
configs/dynamic.py: the same with delta_kv = delta_q = 0.95, ranks rounded up to a multiple of 8,
first and last layer fixed).

  python -m benchmarks.svd_init [--layers=16] [--rank=fixed|dynamic|both] [--json=FILE]

The vocabulary is 512, not 128,256: the conversion never factorises the embeddings (it passes them
through), so only the attention shapes matter. The conversion is numpy/LAPACK float64 on the host
(convert/svd.py): nothing is jit-compiled, so there is no compile time to separate. Per layer: the
time of the layer's SVDs (`upcycle._svd_layer`) and of its factors at the chosen ranks
(`upcycle._factor_layer`), timed by wrapping those two functions; the total is upcycle's wall
time (the rest is rank selection and the report). `--lapack` times the reference path instead
(LAPACK's divide-and-conquer SVD of each matrix as given). `--check_layer` compares one layer's
rank-r products (what the student computes) with a plain float64 SVD of the repeated
[W^K, W^V] and of W^Q, outside the timing.
"""

from __future__ import annotations

import functools
import json
import os
import time

import numpy as np
from absl import app, flags

from benchmarks.common import print_machine
from configs import dynamic, r_kv_64
from xecomla.convert import upcycle as up
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig
from xecomla.stages.init import init_options

_LAYERS = flags.DEFINE_integer('layers', 16, 'Layers of the Llama-3.2-1B-shaped teacher.')
_RANK = flags.DEFINE_enum('rank', 'both', ['fixed', 'dynamic', 'both'], 'Which rank setting.')
_VOCAB = flags.DEFINE_integer('vocab', 512, 'Vocabulary (not factorised: any size, same time).')
_CHECK = flags.DEFINE_integer('check_layer', 0, 'Layer compared with a plain SVD (-1: none).')
_JSON = flags.DEFINE_string('json', '', 'Append the result as a JSON line to this file.')
_LAPACK = flags.DEFINE_bool('lapack', False, "Time LAPACK's SVD of each matrix as given (the "
                            'reference path, svd.spectrum_svd(lapack=True)) instead.')

CONFIGS = {'fixed': r_kv_64, 'dynamic': dynamic}


def teacher(layers: int, vocab: int) -> LlamaConfig:
  return LlamaConfig(vocab_size=vocab, dim=2048, n_layers=layers, n_heads=32, n_kv_heads=8,
                     head_dim=64, hidden_dim=8192, max_seq_len=2048, tie_embeddings=True,
                     rope_theta=500000.0)


def timed_upcycle(llama, params, opts, seed):
  """upcycle.upcycle with its per-layer functions timed: (its result, total s, per-layer rows)."""
  svd_s, factor_s = [], []
  svd_layer, factor_layer = up._svd_layer, up._factor_layer

  def timed(fn, into):
    def wrapper(*a, **k):
      t0 = time.perf_counter()
      out = fn(*a, **k)
      into.append(time.perf_counter() - t0)
      return out
    return wrapper

  up._svd_layer, up._factor_layer = timed(svd_layer, svd_s), timed(factor_layer, factor_s)
  spectrum_svd = up.svd.spectrum_svd
  if _LAPACK.value:
    up.svd.spectrum_svd = functools.partial(spectrum_svd, lapack=True)
  try:
    t0 = time.perf_counter()
    out = up.upcycle(llama, params, opts, seed=seed)
    total = time.perf_counter() - t0
  finally:
    up._svd_layer, up._factor_layer = svd_layer, factor_layer
    up.svd.spectrum_svd = spectrum_svd
  rows = [{'layer': l, 'svd_s': round(a, 3), 'factor_s': round(b, 3), 'r_kv': out[0].r_kv[l],
           'r_q': out[0].r_q[l]} for l, (a, b) in enumerate(zip(svd_s, factor_s))]
  return out, total, rows


def check_layer(llama, params, student, cfg, l: int) -> dict:
  """Largest relative difference, over the rank-r products W^DKV [W^UK, W^UV] and W^DQ W^UQ,
  between the conversion and a plain float64 LAPACK SVD of the matrices as upcycle defines them
  (paper RoPE dims, mean shared key: the key part of [W^K, W^V] keeps every dim)."""
  a, s = params['layers'][l]['attn'], student['layers'][l]['attn']
  g, d, d_r = llama.group_size, llama.dim, cfg.d_r
  rope = list(range(llama.head_dim - d_r, llama.head_dim))
  order = [i for i in range(llama.head_dim) if i not in rope] + rope
  wk = np.repeat(np.asarray(a['k'], np.float64), g, axis=1)[:, :, order]
  wv = np.repeat(np.asarray(a['v'], np.float64), g, axis=1)
  kv = np.concatenate([wk.reshape(d, -1), wv.reshape(d, -1)], axis=1)
  wq = np.asarray(a['q'], np.float64)
  wq = np.concatenate([wq[:, :, order[:-d_r]], wq[:, :, rope].copy()], -1).reshape(d, -1)
  n_h, d_h, d_qk = llama.n_heads, llama.head_dim, cfg.d_qk
  keep_k = np.zeros((n_h, d_h), bool)
  keep_k[:, :d_qk] = True                                  # W^UK keeps the no-RoPE key columns
  pairs = {'kv': (kv, s['dkv'], [s['uk'], s['uv']], cfg.r_kv[l],
                  np.concatenate([keep_k.ravel(), np.ones(n_h * d_h, bool)])),
           'q': (wq, s.get('dq'), [np.concatenate([s['uq'], s['qr']], -1)], cfg.r_q[l], None)}
  out = {}
  for name, (m, down, ups, r, keep) in pairs.items():
    if r is None:
      continue
    u = np.linalg.svd(m, full_matrices=False)[0][:, :r]
    ref = u @ (u.T @ m)                                    # the rank-r projection (sigma='up')
    ours = np.asarray(down, np.float64) @ np.concatenate(
        [np.asarray(x, np.float64).reshape(r, -1) for x in ups], 1)
    if keep is not None:
      ref = ref[:, keep]
    out[f'{name}_rel_diff'] = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
  return out


def main(argv):
  del argv
  info = print_machine()
  info['numpy'], info['blas_threads_env'] = np.__version__, os.environ.get('OPENBLAS_NUM_THREADS')
  llama = teacher(_LAYERS.value, _VOCAB.value)
  t0 = time.perf_counter()
  params = transformer.init_params(llama, 0)
  params = {k: v for k, v in params.items()}
  print(f'random teacher: {time.perf_counter() - t0:.1f} s (not timed below)')
  kinds = ['fixed', 'dynamic'] if _RANK.value == 'both' else [_RANK.value]
  for kind in kinds:
    config = CONFIGS[kind].get_config()
    opts = init_options(config, llama.head_dim)
    (cfg, student, _), total, rows = timed_upcycle(llama, params, opts, config.seed)
    for r in rows:
      print(f"{kind} layer {r['layer']:2d}: svd {r['svd_s']:.2f} s, factor {r['factor_s']:.2f} s, "
            f"r_kv {r['r_kv']}, r_q {r['r_q']}")
    result = {'bench': 'svd_init', 'rank': kind, 'svd': 'lapack' if _LAPACK.value else 'fast',
              'layers': llama.n_layers, 'vocab': llama.vocab_size,
              'options': {k: getattr(opts, k) for k in ('r_kv', 'r_q', 'd_r', 'rope_dims',
                                                         'rope_key', 'kv_energy', 'q_energy',
                                                         'round_to')},
              'total_s': round(total, 2), 'svd_s': round(sum(r['svd_s'] for r in rows), 2),
              'factor_s': round(sum(r['factor_s'] for r in rows), 2), 'per_layer': rows,
              'kv_fraction': cfg.kv_fraction(), 'loadavg': os.getloadavg(), 'machine': info}
    if 0 <= _CHECK.value < llama.n_layers:
      result['check'] = {'layer': _CHECK.value,
                         **check_layer(llama, params, student, cfg, _CHECK.value)}
    print(json.dumps({k: v for k, v in result.items() if k not in ('machine', 'per_layer')}))
    if _JSON.value:
      with open(_JSON.value, 'a') as f:
        f.write(json.dumps(result) + '\n')
    del student


if __name__ == '__main__':
  app.run(main)
