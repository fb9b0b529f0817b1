"""Building blocks shared by teacher and student: parameters with logical axes, RMSNorm, RoPE,
SwiGLU MLP, token embedding.

Every parameter is an `nnx.Param` whose metadata `axes` names its logical axes (e.g.
('embed', 'heads', 'head_dim')); `xecomla.sharding` maps those names to mesh axes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum of activations with a weight, the result in the operands' dtype. On CPU a
  bfloat16 product is written as float32-accumulated and then rounded: XLA:CPU computes a
  bf16 x bf16 -> bf16 dot by converting both operands to float32 copies first (every weight, at
  each decode step), while its fused (YNNPACK) bf16 x bf16 -> f32 dot reads the bf16 weight
  directly (BENCHMARKS.md, "Decode"). The same arithmetic either way; other backends keep the
  plain product (its backward stays in bf16). Batched products (dimensions in both operands and
  the result, e.g. heads) stay plain: XLA:CPU runs some of those (P V at one query) as plain
  dots, which have no bf16 x bf16 -> f32 kernel ("Unsupported element type for DotThunk")."""
  from xecomla.models.kernels import target_platform
  inputs, out = spec.replace('...', '').split('->')
  lhs, rhs = inputs.split(',')
  batched = set(lhs) & set(rhs) & set(out)  # a batched dot (e.g. per head): kept plain
  if a.dtype == jnp.bfloat16 and not batched and target_platform() == 'cpu':
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)
  return jnp.einsum(spec, a, b)


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str], *, init: str = 'normal',
          fan_in: int | None = None, dtype: Dtype = jnp.float32) -> nnx.Param:
  """A parameter of `shape` tagged with its logical `axes`.

  init: 'normal' (std 1/sqrt(fan_in)), 'ones' or 'zeros'. With rngs=None the value is zeros (used
  when the parameter is about to be overwritten by loaded weights).
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(axes):
    raise ValueError(f'shape {shape} and axes {tuple(axes)} differ in rank')
  if init == 'ones':
    value = jnp.ones(shape, dtype)
  elif init == 'zeros' or rngs is None:
    value = jnp.zeros(shape, dtype)
  elif init == 'normal':
    std = 1.0 / math.sqrt(fan_in if fan_in else shape[0])
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  else:
    raise ValueError(f'unknown init {init!r}')
  return nnx.Param(value, axes=tuple(axes))


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 (as Hugging Face Llama does)."""

  def __init__(self, dim: int, eps: float, *, axis_name: str = 'embed', rngs: nnx.Rngs | None = None):
    self.eps = eps
    self.scale = param(rngs, (dim,), (axis_name,), init='ones')

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(dtype)
    return self.scale[...].astype(dtype) * y


# ----------------------------------------------------------------------------------------------
# RoPE (Hugging Face rotate-half layout: dimension j pairs with j + d/2)
# ----------------------------------------------------------------------------------------------

def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None = None) -> np.ndarray:
  """Inverse frequencies theta^(-2i/dim), i < dim/2, with optional `llama3` scaling.

  Computed in float32 exactly as transformers' `_compute_default_rope_parameters` and
  `_compute_llama3_parameters` do, so positions rotate identically.
  """
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  # torch's float32 pow is correctly rounded; numpy's float32 pow can be 1 ulp off, so raise in
  # float64 and round once (bit-identical to transformers on every case tested).
  power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
  inv_freq = (np.float32(1.0) / power).astype(np.float32)
  scaling = dict(scaling) if scaling else None
  kind = (scaling or {}).get('rope_type', 'default')
  if kind == 'default':
    return inv_freq
  if kind != 'llama3':
    raise ValueError(f"rope_type {kind!r} is not supported; use 'default' or 'llama3'.")
  factor = scaling['factor']
  low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
  old_len = scaling['original_max_position_embeddings']
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = (2 * math.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
  smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
  smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray | jax.Array) -> jax.Array:
  """Rotates x [B, T, ..., D] (rotate-half layout) by positions [B, T] with D/2 inverse frequencies."""
  chex.assert_equal(x.shape[-1], 2 * len(inv_freq))
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # B T D/2
  angles = jnp.concatenate([angles, angles], axis=-1)
  extra = x.ndim - angles.ndim
  angles = angles.reshape(angles.shape[:2] + (1,) * extra + angles.shape[2:])
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# Embedding and MLP
# ----------------------------------------------------------------------------------------------

class Embed(nnx.Module):
  """Token embedding [vocab, embed]; `attend` gives logits for a tied output layer."""

  def __init__(self, vocab: int, dim: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None):
    self.dtype = dtype
    self.embedding = param(rngs, (vocab, dim), ('vocab', 'embed'), fan_in=dim)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum('...TD,VD->...TV', x, self.embedding[...].astype(x.dtype),
                      preferred_element_type=jnp.float32)


class MLP(nnx.Module):
  """SwiGLU: down(silu(x W_gate) * (x W_up))."""

  def __init__(self, dim: int, hidden: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None):
    self.dtype = dtype
    self.gate = param(rngs, (dim, hidden), ('embed', 'mlp'))
    self.up = param(rngs, (dim, hidden), ('embed', 'mlp'))
    self.down = param(rngs, (hidden, dim), ('mlp', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    g = einsum('BTD,DF->BTF', x, self.gate[...].astype(dt))
    u = einsum('BTD,DF->BTF', x, self.up[...].astype(dt))
    return einsum('BTF,FD->BTD', jax.nn.silu(g) * u, self.down[...].astype(dt))
