"""Model FLOPs of a distillation step, counted analytically, and this machine's measured matmul peak:
the two halves of model-FLOPs utilisation (MFU = model FLOPs per second / peak FLOPs per second).

Model FLOPs count the matrix multiplies the model needs, not what an implementation executes
(rematerialisation and padding are not credited): per token a forward pass costs 2 FLOPs per weight
of every matmul (the embedding gather is free, the output head is a matmul) plus the attention
scores and the weighted sum; a backward pass costs twice the forward. A KD step is the teacher's
forward plus the student's forward and backward: 2·teacher + 6·student FLOPs per weight and token.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from xecomla.models.config import LlamaConfig, MLAConfig


def forward_flops_per_token(config: LlamaConfig | MLAConfig, context: float) -> float:
  """FLOPs of one token's forward pass, with `context` the mean number of keys it attends to."""
  llama = config.llama if isinstance(config, MLAConfig) else config
  d, n, h = llama.dim, llama.n_heads, llama.head_dim
  mlp = 3 * d * llama.hidden_dim
  head = d * llama.vocab_size
  per_layer = []
  for l in range(llama.n_layers):
    if isinstance(config, MLAConfig):
      r_q, r_kv = config.r_q[l], config.r_kv[l]
      q_in = d if r_q is None else r_q
      attn_w = ((0 if r_q is None else d * r_q) + q_in * n * (config.d_qk + config.d_r)
                + d * r_kv + d * config.d_r + r_kv * n * (config.d_qk + config.d_v)
                + n * config.d_v * d)
      score = n * (config.d_qk + config.d_r) + n * config.d_v  # q.k and p.v per key
    else:
      attn_w = d * n * h + 2 * d * llama.n_kv_heads * h + n * h * d
      score = 2 * n * h
    per_layer.append(2 * (attn_w + mlp) + 2 * score * context)
  return sum(per_layer) + 2 * head


def kd_step_flops(student: MLAConfig, teacher: LlamaConfig, batch: int, seq_len: int) -> float:
  """Model FLOPs of one KD step on batch x seq_len causal tokens (mean context (seq_len + 1) / 2)."""
  context = (seq_len + 1) / 2
  tokens = batch * seq_len
  return tokens * (3 * forward_flops_per_token(student, context)
                   + forward_flops_per_token(teacher, context))


def matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """Measured FLOP/s of an n x n x n matmul on the default device (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, b))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def decode_step_flops(config: LlamaConfig | MLAConfig, batch: int, keys: int, *,
                      absorbed: bool = True, fused_sum: bool = True) -> float:
  """Matmul FLOPs of one decode step: one new token in each of `batch` rows attending to `keys`
  cache slots (2 FLOPs per multiply-add; the norms, RoPE, softmax, masking and SwiGLU's product
  are elementwise and not counted).

  Teacher: its weights once per token, q.k and p.v per key and head. MLA with `absorbed`: the
  query mapped into latent space (q_c W^UK^T), scored against [c_kv | k_r] and the weighted latent
  summed per head, then up-projected once by W^UV: n_h (2 r_kv + d_r) multiply-adds per key, or
  with `fused_sum` (as models.mla computes it: the weighted sum over the whole fused row, whose
  d_r RoPE columns are then dropped, so as not to copy the cache's latent part every step)
  2 n_h (r_kv + d_r).
  MLA expanded (the naive decode): every cached latent is up-projected by W^UK and W^UV at every
  step, r_kv n_h (d_qk + d_v) per key, before the ordinary attention over the expanded K and V.
  """
  llama = config.llama if isinstance(config, MLAConfig) else config
  d, n = llama.dim, llama.n_heads
  total = d * llama.vocab_size  # the output head (the embedding gather is free)
  for l in range(llama.n_layers):
    mlp = 3 * d * llama.hidden_dim
    if isinstance(config, MLAConfig):
      c, r_q, r_kv = config, config.r_q[l], config.r_kv[l]
      q_in = d if r_q is None else r_q
      weights = ((0 if r_q is None else d * r_q) + q_in * n * (c.d_qk + c.d_r)
                 + d * (r_kv + c.d_r) + n * c.d_v * d)
      if absorbed:
        weights += n * c.d_qk * r_kv + n * r_kv * c.d_v
        per_key = n * ((r_kv if c.d_qk else 0) + c.d_r) + n * (r_kv + (c.d_r if fused_sum else 0))
      else:
        per_key = r_kv * n * (c.d_qk + c.d_v) + n * (c.d_qk + c.d_r) + n * c.d_v
    else:
      h = llama.head_dim
      weights = d * n * h + 2 * d * llama.n_kv_heads * h + n * h * d
      per_key = 2 * n * h
    total += weights + mlp + per_key * keys
  return 2.0 * batch * total
