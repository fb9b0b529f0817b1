"""The teacher's attention: Llama grouped-query attention (MHA / GQA / MQA) with RoPE."""

from __future__ import annotations

import functools
import json
import math

import chex
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xecomla.models import kvcache
from xecomla.models.attention import attend, dot_product
from xecomla.models.config import LlamaConfig
from xecomla.models.layers import apply_rope, einsum, param, rope_inv_freq


@functools.lru_cache(maxsize=None)
def _inv_freq_cached(dim: int, theta: float, scaling_json: str) -> np.ndarray:
  return rope_inv_freq(dim, theta, json.loads(scaling_json))


def teacher_inv_freq(config: LlamaConfig, dim: int | None = None) -> np.ndarray:
  """The teacher's RoPE inverse frequencies over `dim` (default head_dim) dimensions."""
  return _inv_freq_cached(dim or config.head_dim, float(config.rope_theta),
                          json.dumps(config.rope_scaling_dict, sort_keys=True))


class Attention(nnx.Module):
  """q = x W_q [embed -> heads x head_dim], k/v = x W_k/v [embed -> kv_heads x head_dim]."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None,
               attention: str = 'reference'):
    c = config
    self.config = c
    self.dtype = dtype
    self.attention = attention  # the kernel (models.attention.IMPLEMENTATIONS)
    self.q = param(rngs, (c.dim, c.n_heads, c.head_dim), ('embed', 'heads', 'head_dim'))
    self.k = param(rngs, (c.dim, c.n_kv_heads, c.head_dim), ('embed', 'kv_heads', 'head_dim'))
    self.v = param(rngs, (c.dim, c.n_kv_heads, c.head_dim), ('embed', 'kv_heads', 'head_dim'))
    self.o = param(rngs, (c.n_heads, c.head_dim, c.dim), ('heads', 'head_dim', 'embed'),
                   fan_in=c.n_heads * c.head_dim)

  def __call__(self, x, positions, mask, cache=None, index=None):
    """x [B, T, D]; mask [B, T, S] over the T new tokens (no cache) or the cache's S slots."""
    c, dt = self.config, self.dtype
    inv_freq = teacher_inv_freq(c)
    q = apply_rope(einsum('BTD,DNH->BTNH', x, self.q[...].astype(dt)), positions, inv_freq)
    k = apply_rope(einsum('BTD,DKH->BTKH', x, self.k[...].astype(dt)), positions, inv_freq)
    v = einsum('BTD,DKH->BTKH', x, self.v[...].astype(dt))
    chex.assert_shape(q, (*x.shape[:2], c.n_heads, c.head_dim))
    scale = 1.0 / math.sqrt(c.head_dim)
    if cache is None:
      out = dot_product(q, k, v, mask, scale, self.attention)
    else:  # the cache is heads-major [B, K, S, H] (kvcache); T new tokens against its S slots, by
      # the reference einsums (splash's row-index causality does not hold for cached slots)
      cache = {name: kvcache.write(cache[name], x.transpose(0, 2, 1, 3), index, axis=2)
               for name, x in (('k', k), ('v', v))}
      out = attend(q, cache['k'].astype(dt), cache['v'].astype(dt), mask, scale, heads_major=True)
    return einsum('BTNH,NHD->BTD', out, self.o[...].astype(dt)), cache
