"""Caches filled to a context without a prefill of that length, for the decode benchmarks.

Every cache array gets random normal values for the slots < context, per channel at the spread a
short real prefill (32 random tokens, the model's default mode) leaves there; positions
0..context-1, segment 1 and index = context. The values depend only on the model's weights, the
shapes and the seed, so every mode of one model (naive and absorbed) decodes the same cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from xecomla import generate
from xecomla.models import kvcache, transformer


def slot_axes(config, cache_dtype, dtype) -> list[dict[str, int]]:
  """Per layer and cache array, its slot (token) axis: the one that grows with the length (the
  layouts differ: the teacher's k/v are heads-major, the latent token-major)."""
  short, long = (jax.eval_shape(lambda n=n: kvcache.init_cache(config, 1, n, cache_dtype, dtype))
                 for n in (2, 3))
  return [jax.tree.map(lambda a, b: [p != q for p, q in zip(a.shape, b.shape)].index(True), x, y)
          for x, y in zip(short.layers, long.layers)]


def channel_std(config, params, dtype, cache_dtype, tokens: int = 32) -> list[dict]:
  """Per layer and cache array, the spread of each channel (over batch and slots, kept as axes
  of size 1) after a real prefill of `tokens` random ids (the model's default mode; a float
  cache: the values before any quantisation)."""
  graphdef, state = nnx.split(transformer.from_params(config, params, dtype=dtype))
  vocab = getattr(config, 'llama', config).vocab_size
  ids = jax.random.randint(jax.random.key(7), (1, tokens), 0, vocab, jnp.int32)
  pos = jnp.arange(tokens, dtype=jnp.int32)[None]
  float_dtype = dtype if str(cache_dtype) in kvcache.QUANTISED else cache_dtype
  cache = kvcache.init_cache(config, 1, tokens, float_dtype, dtype)
  _, cache = generate.prefill(graphdef, state, ids, pos, jnp.ones_like(pos), cache)
  axes = slot_axes(config, float_dtype, dtype)
  return [jax.tree.map(lambda a, s: jnp.std(a.astype(jnp.float32), axis=(0, s), keepdims=True),
                       layer, ax) for layer, ax in zip(cache.layers, axes)]


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _fill(key, std, shape, axis, context, dtype):
  """Normal values of `shape` at the channel spread `std`, zero at slots >= context."""
  r = jax.random.normal(key, shape, jnp.float32) * std
  filled = jax.lax.broadcasted_iota(jnp.int32, shape, axis) < context
  return jnp.where(filled, r, 0.0).astype(dtype)


def filled_cache(config, params, batch: int, context: int, length: int, dtype, cache_dtype='auto',
                 seed: int = 0) -> kvcache.Cache:
  """A cache of `length` slots whose first `context` are filled (module docstring); the same
  values for every mode of one model. A quantised cache gets the float rows quantised by the
  model's own cache writer."""
  quantised = str(cache_dtype) in kvcache.QUANTISED
  float_dtype = dtype if quantised else cache_dtype
  stds = channel_std(config, params, dtype, cache_dtype)
  axes = slot_axes(config, float_dtype, dtype)
  floats = jax.eval_shape(lambda: kvcache.init_cache(config, batch, length, float_dtype, dtype))
  empty = jax.eval_shape(lambda: kvcache.init_cache(config, batch, length, cache_dtype, dtype))
  layers = []
  for l, (std, ax, like) in enumerate(zip(stds, axes, floats.layers)):
    names = sorted(std)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), l), len(names))
    layer = {k: _fill(kk, std[k], like[k].shape, ax[k], context, like[k].dtype)
             for kk, k in zip(keys, names)}
    if quantised:  # MLA only: [c_kv | k_r] rows through the writer, each part with its scale
      rows, r_kv = jnp.concatenate([layer[k] for k in names], -1), config.r_kv[l]
      zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), empty.layers[l])
      layer = kvcache.write_latent(zeros, rows[..., :r_kv], rows[..., r_kv:], 0)
    layers.append(layer)
  slots = jnp.arange(length, dtype=jnp.int32)
  return kvcache.Cache(layers=tuple(layers), positions=jnp.tile(slots, (batch, 1)),
                       segment_ids=jnp.tile((slots < context).astype(jnp.int32), (batch, 1)),
                       index=jnp.asarray(context, jnp.int32))
