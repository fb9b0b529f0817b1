"""Multi-head Latent Attention, with an explicit path (training, prefill) and an absorbed path over
a compressed cache (decode).

Row-vector notation, H the normed input [T, D], per layer:
  C^Q = H W^DQ (r_q)                     [W^DQ absent when r_q is None: C^Q = H]
  Q^C = C^Q W^UQ (n_h x d_qk)            Q^R = RoPE(C^Q W^QR) (n_h x d_r)
  C^KV = H W^DKV (r_kv)                  K^R = RoPE(H W^KR) (d_r, shared by all heads)
  K^C = C^KV W^UK (n_h x d_qk)           V = C^KV W^UV (n_h x d_v)
  head i: softmax([Q^C_i, Q^R_i] . [K^C_i, K^R] / sqrt(d_qk + d_r)) V_i, then W^O.
Optional RMSNorm on C^Q and C^KV (`latent_norm`). The cache holds C^KV and the rotated K^R only.

Absorbed decode never forms K^C or V: the no-RoPE query is mapped into latent space,
q_lat_i = Q^C_i W^UK_i^T, scored against cached C^KV, and the attention-weighted latent is
up-projected once by W^UV_i.
"""

from __future__ import annotations

import math

import chex
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xecomla.models import kernels, kvcache
from xecomla.models.attention import attend_shared_rope, dot_product, masked_softmax
from xecomla.models.config import MLAConfig
from xecomla.models.layers import RMSNorm, apply_rope, param
from xecomla.models.llama import teacher_inv_freq

MODES = ('auto', 'explicit', 'absorbed')


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
  """One layer's MLA. `mode`: 'auto' (absorbed with a cache, explicit without), 'explicit' (always
  up-project K and V, also from the cache: the naive decode), or 'absorbed' (always absorb)."""

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
      cq = jnp.einsum('BTD,DR->BTR', x, self._w(self.dq))
      if c.latent_norm:
        cq = self.q_norm(cq)
    q_c = jnp.einsum('BTR,RNH->BTNH', cq, self._w(self.uq)) if c.d_qk else None
    q_r = apply_rope(jnp.einsum('BTR,RNH->BTNH', cq, self._w(self.qr)), positions, inv_freq)
    # What gets cached: the latent and the shared rotated RoPE key.
    c_kv = jnp.einsum('BTD,DR->BTR', x, self._w(self.dkv))
    if c.latent_norm:
      c_kv = self.kv_norm(c_kv)
    k_r = apply_rope(jnp.einsum('BTD,DH->BTH', x, self._w(self.kr)), positions, inv_freq)
    chex.assert_shape(c_kv, (b, t, c.r_kv[self.layer]))
    chex.assert_shape(k_r, (b, t, c.d_r))
    if cache is not None:
      cache = {'c_kv': kvcache.write(cache['c_kv'], c_kv, index),
               'k_r': kvcache.write(cache['k_r'], k_r, index)}
      c_kv, k_r = cache['c_kv'].astype(dt), cache['k_r'].astype(dt)
    scale = 1.0 / math.sqrt(c.d_qk + c.d_r)
    absorbed = self.mode == 'absorbed' or (self.mode == 'auto' and cache is not None)
    if absorbed:
      scores = jnp.einsum('BTNH,BSH->BNTS', q_r, k_r, preferred_element_type=jnp.float32)
      if c.d_qk:
        q_lat = jnp.einsum('BTNH,RNH->BTNR', q_c, self._w(self.uk))
        scores = scores + jnp.einsum('BTNR,BSR->BNTS', q_lat, c_kv,
                                     preferred_element_type=jnp.float32)
      probs = masked_softmax(scores * scale, mask[:, None])
      o_lat = jnp.einsum('BNTS,BSR->BTNR', probs.astype(dt), c_kv)
      out = jnp.einsum('BTNR,RNH->BTNH', o_lat, self._w(self.uv))
    else:
      s = c_kv.shape[1]
      v = jnp.einsum('BSR,RNH->BSNH', c_kv, self._w(self.uv))
      k_c = jnp.einsum('BSR,RNH->BSNH', c_kv, self._w(self.uk)) if c.d_qk else None
      # With a cache (the naive decode) the reference path, as in llama.Attention.
      name = 'reference' if cache is not None else kernels.resolve(
          self.attention, dt, max(c.d_qk + c.d_r, c.d_v), t, s)
      # Scored apart (one einsum against [B, S, d_r]) the shared key is never copied per head:
      # XLA:CPU's temporaries -25% at decode shapes, -10% at T 2048. XLA:TPU fuses the copy into
      # the dot (no temporaries) and keeps two float32 score buffers instead of one (1.55 -> 3.59
      # GiB/device for a 1B student's layer at T 2048), so there the key is concatenated.
      if name == 'reference' and kernels.target_platform() != 'tpu':
        out = attend_shared_rope(q_c, k_c, q_r, k_r, v, mask, scale)
      else:  # one key per head (as fused kernels need it): the shared RoPE key repeated
        k = jnp.broadcast_to(k_r[:, :, None, :], (b, s, n, c.d_r))
        q = q_r
        if c.d_qk:
          k, q = jnp.concatenate([k_c, k], axis=-1), jnp.concatenate([q_c, q_r], axis=-1)
        out = dot_product(q, k, v, mask, scale, name)
    chex.assert_shape(out, (b, t, n, c.d_v))
    return jnp.einsum('BTNH,NHD->BTD', out, self._w(self.o)), cache
