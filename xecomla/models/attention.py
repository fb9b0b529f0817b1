"""Masks, the reference softmax attention shared by teacher (GQA) and student (MLA, explicit path),
and `dot_product`, which runs it by the configured implementation (fused kernels: models.kernels).

Masking is by segment and position: a query attends to a key of the same non-zero segment whose
position is not later than its own. Packed rows (several documents, positions restarting per
document) and left-padded generation (padding has segment 0) use the same rule, so attention never
crosses documents and never sees padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xecomla.models import kernels

# Attention kernels by name (config `model.attention`): `reference` is the einsum path below and
# `blocked` the same in causal blocks (causal_blocks); `xla`, `cudnn`, `splash` are in
# models.kernels; `auto` picks one per backend at trace time.
IMPLEMENTATIONS = ('auto', 'reference', 'blocked', 'xla', 'cudnn', 'splash')
CAUSAL_BLOCKS = 8      # query blocks of `blocked`: (n + 1) / 2n of the scores, 56% at 8
MIN_BLOCK_ROWS = 16    # fewer blocks where the rows are short (one block: the reference path)

NEG_INF = -1e30  # finite, so that fully masked (padding) rows give uniform weights, not NaN


def attention_mask(q_pos: jax.Array, q_seg: jax.Array, k_pos: jax.Array, k_seg: jax.Array) -> jax.Array:
  """[B, T] query and [B, S] key positions / segment ids -> boolean mask [B, T, S]."""
  same = q_seg[:, :, None] == k_seg[:, None, :]
  causal = k_pos[:, None, :] <= q_pos[:, :, None]
  return same & causal & (k_seg[:, None, :] > 0)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis in float32; `mask` broadcasts against `scores`."""
  scores = jnp.where(mask, scores.astype(jnp.float32), NEG_INF)
  return jax.nn.softmax(scores, axis=-1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, *,
           heads_major: bool = False) -> jax.Array:
  """Grouped-query attention.

  q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] with N a multiple of K (query head n uses KV
  head n // (N / K), as Hugging Face's repeat_kv does); mask [B, T, S]. Returns [B, T, N, Hv].
  heads_major: k [B, K, S, H] and v [B, K, S, Hv] instead, the teacher's decode cache (kvcache).
  """
  b, t, n, h = q.shape
  kv = 'BKSH' if heads_major else 'BSKH'
  kv_heads = k.shape[kv.index('K')]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum(f'BTKGH,{kv}->BKGTS', q, k, preferred_element_type=jnp.float32) * scale
  probs = masked_softmax(scores, mask[:, None, None])
  out = jnp.einsum(f'BKGTS,{kv}->BTKGH', probs.astype(v.dtype), v)
  return out.reshape(b, t, n, v.shape[-1])


def attend_shared_rope(q_c: jax.Array | None, k_c: jax.Array | None, q_r: jax.Array,
                       k_r: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """MLA's explicit attention with the RoPE key shared by all heads, never broadcast per head.

  score_n(t, s) = q_c[t, n] . k_c[s, n] + q_r[t, n] . k_r[s]: the same maths as attend() on
  [q_c, q_r] against [k_c, k_r repeated per head], with one einsum against k_r [B, S, R].
  q_c [B, T, N, C], k_c [B, S, N, C] (both None when C = 0), q_r [B, T, N, R], v [B, S, N, Hv].
  """
  scores = jnp.einsum('BTNH,BSH->BNTS', q_r, k_r, preferred_element_type=jnp.float32)
  if q_c is not None:
    scores = scores + jnp.einsum('BTNH,BSNH->BNTS', q_c, k_c, preferred_element_type=jnp.float32)
  probs = masked_softmax(scores * scale, mask[:, None])
  return jnp.einsum('BNTS,BSNH->BTNH', probs.astype(v.dtype), v)


def causal_blocks(fn, queries: tuple, keys: tuple, mask: jax.Array) -> jax.Array:
  """fn(queries, keys, mask) run per block of query rows against only the keys up to the block's
  last row, the outputs concatenated along T: the same attention as fn over the whole rows,
  without the scores (and their backward) of the key rows after each block, all masked.

  Self-attention only (T == S, no cache): exact when the mask never lets a query attend to a
  later row, i.e. within each document positions increase along the row, as in packed training
  and evaluation rows and left-padded prompts (splash's assumption too). queries [B, T, ...],
  keys [B, S, ...] (None passes through), mask [B, T, S].
  """
  t = mask.shape[1]
  if mask.shape[2] != t:
    raise ValueError(f'causal blocks are self-attention: {t} queries against {mask.shape[2]} keys')
  n = max(1, min(CAUSAL_BLOCKS, t // MIN_BLOCK_ROWS))
  cut = lambda xs, lo, hi: tuple(None if x is None else x[:, lo:hi] for x in xs)
  outs, start = [], 0
  for i in range(n):
    end = t * (i + 1) // n
    outs.append(fn(cut(queries, start, end), cut(keys, 0, end), mask[:, start:end, :end]))
    start = end
  return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


def dot_product(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                implementation: str = 'reference') -> jax.Array:
  """attend() by `implementation` (IMPLEMENTATIONS), resolved for the platform at trace time
  (kernels.resolve: UsageError where it cannot run). Shapes as attend()."""
  name = kernels.resolve(implementation, q.dtype, max(q.shape[-1], v.shape[-1]), q.shape[1],
                         k.shape[1])
  if name == 'reference':
    return attend(q, k, v, mask, scale)
  if name == 'blocked':
    return causal_blocks(lambda qs, kv, m: attend(*qs, *kv, m, scale), (q,), (k, v), mask)
  if name in ('xla', 'cudnn'):
    return kernels.fused(q, k, v, mask, scale, name)
  return kernels.splash_attention(q, k, v, mask, scale,
                                  interpret=kernels.target_platform() != 'tpu')
