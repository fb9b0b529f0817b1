"""Held-out NLL measured through the decode cache: teacher-forced decoding, one token at a time.

The full-sequence NLL (`eval.evaluate_nll`) never touches a cache: every position attends to keys
computed in the same pass. What a served model sees is different: each step's query attends to
what the cache stored for earlier tokens, in the cache's dtype (bfloat16, or an int8 / float8
latent with per-token scales). This evaluates the same documents, with the same definition (BOS,
truncation to max_len predicted tokens, token-weighted mean), by writing token t into the cache and
scoring token t + 1 from the logits of that step, so the cost of a cache format is measured where
it is paid. With a float32 cache it equals the full-sequence figure up to float32 rounding
(tests/test_decode.py).

Documents are not packed: each is one row, right-padded (`eval.right_padded`: padding has segment
0, so it is never attended to and never scored); rows are sorted by length and their width rounded
up to a multiple of `bucket`, so few shapes are compiled.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xecomla.eval import right_padded
from xecomla.models import kvcache
from xecomla.train.losses import token_log_probs


@functools.partial(jax.jit, static_argnums=(0,))
def _nll_sums(graphdef, state, tokens, segment_ids, cache):
  """Teacher-forced decode of tokens [B, T] through `cache`: (sum of NLL, predictions)."""
  model = nnx.merge(graphdef, state)
  b, t = tokens.shape

  def step(carry, i):
    cache, total, count = carry
    tok = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
    seg = jax.lax.dynamic_slice_in_dim(segment_ids, i, 1, axis=1)
    logits, cache = model(tok, jnp.full((b, 1), i, jnp.int32), seg, cache)
    nxt = jax.lax.dynamic_slice_in_dim(tokens, jnp.minimum(i + 1, t - 1), 1, axis=1)
    nxt_seg = jax.lax.dynamic_slice_in_dim(segment_ids, jnp.minimum(i + 1, t - 1), 1, axis=1)
    weight = ((nxt_seg > 0) & (i + 1 < t)).astype(jnp.float32)[:, 0]
    nll = -token_log_probs(logits, nxt)[:, 0]
    return (cache, total + jnp.sum(nll * weight), count + jnp.sum(weight)), None

  zero = jnp.zeros((), jnp.float32)
  (_, total, count), _ = jax.lax.scan(step, (cache, zero, zero), jnp.arange(t))
  return total, count


def nll_through_cache(model, seqs: list[list[int]], *, cache_dtype: Any = 'auto',
                      batch_rows: int = 16, bucket: int = 64) -> dict[str, Any]:
  """Token-weighted mean NLL of `model` over encoded documents `seqs` (BOS first), each token
  predicted from the logits of a decode step over the cache (`kvcache.CACHE_DTYPES`)."""
  graphdef, state = nnx.split(model)
  order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
  total, count = 0.0, 0.0
  for start in range(0, len(order), batch_rows):
    tokens, segs = right_padded([seqs[k] for k in order[start:start + batch_rows]], batch_rows,
                                bucket)
    cache = kvcache.init_cache(model.config, batch_rows, tokens.shape[1], cache_dtype, model.dtype)
    s, c = _nll_sums(graphdef, state, jnp.asarray(tokens), jnp.asarray(segs), cache)
    total += float(s)
    count += float(c)
  mean = total / count
  dtype = kvcache.storage_dtype(model.config, cache_dtype, model.dtype).name
  return {'nll': mean, 'ppl': math.exp(mean), 'tokens': int(count), 'docs': len(seqs),
          'cache_dtype': dtype,
          'cache_bytes_per_token': cache_bytes_per_token(model.config, cache_dtype, model.dtype)}


def cache_bytes_per_token(config, cache_dtype: Any = 'auto', compute_dtype: Any = jnp.float32) -> int:
  """Bytes one token occupies in the cache, over all layers (a quantised cache's scale included)."""
  return kvcache.cache_bytes(jax.eval_shape(
      lambda: kvcache.init_cache(config, 1, 1, cache_dtype, compute_dtype)))
