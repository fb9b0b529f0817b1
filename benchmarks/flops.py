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
