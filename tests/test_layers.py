"""Shapes, dtypes and the maths of the building blocks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import f32_bound, max_abs, within
from xecomla.models import kvcache, transformer
from xecomla.models.attention import attend, attention_mask
from xecomla.models.config import LlamaConfig
from xecomla.models.layers import MLP, Embed, RMSNorm, apply_rope, rope_inv_freq
from xecomla.models.llama import Attention

CFG = LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  hidden_dim=40, max_seq_len=64)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_module_shapes_and_dtypes(dtype):
  rngs = nnx.Rngs(0)
  x = jnp.ones((2, 5, 32), dtype)
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  mask = attention_mask(pos, jnp.ones((2, 5), jnp.int32), pos, jnp.ones((2, 5), jnp.int32))
  chex.assert_shape(mask, (2, 5, 5))
  out = RMSNorm(32, 1e-5, rngs=rngs)(x)
  chex.assert_shape(out, (2, 5, 32)); chex.assert_type(out, dtype)
  out = MLP(32, 40, dtype=dtype, rngs=rngs)(x)
  chex.assert_shape(out, (2, 5, 32)); chex.assert_type(out, dtype)
  out, cache = Attention(CFG, dtype=dtype, rngs=rngs)(x, pos, mask)
  chex.assert_shape(out, (2, 5, 32)); chex.assert_type(out, dtype)
  assert cache is None
  emb = Embed(50, 32, dtype=dtype, rngs=rngs)
  chex.assert_type(emb(jnp.zeros((2, 5), jnp.int32)), dtype)
  chex.assert_shape(emb.attend(x), (2, 5, 50))
  logits, _, hidden = transformer.Transformer(CFG, dtype=dtype, rngs=rngs)(
      jnp.zeros((2, 5), jnp.int32), return_hidden=True)
  chex.assert_shape(logits, (2, 5, 50)); chex.assert_type(logits, jnp.float32)
  assert len(hidden) == 2 and hidden[0].shape == (2, 5, 32)


def test_parameters_carry_logical_axes():
  axes = transformer.param_axes(CFG)
  assert axes['layers'][0]['attn']['k'] == ('embed', 'kv_heads', 'head_dim')
  assert axes['layers'][1]['mlp']['down'] == ('mlp', 'embed')
  assert axes['embed']['embedding'] == ('vocab', 'embed')
  params = transformer.init_params(CFG)
  for a, p in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(params)):
    assert len(a) == p.ndim


def test_from_params_rejects_wrong_shapes():
  params = transformer.init_params(CFG)
  params['layers'][0]['attn']['q'] = np.zeros((32, 4, 4), np.float32)
  with pytest.raises(ValueError, match=r"\['layers'\]\[0\]\['attn'\]\['q'\] has shape"):
    transformer.from_params(CFG, params)


def test_rope_frequencies_equal_transformers():
  import transformers
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  scaling = {'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0,
             'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}
  cfg = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64,
                                 rope_parameters={'rope_theta': 500000.0, **scaling})
  ref, _ = ROPE_INIT_FUNCTIONS['llama3'](cfg)
  np.testing.assert_array_equal(rope_inv_freq(64, 500000.0, scaling), ref.numpy())


def test_rope_is_a_rotation_that_depends_on_relative_position():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 8)), jnp.float32) for _ in range(2))
  inv = rope_inv_freq(8, 10000.0)

  def score(tq, tk):
    return float(jnp.sum(apply_rope(q, jnp.array([[tq]]), inv) * apply_rope(k, jnp.array([[tk]]), inv)))

  # A float32 angle pos * freq is off by eps * pos / 2, its cos and sin by as much again; a score
  # of 8 products then moves by |q| |k| times that: the scale is |q| |k|, the count 8 products plus
  # 2 * 24 for the largest position.
  qk = float(jnp.linalg.norm(q) * jnp.linalg.norm(k))
  within(abs(score(7, 3) - score(24, 20)), f32_bound(qk, 8 + 2 * 24))
  # A rotation keeps the norm: cos/sin at position 9 and a norm over 8 values.
  within(abs(jnp.linalg.norm(apply_rope(q, jnp.array([[9]]), inv)) - jnp.linalg.norm(q)),
         f32_bound(jnp.linalg.norm(q), 8 + 2 * 9))


def test_attention_never_crosses_segments():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 2, 4)), jnp.float32) for _ in range(3))
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  pos = jnp.array([[0, 1, 2, 0, 1, 0]])
  out = attend(q, k, v, attention_mask(pos, seg, pos, seg), 0.5)
  alone = attend(q[:, 3:5], k[:, 3:5], v[:, 3:5], attention_mask(pos[:, 3:5], seg[:, 3:5],
                                                                  pos[:, 3:5], seg[:, 3:5]), 0.5)
  # Masked scores give exact zeros; the rest is a float32 softmax and P V over 6 vs 2 keys.
  within(jnp.abs(out[:, 3:5] - alone).max(), f32_bound(max_abs(v), 6 + 4 + 6))
  assert not np.isnan(np.asarray(out)).any()  # the padding row is fully masked, not NaN


def test_cache_shapes_and_accounting():
  cache = kvcache.init_cache(CFG, 3, 16, jnp.bfloat16)
  assert cache.layers[0]['k'].shape == (3, 2, 16, 8)  # heads-major
  assert kvcache.cache_values_per_token(cache) == kvcache.values_per_token(CFG) == [32, 32]
  assert kvcache.cache_bytes(cache) == 2 * 2 * 3 * 16 * 32
  r = kvcache.kv_report(CFG, dtype_bytes=2, context=100, memory_bytes=64000, teacher=CFG)
  assert r['kv_values_per_token'] == 64 and r['bytes_at_context'] == 12800
  assert r['max_context'] == 500 and r['kv_fraction'] == 1.0
