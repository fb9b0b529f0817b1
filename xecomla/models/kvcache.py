"""Decode caches and their accounting.

A `Cache` is a pytree: one dict of arrays per layer, plus the positions and segment ids of the
cached tokens and the next slot to write. The teacher caches post-RoPE keys and values
heads-major, {'k': [B, n_kv, L, d_h], 'v': [B, n_kv, L, d_h]} (as Hugging Face's cache: each KV
head's keys are contiguous, so a decode step's dots stream them; token-major [B, L, n_kv, d_h]
measured 3x slower for the attention at 16k tokens on XLA:CPU, which transposed it every step).
The MLA student caches only the latent and the shared rotated RoPE key, fused in one buffer per
layer as DeepSeek's FlashMLA lays it out, {'latent': [B, L, r_kv + d_r]} = [c_kv | k_r], so that
absorbed decode scores a query against it in one contraction.

The cache dtype (`CACHE_DTYPES`): 'auto' is the compute dtype; float32 / bfloat16 store values as
they are; 'int8' and 'float8_e4m3fn' (MLA only) store each token's fused row quantised with two
per-token scales, one for its c_kv part and one for its k_r part, {'latent': int8 [B, L, C],
'scale': bfloat16 [B, L, 2]}: part ~= stored part * its scale, scale = max|part| / 127 (448 for
e4m3, its largest finite value). One scale for the whole row measured worse: the distilled
stories260K student's held-out NLL through an int8 cache rose 0.49% with one, 0.08% with two
(200 stories). The attention applies the scales to the scores and the weights (`models.mla`),
not to the cached values.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from xecomla.models.config import LlamaConfig, MLAConfig

ModelConfig = LlamaConfig | MLAConfig

CACHE_DTYPES = ('auto', 'float32', 'bfloat16', 'int8', 'float8_e4m3fn')
QUANTISED = {'int8': 127.0, 'float8_e4m3fn': 448.0}  # largest value each stores
SCALE_DTYPE = jnp.bfloat16
# float8 values are kept as their bits in uint8: XLA:CPU has no in-place update of an f8 array (the
# compiled decode step converted the whole cache to f16 and back to write one token).
AS_BITS = {'float8_e4m3fn': jnp.uint8}


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


def check_room(cache: Cache, new_tokens: int) -> None:
  """ValueError when writing `new_tokens` at the cache's next slot would run past its end (XLA's
  dynamic_update_slice would clamp the start and overwrite the last slots silently). Checks a
  concrete index only: jitted callers (`generate.prefill`, `generate.decode`) check before they
  dispatch."""
  if isinstance(cache.index, jax.core.Tracer):
    return
  end = int(cache.index) + new_tokens
  if end > cache.length:
    raise ValueError(f'the cache holds {cache.length} tokens and {int(cache.index)} are written: '
                     f'{new_tokens} more do not fit; allocate a longer cache (init_cache length).')


def write(buffer: jax.Array, new: jax.Array, index: jax.Array, axis: int = 1) -> jax.Array:
  """Writes new [B, T, ...] into buffer [B, L, ...] at slots [index, index + T) (the token axis
  `axis` of both)."""
  return jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), index, axis=axis)


def quantise(rows: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """rows [B, T, C] -> (values [B, T, C] in `dtype`, scale [B, T] in SCALE_DTYPE), one scale per
  row: rows ~= values * scale. The scale is rounded to its storage dtype first and the values
  divided by the rounded scale, so the stored pair dequantises consistently."""
  top = QUANTISED[jnp.dtype(dtype).name]
  amax = jnp.max(jnp.abs(rows.astype(jnp.float32)), axis=-1)
  scale = (amax / top).astype(SCALE_DTYPE)
  s = jnp.where(scale > 0, scale.astype(jnp.float32), 1.0)
  q = jnp.clip(rows.astype(jnp.float32) / s[..., None], -top, top)
  if jnp.issubdtype(dtype, jnp.integer):
    q = jnp.round(q)
  return q.astype(dtype), scale


def latent_values(layer: dict[str, jax.Array]) -> jax.Array:
  """The stored latent rows in their value dtype (float8 viewed back from its uint8 bits)."""
  rows = layer['latent']
  if rows.dtype == jnp.uint8:
    return jax.lax.bitcast_convert_type(rows, jnp.float8_e4m3fn)
  return rows


def write_latent(layer: dict[str, jax.Array], c_kv: jax.Array, k_r: jax.Array,
                 index: jax.Array) -> dict[str, jax.Array]:
  """An MLA layer's cache with the fused rows [c_kv | k_r] ([B, T, r_kv + d_r]) written at slots
  [index, index + T), each part quantised with its own scale when the cache holds scales."""
  if 'scale' not in layer:
    return {'latent': write(layer['latent'], jnp.concatenate([c_kv, k_r], axis=-1), index)}
  (qc, sc), (qr, sr) = (quantise(part, latent_values(layer).dtype) for part in (c_kv, k_r))
  values = jnp.concatenate([qc, qr], axis=-1)
  if layer['latent'].dtype == jnp.uint8:
    values = jax.lax.bitcast_convert_type(values, jnp.uint8)
  return {'latent': write(layer['latent'], values, index),
          'scale': write(layer['scale'], jnp.stack([sc, sr], axis=-1), index)}


def read_latent(layer: dict[str, jax.Array], r_kv: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """(c_kv [B, L, r_kv], k_r [B, L, d_r]) dequantised in `dtype`: the whole cache re-read, which
  the expanding (naive) path needs; absorbed decode reads the stored values (`models.mla`)."""
  rows = latent_values(layer).astype(dtype)
  c_kv, k_r = rows[..., :r_kv], rows[..., r_kv:]
  if 'scale' in layer:
    scale = layer['scale'].astype(dtype)
    c_kv, k_r = c_kv * scale[..., 0:1], k_r * scale[..., 1:2]
  return c_kv, k_r


def storage_dtype(config: ModelConfig, dtype: Any, compute_dtype: Any = jnp.float32) -> Any:
  """The dtype of the cache's value arrays for a `CACHE_DTYPES` name (or a dtype)."""
  name = jnp.dtype(compute_dtype).name if str(dtype) == 'auto' else jnp.dtype(dtype).name
  if name not in CACHE_DTYPES:
    raise ValueError(f'cache dtype {dtype!r} is not one of {CACHE_DTYPES}')
  if name in QUANTISED and not isinstance(config, MLAConfig):
    raise ValueError(f'cache dtype {name} quantises the MLA latent; a Llama (GQA) cache stores float32 '
                     f'or bfloat16; pick one of those for the teacher.')
  return jnp.dtype(name)


def layer_token_shapes(config: ModelConfig) -> list[dict[str, tuple[int, ...]]]:
  """Per layer, the shape of what one token adds to each cache array (values only; a quantised
  cache adds one scale per token)."""
  if isinstance(config, MLAConfig):
    return [{'latent': (config.r_kv[l] + config.d_r,)} for l in range(config.n_layers)]
  kv = (config.n_kv_heads, config.head_dim)
  return [{'k': kv, 'v': kv} for _ in range(config.n_layers)]


def _zeros(batch: int, length: int, name: str, shape: tuple[int, ...], dtype) -> jax.Array:
  if name in ('k', 'v'):  # heads-major: [B, n_kv, L, d_h]
    return jnp.zeros((batch, shape[0], length) + shape[1:], dtype)
  return jnp.zeros((batch, length) + shape, dtype)


def init_cache(config: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32,
               compute_dtype: Any = jnp.float32) -> Cache:
  """An empty cache for `batch` rows of up to `length` tokens; `dtype` a dtype or a CACHE_DTYPES
  name ('auto' = compute_dtype)."""
  dtype = storage_dtype(config, dtype, compute_dtype)
  layers = []
  for layer in layer_token_shapes(config):
    stored = AS_BITS.get(dtype.name, dtype)
    arrays = {name: _zeros(batch, length, name, shape, stored) for name, shape in layer.items()}
    if dtype.name in QUANTISED:
      arrays['scale'] = jnp.zeros((batch, length, 2), SCALE_DTYPE)
    layers.append(arrays)
  return Cache(layers=tuple(layers),
               positions=jnp.zeros((batch, length), jnp.int32),
               segment_ids=jnp.zeros((batch, length), jnp.int32),
               index=jnp.zeros((), jnp.int32))


def grow(cache: Cache, length: int) -> Cache:
  """The cache with room for `length` tokens: empty slots (segment 0) appended to every array."""
  extra = length - cache.length
  if extra < 0:
    raise ValueError(f'cannot grow a cache of {cache.length} tokens to {length}')

  def pad(x, axis):
    return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
  layers = tuple({n: pad(x, 2 if n in ('k', 'v') else 1) for n, x in layer.items()}
                 for layer in cache.layers)
  return cache.replace(layers=layers, positions=pad(cache.positions, 1),
                       segment_ids=pad(cache.segment_ids, 1))


def values_per_token(config: ModelConfig) -> list[int]:
  """Cached values per token, layer by layer."""
  return [sum(int(np.prod(s)) for s in layer.values()) for layer in layer_token_shapes(config)]


def cache_values_per_token(cache: Cache) -> list[int]:
  """The same count read off real cache arrays (a quantised cache's scales included)."""
  b, length = cache.positions.shape
  return [sum(a.size // (b * length) for a in layer.values()) for layer in cache.layers]


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
