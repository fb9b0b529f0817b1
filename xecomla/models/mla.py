"""Multi-head Latent Attention, with an explicit path (training, prefill) and an absorbed path over
a compressed cache (decode).

Row-vector notation, H the normed input [T, D], per layer:
  C^Q = H W^DQ (r_q)                     [W^DQ absent when r_q is None: C^Q = H]
  Q^C = C^Q W^UQ (n_h x d_qk)            Q^R = RoPE(C^Q W^QR) (n_h x d_r)
  C^KV = H W^DKV (r_kv)                  K^R = RoPE(H W^KR) (d_r, shared by all heads)
  K^C = C^KV W^UK (n_h x d_qk)           V = C^KV W^UV (n_h x d_v)
  head i: softmax([Q^C_i, Q^R_i] . [K^C_i, K^R] / sqrt(d_qk + d_r)) V_i, then W^O.
Optional RMSNorm on C^Q and C^KV (`latent_norm`). The cache holds C^KV and the rotated K^R only,
fused per token as one row [C^KV | K^R] (kvcache: FlashMLA's layout).

Two ways to attend (`MODES`), named for what they do:
  'expand': up-project K^C and V from C^KV and attend per head (training and prefill; with a cache
            this re-expands every cached token at every step: the naive decode, as MaxText and
            transformers' DeepSeek code decode);
  'absorb': never form K^C or V. The no-RoPE query is mapped into latent space,
            q_lat_i = Q^C_i W^UK_i^T, and [q_lat_i | Q^R_i] is scored against the fused cached rows
            in one contraction; the attention-weighted rows are up-projected once by W^UV_i.
            Per head this reads r_kv + d_r values per cached token instead of 2 d_h per KV head,
            for (r_kv + d_r) / (d_qk + d_r) more score FLOPs: decode trades cache bytes for FLOPs.
'auto' absorbs when decoding (a cache and one new token) and expands otherwise.
"""

from __future__ import annotations

import math

import chex
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xecomla.models import kernels, kvcache
from xecomla.models.attention import (attend_shared_rope, causal_blocks, dot_product,
                                      masked_softmax)
from xecomla.models.config import MLAConfig
from xecomla.models.layers import RMSNorm, apply_rope, einsum, param
from xecomla.models.llama import teacher_inv_freq

MODES = ('auto', 'expand', 'absorb')


def mla_inv_freq(config: MLAConfig, layer: int) -> np.ndarray:
  """RoPE inverse frequencies of one layer's d_r RoPE dimensions (rotate-half layout).

  Kept teacher pairs use their original frequencies; `None` (the paper's choice) is a fresh RoPE
  over d_r dimensions, theta^(-2i/d_r), with the teacher's scaling rule.
  """
  pairs = config.rope_pairs[layer]
  if pairs is None:
    return teacher_inv_freq(config.llama, config.d_r)
  return teacher_inv_freq(config.llama)[np.asarray(pairs, dtype=np.int64)]


class MLAAttention(nnx.Module):
  """One layer's MLA; `mode` one of MODES (module docstring)."""

  def __init__(self, config: MLAConfig, layer: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None,
               mode: str = 'auto', attention: str = 'reference'):
    if mode not in MODES:
      raise ValueError(f'MLA mode {mode!r} is not one of {MODES}')
    c, llama = config, config.llama
    self.config, self.layer, self.dtype, self.mode = config, layer, dtype, mode
    self.attention = attention  # the kernel of the explicit path (models.attention.IMPLEMENTATIONS)
    n, d = llama.n_heads, llama.dim
    r_q, r_kv = c.r_q[layer], c.r_kv[layer]
    if r_q is None:
      q_in, q_axis = d, 'embed'
    else:
      q_in, q_axis = r_q, 'q_lora'
      self.dq = param(rngs, (d, r_q), ('embed', 'q_lora'))
      if c.latent_norm:
        self.q_norm = RMSNorm(r_q, c.latent_norm_eps, axis_name='q_lora', rngs=rngs)
    if c.d_qk:  # d_qk = 0 (every head dim is RoPE): no no-RoPE query or key at all
      self.uq = param(rngs, (q_in, n, c.d_qk), (q_axis, 'heads', 'qk_nope'))
    self.qr = param(rngs, (q_in, n, c.d_r), (q_axis, 'heads', 'qk_rope'))
    self.dkv = param(rngs, (d, r_kv), ('embed', 'kv_lora'))
    if c.latent_norm:
      self.kv_norm = RMSNorm(r_kv, c.latent_norm_eps, axis_name='kv_lora', rngs=rngs)
    if c.d_qk:
      self.uk = param(rngs, (r_kv, n, c.d_qk), ('kv_lora', 'heads', 'qk_nope'))
    self.uv = param(rngs, (r_kv, n, c.d_v), ('kv_lora', 'heads', 'head_dim'))
    self.kr = param(rngs, (d, c.d_r), ('embed', 'qk_rope'))
    self.o = param(rngs, (n, c.d_v, d), ('heads', 'head_dim', 'embed'), fan_in=n * c.d_v)

  def _w(self, p):
    return p[...].astype(self.dtype)

  def __call__(self, x, positions, mask, cache=None, index=None):
    """x [B, T, D]; mask [B, T, S] over the T new tokens (no cache) or the cache's S slots."""
    c, dt = self.config, self.dtype
    inv_freq = mla_inv_freq(c, self.layer)
    b, t, _ = x.shape
    n = c.llama.n_heads
    # Queries.
    cq = x
    if c.r_q[self.layer] is not None:
      cq = einsum('BTD,DR->BTR', x, self._w(self.dq))
      if c.latent_norm:
        cq = self.q_norm(cq)
    q_c = einsum('BTR,RNH->BTNH', cq, self._w(self.uq)) if c.d_qk else None
    q_r = apply_rope(einsum('BTR,RNH->BTNH', cq, self._w(self.qr)), positions, inv_freq)
    # What gets cached: the latent and the shared rotated RoPE key.
    c_kv = einsum('BTD,DR->BTR', x, self._w(self.dkv))
    if c.latent_norm:
      c_kv = self.kv_norm(c_kv)
    k_r = apply_rope(einsum('BTD,DH->BTH', x, self._w(self.kr)), positions, inv_freq)
    chex.assert_shape(c_kv, (b, t, c.r_kv[self.layer]))
    chex.assert_shape(k_r, (b, t, c.d_r))
    scale = 1.0 / math.sqrt(c.d_qk + c.d_r)
    absorb = self.mode == 'absorb' or (self.mode == 'auto' and cache is not None and t == 1)
    if cache is not None:
      cache = kvcache.write_latent(cache, c_kv, k_r, index)
      if not absorb:  # the naive decode (or a prefill): the whole cache, dequantised
        c_kv, k_r = kvcache.read_latent(cache, c.r_kv[self.layer], dt)
    if absorb:
      out = self._absorbed(q_c, q_r, c_kv, k_r, cache, mask, scale)
    else:
      s = c_kv.shape[1]
      v = einsum('BSR,RNH->BSNH', c_kv, self._w(self.uv))
      k_c = einsum('BSR,RNH->BSNH', c_kv, self._w(self.uk)) if c.d_qk else None
      # With a cache (the naive decode) the reference path, as in llama.Attention.
      name = 'reference' if cache is not None else kernels.resolve(
          self.attention, dt, max(c.d_qk + c.d_r, c.d_v), t, s)
      # Scored apart (one einsum against [B, S, d_r]) the shared key is never copied per head:
      # XLA:CPU's temporaries -25% at decode shapes, -10% at T 2048. XLA:TPU fuses the copy into
      # the dot (no temporaries) and keeps two float32 score buffers instead of one (1.55 -> 3.59
      # GiB/device for a 1B student's layer at T 2048), so there the key is concatenated.
      if name == 'blocked':  # the shared key scored apart, in causal blocks
        shared = lambda qs, ks, m: attend_shared_rope(qs[0], ks[0], qs[1], ks[1], ks[2], m, scale)
        out = causal_blocks(shared, (q_c, q_r), (k_c, k_r, v), mask)
      elif name == 'reference' and kernels.target_platform() != 'tpu':
        out = attend_shared_rope(q_c, k_c, q_r, k_r, v, mask, scale)
      else:  # one key per head (as fused kernels need it): the shared RoPE key repeated
        k = jnp.broadcast_to(k_r[:, :, None, :], (b, s, n, c.d_r))
        q = q_r
        if c.d_qk:
          k, q = jnp.concatenate([k_c, k], axis=-1), jnp.concatenate([q_c, q_r], axis=-1)
        out = dot_product(q, k, v, mask, scale, name)
    chex.assert_shape(out, (b, t, n, c.d_v))
    return einsum('BTNH,NHD->BTD', out, self._w(self.o)), cache

  def _absorbed(self, q_c, q_r, c_kv, k_r, cache, mask, scale):
    """Absorbed attention over the fused rows [c_kv | k_r]: the cache's (possibly quantised) rows
    when there is a cache, else this call's own. Returns [B, T, N, d_v]."""
    c, dt, r_kv = self.config, self.dtype, self.config.r_kv[self.layer]
    if cache is None:
      rows, row_scale = jnp.concatenate([c_kv, k_r], axis=-1), None
    else:
      rows, row_scale = kvcache.latent_values(cache).astype(dt), cache.get('scale')
    q_lat = einsum('BTNH,RNH->BTNR', q_c, self._w(self.uk)) if c.d_qk else None
    f32 = jnp.float32
    if row_scale is None:  # one contraction of [q_lat | q_r] against the fused rows
      query, score_rows = (q_r, rows[..., r_kv:]) if q_lat is None else (
          jnp.concatenate([q_lat, q_r], axis=-1), rows)
      scores = jnp.einsum('BTNC,BSC->BNTS', query, score_rows, preferred_element_type=f32)
    else:  # each part's stored values against its query, times the part's per-token scale
      s_c, s_r = (row_scale[..., i].astype(f32)[:, None, None, :] for i in (0, 1))
      scores = s_r * jnp.einsum('BTNH,BSH->BNTS', q_r, rows[..., r_kv:], preferred_element_type=f32)
      if q_lat is not None:
        scores += s_c * jnp.einsum('BTNR,BSR->BNTS', q_lat, rows[..., :r_kv],
                                   preferred_element_type=f32)
    probs = masked_softmax(scores * scale, mask[:, None])
    if row_scale is None:
      # Weighted sum over the whole fused rows, then the latent part ([B, T, N, r_kv + d_r]):
      # a slice of the cache as the operand would be a copy of it every step.
      o_lat = jnp.einsum('BNTS,BSC->BTNC', probs.astype(dt), rows)[..., :r_kv]
    else:
      o_lat = jnp.einsum('BNTS,BSR->BTNR', (probs * s_c).astype(dt), rows[..., :r_kv])
    return einsum('BTNR,RNH->BTNH', o_lat, self._w(self.uv))
