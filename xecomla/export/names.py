"""The MLA student's Hugging Face tensor names (those of DeepSeek's MLA, so one weight file
serves the remote-code export and the native deepseek_v3 export):

  self_attn.q_proj            [n_h (d_qk + d_r), D]     <-> uq [D, n_h, d_qk], qr [D, n_h, d_r]
  self_attn.q_a_proj          [r_q, D]                  <-> dq [D, r_q]
  self_attn.q_a_layernorm     [r_q]                     <-> q_norm.scale
  self_attn.q_b_proj          [n_h (d_qk + d_r), r_q]   <-> uq [r_q, n_h, d_qk], qr [r_q, n_h, d_r]
  self_attn.kv_a_proj_with_mqa [r_kv + d_r, D]          <-> dkv [D, r_kv], kr [D, d_r]
  self_attn.kv_a_layernorm    [r_kv]                    <-> kv_norm.scale
  self_attn.kv_b_proj         [n_h (d_qk + d_v), r_kv]  <-> uk [r_kv, n_h, d_qk], uv [r_kv, n_h, d_v]
plus the Llama names for embeddings, norms, MLP and o_proj.
"""

from __future__ import annotations

import numpy as np

from xecomla.convert import hf
from xecomla.models.config import MLAConfig


def _heads_split(hf_name: str, first_path: tuple, second_path: tuple, rows_in: int, n: int,
                 first: int) -> hf.Row:
  """[n (first + second), rows_in]-shaped HF weight <-> ([rows_in, n, first], [rows_in, n, second]);
  with first == 0 (no no-RoPE dims) the first array does not exist."""
  paths = (first_path, second_path) if first else (second_path,)

  def to_ours(w):
    x = w.T.reshape(rows_in, n, -1)
    return (x[..., :first], x[..., first:]) if first else (x,)

  def to_hf(ps):
    return np.concatenate(ps, axis=-1).reshape(rows_in, -1).T

  return (hf_name, paths, to_ours, to_hf)


def _cols_split(first: int):
  """[first + second, D] <-> ([D, first], [D, second])."""
  return (lambda w: (w.T[:, :first], w.T[:, first:]),
          lambda ps: np.concatenate(ps, axis=1).T)


def mla_rows(c: MLAConfig) -> list[hf.Row]:
  llama = c.llama
  if c.d_v != llama.head_dim:
    raise ValueError('export needs d_v == head_dim (W^O is the teacher\'s)')
  rows = hf.shared_rows(llama)
  n, d = llama.n_heads, llama.dim
  transpose = (lambda w: w.T, lambda p: p.T)
  for l in range(c.n_layers):
    hf_p, ours = f'model.layers.{l}.self_attn.', ('layers', l, 'attn')
    r_q, r_kv = c.r_q[l], c.r_kv[l]
    if r_q is None:
      rows.append(_heads_split(hf_p + 'q_proj.weight', ours + ('uq',), ours + ('qr',), d, n, c.d_qk))
    else:
      rows.append(hf.one(hf_p + 'q_a_proj.weight', ours + ('dq',), *transpose))
      rows.append(_heads_split(hf_p + 'q_b_proj.weight', ours + ('uq',), ours + ('qr',), r_q, n,
                               c.d_qk))
      if c.latent_norm:
        rows.append(hf.one(hf_p + 'q_a_layernorm.weight', ours + ('q_norm', 'scale')))
    rows.append((hf_p + 'kv_a_proj_with_mqa.weight', (ours + ('dkv',), ours + ('kr',)),
                 *_cols_split(r_kv)))
    if c.latent_norm:
      rows.append(hf.one(hf_p + 'kv_a_layernorm.weight', ours + ('kv_norm', 'scale')))
    rows.append(_heads_split(hf_p + 'kv_b_proj.weight', ours + ('uk',), ours + ('uv',), r_kv, n,
                             c.d_qk))
  return rows


def interleaved_rope(params: dict, c: MLAConfig, inverse: bool = False) -> dict:
  """The RoPE columns of W^QR and W^KR from xecomla's rotate-half order (pair i = dims i and
  i + d_r/2) to the interleaved order of DeepSeek's own checkpoints (pair i = dims 2i, 2i + 1;
  `rope_interleave: true`, which transformers de-interleaves and GPT-J-style RoPE kernels such as
  vLLM's rotate in place), or back with `inverse`. Scores are unchanged: q and k move alike."""
  half = c.d_r // 2
  perm = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
  if inverse:
    perm = np.argsort(perm)
  layers = params['layers']  # a list, or a dict by layer index (both are param trees here)
  out = {}
  for l in range(c.n_layers):
    attn = dict(layers[l]['attn'])
    attn['qr'], attn['kr'] = (np.asarray(attn[k])[..., perm] for k in ('qr', 'kr'))
    out[l] = {**layers[l], 'attn': attn}
  return {**params, 'layers': [out[l] for l in range(c.n_layers)] if isinstance(layers, list)
          else {**layers, **out}}
