"""Decode caches and their accounting.

A `Cache` is a pytree: one dict of arrays per layer, plus the positions and segment ids of the
cached tokens and the next slot to write. The teacher caches post-RoPE keys and values,
{'k': [B, L, n_kv, d_h], 'v': [B, L, n_kv, d_h]}; the MLA student caches only the latent and the
shared rotated RoPE key, {'c_kv': [B, L, r_kv], 'k_r': [B, L, d_r]}.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from xecomla.models.config import LlamaConfig, MLAConfig

ModelConfig = LlamaConfig | MLAConfig


@flax.struct.dataclass
class Cache:
  layers: tuple[dict[str, jax.Array], ...]
  positions: jax.Array    # [B, L] int32, position of the token in each slot
  segment_ids: jax.Array  # [B, L] int32, 0 = empty slot (or padding)
  index: jax.Array        # [] int32, next slot to write

  @property
  def length(self) -> int:
    return self.positions.shape[1]

  def extend(self, positions: jax.Array, segment_ids: jax.Array) -> 'Cache':
    """Records the positions and segments of T new tokens at slots [index, index + T)."""
    return self.replace(
        positions=write(self.positions, positions.astype(jnp.int32), self.index),
        segment_ids=write(self.segment_ids, segment_ids.astype(jnp.int32), self.index))


def write(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """Writes new [B, T, ...] into buffer [B, L, ...] at slots [index, index + T)."""
  return jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), index, axis=1)


def layer_token_shapes(config: ModelConfig) -> list[dict[str, tuple[int, ...]]]:
  """Per layer, the shape of what one token adds to each cache array."""
  if isinstance(config, MLAConfig):
    return [{'c_kv': (config.r_kv[l],), 'k_r': (config.d_r,)} for l in range(config.n_layers)]
  kv = (config.n_kv_heads, config.head_dim)
  return [{'k': kv, 'v': kv} for _ in range(config.n_layers)]


def init_cache(config: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> Cache:
  """An empty cache for `batch` rows of up to `length` tokens."""
  layers = tuple({name: jnp.zeros((batch, length) + shape, dtype) for name, shape in layer.items()}
                 for layer in layer_token_shapes(config))
  return Cache(layers=layers,
               positions=jnp.zeros((batch, length), jnp.int32),
               segment_ids=jnp.zeros((batch, length), jnp.int32),
               index=jnp.zeros((), jnp.int32))


def values_per_token(config: ModelConfig) -> list[int]:
  """Cached values per token, layer by layer."""
  return [sum(int(np.prod(s)) for s in layer.values()) for layer in layer_token_shapes(config)]


def cache_values_per_token(cache: Cache) -> list[int]:
  """The same count read off real cache arrays (shape [B, L, ...] per array)."""
  return [sum(int(np.prod(a.shape[2:])) for a in layer.values()) for layer in cache.layers]


def cache_bytes(cache: Cache) -> int:
  """Bytes held by the cached keys/values/latents (positions and segment ids not counted)."""
  return sum(a.size * a.dtype.itemsize for layer in cache.layers for a in layer.values())


def kv_report(config: ModelConfig, *, dtype_bytes: int = 2, context: int | None = None,
              memory_bytes: int | None = None, teacher: LlamaConfig | None = None) -> dict[str, Any]:
  """Cache use: values and bytes per token (per layer and in total), at a context, and the longest
  context that fits `memory_bytes` for one sequence; the fraction of `teacher`'s cache if given."""
  per_layer = values_per_token(config)
  total = sum(per_layer)
  report: dict[str, Any] = {
      'values_per_token_per_layer': per_layer,
      'kv_values_per_token': total,
      'bytes_per_token': total * dtype_bytes,
      'dtype_bytes': dtype_bytes,
  }
  if context is not None:
    report['context'] = context
    report['bytes_at_context'] = total * dtype_bytes * context
  if memory_bytes is not None:
    report['memory_bytes'] = memory_bytes
    report['max_context'] = memory_bytes // (total * dtype_bytes)
  if teacher is not None:
    report['teacher_kv_values_per_token'] = teacher.kv_values_per_token()
    report['kv_fraction'] = total / teacher.kv_values_per_token()
    report['compression'] = teacher.kv_values_per_token() / total
  return report
