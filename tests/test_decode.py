"""The decode path: cache overflow, prompt buckets, donation, last-position prefill, cache dtypes
(a quantised latent with per-token scales) and the NLL measured through the cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import EPS32, f32_bound, forward_ops, max_abs, within
from xecomla import cache_eval, eval as evaluation, generate
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.models import kvcache, transformer
from xecomla.models.config import LlamaConfig

GQA = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  hidden_dim=40, max_seq_len=128)


@pytest.fixture(scope='module')
def student():
  cfg, p, _ = upcycle(GQA, transformer.init_params(GQA, 1),
                      InitOptions(r_kv=6, r_q=12, d_r=4, rope_dims='paper', rope_key='mean',
                                  keep_ends_fixed=False, round_to=1))
  return cfg, p


def prompt_batch(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, GQA.vocab_size, n).tolist() for n in lengths]


def test_a_write_past_the_end_of_the_cache_is_an_error(student):
  cfg, p = student
  model = transformer.from_params(cfg, p)
  graphdef, state = nnx.split(model)
  cache = kvcache.init_cache(cfg, 1, 6)
  with pytest.raises(ValueError, match='6 tokens and 0 are written: 7 more do not fit'):
    model(jnp.ones((1, 7), jnp.int32), cache=cache)  # eager: the concrete index is checked
  tok = jnp.ones((1, 4), jnp.int32)
  logits, cache = generate.prefill(graphdef, state, tok, jnp.arange(4)[None], tok, cache)
  with pytest.raises(ValueError, match='4 are written: 3 more do not fit'):
    generate.decode(graphdef, 3, generate.Sampling(), state, logits, jnp.full((1,), 4), cache,
                    jax.random.key(0))
  tokens, cache = generate.decode(graphdef, 2, generate.Sampling(), state, logits,
                                  jnp.full((1,), 4), cache, jax.random.key(0))
  assert int(cache.index) == 6 and tokens.shape == (1, 2)


def test_prompts_of_a_new_length_reuse_their_bucket_and_the_cache_is_donated(student):
  cfg, p = student
  model = transformer.from_params(cfg, p)
  assert [generate.bucket(n, 100) for n in (1, 16, 17, 33, 90)] == [16, 16, 32, 64, 100]
  generate.generate(model, prompt_batch([3, 5]), 4)
  compiled = generate._prefill._cache_size()
  generate.generate(model, prompt_batch([7, 11], seed=1), 4)   # the same bucket (16): no compile
  assert generate._prefill._cache_size() == compiled
  generate.generate(model, prompt_batch([20]), 4)              # bucket 32: one more
  assert generate._prefill._cache_size() == compiled + 1
  graphdef, state = nnx.split(model)
  cache = kvcache.init_cache(cfg, 1, 8)
  _, new = generate.prefill(graphdef, state, jnp.ones((1, 2), jnp.int32),
                            jnp.arange(2)[None], jnp.ones((1, 2), jnp.int32), cache)
  assert all(a.is_deleted() for layer in cache.layers for a in layer.values())
  assert not new.layers[0]['latent'].is_deleted()


def test_prefill_gives_the_last_positions_logits(student):
  cfg, p = student
  model = transformer.from_params(cfg, p)
  graphdef, state = nnx.split(model)
  batch = generate.left_pad(prompt_batch([9, 5]))
  args = [jnp.asarray(batch[k]) for k in ('tokens', 'positions', 'segment_ids')]
  full, _ = model(*args)
  last, _ = generate.prefill(graphdef, state, *args, kvcache.init_cache(cfg, 2, 12))
  assert last.shape == (2, GQA.vocab_size)
  # The prefill attends through the cache (expanding its latent), the full pass to its own keys.
  within(jnp.abs(last - full[:, -1]).max(), f32_bound(max_abs(full), forward_ops(GQA, 9, 18)))


def test_quantised_rows_reconstruct_within_half_a_step():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 40)) * np.array([1e-3, 1, 30])[:, None, None],
                  jnp.float32)
  for dtype, top in ((jnp.int8, 127), (jnp.float8_e4m3fn, 448)):
    q, s = kvcache.quantise(x, dtype)
    assert q.dtype == dtype and s.dtype == kvcache.SCALE_DTYPE and s.shape == (3, 5)
    s32 = np.asarray(s, np.float32)[..., None]
    err = np.abs(np.asarray(q, np.float32) * s32 - np.asarray(x))
    if dtype == jnp.int8:  # round to the nearest integer step of `s`, plus float32 division
      bound = s32 / 2 + 4 * EPS32 * np.abs(np.asarray(x))
    else:  # e4m3: 3 mantissa bits (half an ulp = 2^-4 relative), subnormal steps of 2^-9
      bound = np.maximum(2.0 ** -4 * np.abs(np.asarray(x)), 2.0 ** -10 * s32) * (1 + 8 * EPS32)
    assert (err <= bound).all(), float((err / bound).max())
    # The scale (bfloat16, one rounding) keeps the largest value in range: at most one step off.
    assert np.abs(np.asarray(q, np.float32)).max() <= top


@pytest.mark.parametrize('cache_dtype', ['bfloat16', 'int8', 'float8_e4m3fn'])
def test_absorbed_decode_over_a_stored_cache_equals_expanding_the_same_cache(student, cache_dtype):
  """Both modes read the same stored (rounded or quantised) rows: the absorbed path scales scores
  and weights by each token's scales, the naive path dequantises and expands. Equal up to float32
  rounding of the same products associated differently."""
  cfg, p = student
  t = jnp.asarray(prompt_batch([24, 24])).reshape(2, 24)
  outs = {}
  for mode in ('absorb', 'expand'):
    model = transformer.from_params(cfg, p, mla_mode=mode)
    cache = kvcache.init_cache(cfg, 2, 24, cache_dtype)
    steps = []
    for i in range(24):
      logits, cache = model(t[:, i:i + 1], jnp.full((2, 1), i, jnp.int32), None, cache)
      steps.append(logits)
    outs[mode] = jnp.concatenate(steps, 1)
  within(jnp.abs(outs['absorb'] - outs['expand']).max(),
         f32_bound(max_abs(outs['expand']), forward_ops(GQA, 24, 6 + 12)))
  if cache_dtype == 'int8':
    assert set(cache.layers[0]) == {'latent', 'scale'} and cache.layers[0]['scale'].shape == (2, 24, 2)


def test_cache_dtypes_and_their_bytes(student):
  cfg, _ = student
  row = cfg.r_kv[0] + cfg.d_r  # 10 values per token and layer
  per_token = {name: cache_eval.cache_bytes_per_token(cfg, name) for name in
               ('float32', 'bfloat16', 'int8', 'float8_e4m3fn')}
  assert per_token == {'float32': 2 * 4 * row, 'bfloat16': 2 * 2 * row,
                       'int8': 2 * (row + 2 * 2), 'float8_e4m3fn': 2 * (row + 2 * 2)}
  assert kvcache.init_cache(cfg, 1, 2, 'auto', jnp.bfloat16).layers[0]['latent'].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='quantises the MLA latent'):
    kvcache.init_cache(GQA, 1, 2, 'int8')
  with pytest.raises(ValueError, match='is not one of'):
    kvcache.init_cache(cfg, 1, 2, 'int4')


def test_nll_through_a_float32_cache_equals_the_full_sequence_nll(student):
  cfg, p = student
  model = transformer.from_params(cfg, p)
  seqs = [[1] + s for s in prompt_batch([30, 7, 18, 44, 3], seed=2)]
  full = evaluation.evaluate_nll(model, seqs, row_length=64, batch_rows=2)
  through = cache_eval.nll_through_cache(model, seqs, batch_rows=2, bucket=16)
  assert through['tokens'] == full['tokens'] == sum(len(s) - 1 for s in seqs)
  # A mean of per-token NLLs, each from logits that agree to f32_bound (absorbed vs explicit).
  logit_scale = max_abs(model(jnp.asarray([seqs[3]]))[0])
  within(abs(through['nll'] - full['nll']), 2 * f32_bound(logit_scale, forward_ops(GQA, 45, 18)))
  int8 = cache_eval.nll_through_cache(model, seqs, cache_dtype='int8', batch_rows=2, bucket=16)
  assert int8['cache_dtype'] == 'int8' and int8['nll'] != through['nll']
