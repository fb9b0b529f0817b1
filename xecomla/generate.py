"""Generation for teacher and student: a jit-compiled prefill, then a jit-compiled decode loop over a
preallocated cache (the student's holds only its latent and shared RoPE key), greedy or sampled.

Prompts of different lengths are left-padded: padding has segment 0 and is never attended to, and
each row's positions start at 0 on its first real token. The padded width is rounded up to a
bucket (`bucket`: a power of two), so prompts of a new length reuse the compiled prefill and
decode of their bucket. Both jitted functions donate the cache they are given (it is updated in
place; use the one they return) and refuse a write past the cache's end. The prefill computes
the logits of the last position only.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xecomla.models import kvcache


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy; otherwise softmax(logits / temperature) restricted to the top_k
  tokens (0 = all) and to the smallest set whose probability reaches top_p."""
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0


def sample(logits: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
  """logits [B, V] -> token ids [B]."""
  if s.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    cutoff = jnp.min(jnp.where(before < s.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: list[list[int]], width: int | None = None) -> dict[str, np.ndarray]:
  """Prompts left-padded to `width` (default: the longest) as tokens, positions, segment_ids."""
  width = width or max(len(p) for p in prompts)
  if min(len(p) for p in prompts) == 0:
    raise ValueError('every prompt needs at least one token (e.g. BOS)')
  out = {k: np.zeros((len(prompts), width), np.int32) for k in ('tokens', 'positions', 'segment_ids')}
  for b, p in enumerate(prompts):
    out['tokens'][b, width - len(p):] = p
    out['positions'][b, width - len(p):] = np.arange(len(p))
    out['segment_ids'][b, width - len(p):] = 1
  return out


MIN_BUCKET = 16


def bucket(width: int, limit: int) -> int:
  """The padded prompt width for a prompt of `width` tokens: the next power of two (at least
  MIN_BUCKET), capped at `limit` (the model's length less the tokens to generate)."""
  return max(width, min(limit, max(MIN_BUCKET, 1 << (width - 1).bit_length())))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnames=('cache',))
def _prefill(graphdef, state, tokens, positions, segment_ids, cache):
  model = nnx.merge(graphdef, state)
  hidden, cache = model(tokens, positions, segment_ids, cache, logits=False)
  return model.head(hidden[:, -1]), cache


def prefill(graphdef, state, tokens, positions, segment_ids, cache):
  """Runs the prompt [B, T] through the model into the cache (donated); returns the last
  position's logits [B, V] and the cache."""
  kvcache.check_room(cache, tokens.shape[1])
  return _prefill(graphdef, state, tokens, positions, segment_ids, cache)


def decode(graphdef, steps: int, sampling: Sampling, state, logits, positions, cache, rng):
  """Samples `steps` tokens one at a time from `logits` [B, V] (the last position's); positions
  [B] is each row's next position. Returns tokens [B, steps] and the cache (donated)."""
  kvcache.check_room(cache, steps)
  return _decode(graphdef, steps, sampling, state, logits, positions, cache, rng)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnames=('cache',))
def _decode(graphdef, steps: int, sampling: Sampling, state, logits, positions, cache, rng):
  model = nnx.merge(graphdef, state)
  ones = jnp.ones((logits.shape[0], 1), jnp.int32)

  def step(carry, rng):
    logits, positions, cache = carry
    token = sample(logits, rng, sampling)
    new_logits, cache = model(token[:, None], positions[:, None], ones, cache)
    return (new_logits[:, -1], positions + 1, cache), token

  (_, _, cache), tokens = jax.lax.scan(step, (logits, positions, cache), jax.random.split(rng, steps))
  return tokens.T, cache


def generate(model, prompts: list[list[int]], max_new_tokens: int, *,
             sampling: Sampling = Sampling(), seed: int = 0, eos_id: int | None = None,
             eos_ids: tuple[int, ...] = (), cache_dtype: Any = 'auto') -> dict[str, Any]:
  """Generates up to max_new_tokens after each prompt; cache_dtype a kvcache.CACHE_DTYPES name or
  a dtype ('auto': the model's compute dtype).

  Returns {'tokens': new ids per prompt (cut after the first EOS when eos_id or eos_ids are
  given), 'cache': the final cache, 'prefill_s', 'decode_s': wall times (compilation included on
  a first call of a bucket)}.
  """
  longest = max(len(p) for p in prompts)
  max_len = model.llama.max_seq_len
  if longest + max_new_tokens > max_len:
    raise ValueError(f'prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model\'s '
                     f'maximum length {max_len}: shorten the prompt or generate fewer tokens.')
  batch = left_pad(prompts, bucket(longest, max_len - max_new_tokens))
  b, width = batch['tokens'].shape
  graphdef, state = nnx.split(model)
  cache = kvcache.init_cache(model.config, b, width + max_new_tokens, cache_dtype, model.dtype)
  t0 = time.perf_counter()
  logits, cache = prefill(graphdef, state, *(jnp.asarray(batch[k]) for k in
                                             ('tokens', 'positions', 'segment_ids')), cache)
  logits.block_until_ready()
  t1 = time.perf_counter()
  next_pos = jnp.asarray(batch['positions'][:, -1] + 1)
  tokens, cache = decode(graphdef, max_new_tokens, sampling, state, logits, next_pos, cache,
                         jax.random.key(seed))
  tokens = np.asarray(tokens)
  t2 = time.perf_counter()
  stops = set(eos_ids) | ({eos_id} if eos_id is not None else set())
  out = []
  for row in tokens.tolist():
    ends = [i for i, tok in enumerate(row) if tok in stops]
    out.append(row[:ends[0] + 1] if ends else row)
  return {'tokens': out, 'cache': cache, 'prefill_s': t1 - t0, 'decode_s': t2 - t1}
