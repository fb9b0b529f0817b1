"""Whole documents sampled from a model inside jit, for training data: the teacher-generated stories
(`teacher_data`) and on-policy distillation (`train/onpolicy`) both draw their rows here.

A row starts at BOS (position 0) and is decoded token by token through the model's cache (the
student's holds only its latent and shared RoPE key) until `length` tokens. Row r of a call draws
with its own key, fold_in(key, row_ids[r]), one fold per position, so a row's sample depends only on
the key, its id and the model: not on the batch it is decoded in, nor on the devices. A row stops
at its first stop token: an EOS is kept (the model learns to end), a BOS is not (in llama2.c-style
data every document starts with BOS and none ends with EOS, so a BOS is where the next one would
begin). What follows the stop is padding: segment 0, never a target, never attended to.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xecomla.generate import Sampling, sample
from xecomla.models import kvcache


def row_keys(key: jax.Array, row_ids: jax.Array) -> jax.Array:
  """One key per row: fold_in(key, row id)."""
  return jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)


def sample_rows(model, keys: jax.Array, length: int, sampling: Sampling, bos_id: int,
                eos_ids: tuple[int, ...]) -> dict[str, jax.Array]:
  """keys [B] -> {'tokens', 'positions', 'segment_ids'} [B, length] int32 (traceable)."""
  b = keys.shape[0]
  ones = jnp.ones((b, 1), jnp.int32)
  cache = kvcache.init_cache(model.config, b, length, 'auto', model.dtype)
  first = jnp.full((b, 1), bos_id, jnp.int32)
  logits, cache = model(first, jnp.zeros((b, 1), jnp.int32), ones, cache)
  eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

  def draw(row_logits, key, t):
    return sample(row_logits[None], jax.random.fold_in(key, t), sampling)[0]

  def step(carry, t):
    logits, cache, stopped = carry
    token = jax.vmap(draw, (0, 0, None))(logits[:, -1], keys, t)
    is_eos = jnp.any(token[:, None] == eos[None], axis=-1)
    real = ~stopped & (token != bos_id)          # a stop EOS is real, a stop BOS is not
    stopped = stopped | is_eos | (token == bos_id)
    logits, cache = model(token[:, None], jnp.full((b, 1), t, jnp.int32), ones, cache)
    return (logits, cache, stopped), (token, real)

  steps = jnp.arange(1, length, dtype=jnp.int32)
  _, (tokens, real) = jax.lax.scan(step, (logits, cache, jnp.zeros((b,), bool)), steps)
  tokens = jnp.concatenate([first, tokens.T], axis=1)
  segment = jnp.concatenate([ones, real.T.astype(jnp.int32)], axis=1)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  return {'tokens': jnp.where(segment > 0, tokens, 0), 'positions': positions * segment,
          'segment_ids': segment}


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _sample_jit(graphdef, state, keys, length, sampling, bos_id, eos_ids):
  return sample_rows(nnx.merge(graphdef, state), keys, length, sampling, bos_id, eos_ids)


def documents(graphdef, state, *, seed: int, first_row: int, rows: int, length: int,
              sampling: Sampling, bos_id: int, eos_ids: tuple[int, ...]) -> list[np.ndarray]:
  """Rows first_row .. first_row + rows - 1 of seed's stream, each cut to its real tokens."""
  ids = jnp.arange(first_row, first_row + rows, dtype=jnp.uint32)
  out = _sample_jit(graphdef, state, row_keys(jax.random.key(seed), ids), length, sampling,
                    bos_id, tuple(eos_ids))
  tokens, segment = np.asarray(out['tokens']), np.asarray(out['segment_ids'])
  return [row[:int(n)] for row, n in zip(tokens, segment.sum(axis=1))]
