"""The MLA student: exactness of the conversion, absorbed decode == explicit path, the cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import EPS64, f32_bound, forward_ops, max_abs, within
from xecomla import generate
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.models import kvcache, transformer
from xecomla.models.config import LlamaConfig, MLAConfig

MQA = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=8,
                  hidden_dim=40, max_seq_len=128)
GQA = LlamaConfig(vocab_size=61, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                  hidden_dim=40, max_seq_len=128,
                  rope_scaling={'rope_type': 'llama3', 'factor': 4.0, 'low_freq_factor': 1.0,
                                'high_freq_factor': 4.0, 'original_max_position_embeddings': 16})


def tokens(b=2, t=64, vocab=61, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


@pytest.mark.parametrize('rope_dims,rope_key', [('high_freq', 'mean'), ('paper', 'mean'),
                                                ('norm', 'fit'), ('uniform', 'mean')])
def test_mqa_at_full_rank_with_all_dims_rope_reproduces_the_teacher(rope_dims, rope_key):
  params = transformer.init_params(MQA, 3)
  cfg, student, _ = upcycle(MQA, params, InitOptions(r_kv=32, r_q=32, d_r=8, rope_dims=rope_dims,
                                                     rope_key=rope_key, round_to=1))
  assert cfg.d_qk == 0
  t = tokens()
  teacher, _ = transformer.from_params(MQA, params)(t)
  ours, _ = transformer.from_params(cfg, student)(t)
  # Exact in exact arithmetic (the conversion itself runs in float64 and rounds each weight once
  # to float32): what remains is the two float32 forward passes, the student's through its
  # latents (r_kv + r_q more per layer).
  within(jnp.abs(teacher - ours).max(), f32_bound(max_abs(teacher), forward_ops(MQA, 64, 32 + 32)))


def bound(cfg, logits, seq_len):
  """Absorbed and explicit MLA are the same products associated differently: float32 rounding."""
  return f32_bound(max_abs(logits), forward_ops(cfg.llama, seq_len, max(cfg.r_kv) + (max(
      r for r in cfg.r_q if r) if any(cfg.r_q) else 0)))


def student(per_layer: bool, latent_norm: bool, r_q):
  params = transformer.init_params(GQA, 1)
  a = params['layers'][1]['attn']  # a nearly low-rank layer 1, so that energy ranks differ
  for name in ('k', 'v'):
    a[name] = a[name] * np.concatenate([np.ones(3), 0.05 * np.ones(29)])[:, None, None]
  opts = InitOptions(r_kv=6, r_q=r_q, d_r=4, rope_dims='norm', latent_norm=latent_norm,
                     kv_energy=0.6 if per_layer else None, keep_ends_fixed=False, round_to=1)
  cfg, p, _ = upcycle(GQA, params, opts)
  if per_layer:
    assert len(set(cfg.r_kv)) > 1, cfg.r_kv
  if latent_norm:  # non-trivial norm scales
    for l in range(GQA.n_layers):
      p['layers'][l]['attn']['kv_norm']['scale'] = np.linspace(0.5, 1.5, cfg.r_kv[l], dtype=np.float32)
  return cfg, p


@pytest.mark.parametrize('per_layer,latent_norm,r_q', [(False, False, 12), (True, False, None),
                                                       (False, True, 12), (True, True, 12)])
def test_absorbed_decode_equals_explicit_path_at_every_position(per_layer, latent_norm, r_q):
  cfg, p = student(per_layer, latent_norm, r_q)
  t = tokens(t=80)
  full, _ = transformer.from_params(cfg, p, mla_mode='expand')(t)
  model = transformer.from_params(cfg, p)  # auto: absorbed when decoding one token at a time
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tok, pos, cache):
    return nnx.merge(graphdef, state)(tok, pos, None, cache)

  cache = kvcache.init_cache(cfg, 2, 96)
  logits = []
  for i in range(t.shape[1]):
    out, cache = step(state, t[:, i:i + 1], jnp.full((2, 1), i, jnp.int32), cache)
    logits.append(out)
  within(jnp.abs(jnp.concatenate(logits, 1) - full).max(), bound(cfg, full, 80))
  # A whole-prompt pass in absorbed mode agrees too.
  absorbed, _ = transformer.from_params(cfg, p, mla_mode='absorb')(t)
  within(jnp.abs(absorbed - full).max(), bound(cfg, full, 80))


def test_naive_decode_from_the_latent_cache_agrees():
  cfg, p = student(True, False, 12)
  t = tokens(t=24)
  full, _ = transformer.from_params(cfg, p)(t)
  cache = kvcache.init_cache(cfg, 2, 32)
  naive, _ = transformer.from_params(cfg, p, mla_mode='expand')(t, cache=cache)
  within(jnp.abs(naive - full).max(), bound(cfg, full, 24))


def test_greedy_generation_through_the_compressed_cache_equals_full_forward_argmax():
  cfg, p = student(True, True, 12)
  model = transformer.from_params(cfg, p)
  prompts = [[5, 9, 13, 2, 7], [11, 3]]
  out = generate.generate(model, prompts, 20)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0])
  for prompt, new in zip(prompts, out['tokens']):
    seq = list(prompt)
    for _ in range(20):  # full forwards over a right-padded buffer (causal: padding is unseen)
      logits = forward(state, jnp.asarray([seq + [0] * (32 - len(seq))]))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert new == seq[len(prompt):]


def test_cache_holds_only_latent_and_shared_rope_key():
  cfg, p = student(True, False, 12)
  out = generate.generate(transformer.from_params(cfg, p), [[1, 2, 3]], 5)
  cache = out['cache']
  slots = generate.MIN_BUCKET + 5  # the prompt's bucket, then the new tokens
  assert len(cache.layers) == cfg.n_layers
  for l, layer in enumerate(cache.layers):  # one fused [c_kv | k_r] row per token
    assert set(layer) == {'latent'} and layer['latent'].shape == (1, slots, cfg.r_kv[l] + cfg.d_r)
  per_token = [cfg.r_kv[l] + cfg.d_r for l in range(cfg.n_layers)]
  assert kvcache.cache_values_per_token(cache) == per_token == kvcache.values_per_token(cfg)
  assert kvcache.cache_bytes(cache) == 4 * slots * sum(per_token)      # float32
  bf16 = kvcache.init_cache(cfg, 3, 10, jnp.bfloat16)
  assert kvcache.cache_bytes(bf16) == 2 * 3 * 10 * sum(per_token)
  assert cfg.kv_values_per_token() == sum(per_token)
  # Ratios of integers: one float64 rounding on each side.
  assert cfg.kv_fraction() == pytest.approx(sum(per_token) / (3 * 2 * 2 * 8), rel=2 * EPS64)


def test_llama_3_2_1b_official_setting_keeps_9_4_percent():
  llama = LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                      head_dim=64, hidden_dim=8192)
  cfg = MLAConfig(llama=llama, r_kv=(64,) * 16, r_q=(1424,) * 16, d_r=32, d_qk=32, d_v=64,
                  rope_pairs=(None,) * 16)
  assert cfg.kv_fraction() == 96 / 1024  # a power-of-two denominator: exact
  # A ratio of integers: one float64 rounding on each side.
  assert kvcache.kv_report(cfg, teacher=llama)['compression'] == pytest.approx(1024 / 96, rel=2 * EPS64)


def test_mla_config_round_trips_through_json():
  cfg, _ = student(True, True, 12)
  assert MLAConfig.from_dict(cfg.to_dict()) == cfg
  assert LlamaConfig.from_dict(GQA.to_dict()) == GQA
  hash(cfg)  # static under jit


def test_all_rope_student_has_no_nope_weights_and_decodes_exactly(tmp_path):
  params = transformer.init_params(GQA, 1)
  cfg, p, _ = upcycle(GQA, params, InitOptions(r_kv=4, r_q=12, d_r=8, rope_dims='high_freq',
                                               rope_key='fit', round_to=1))
  assert cfg.d_qk == 0 and 'uk' not in p['layers'][0]['attn'] and 'uq' not in p['layers'][0]['attn']
  t = tokens(t=24)
  full, _ = transformer.from_params(cfg, p, mla_mode='expand')(t)
  cache = kvcache.init_cache(cfg, 2, 32)
  absorbed, _ = transformer.from_params(cfg, p, mla_mode='absorb')(t, cache=cache)
  within(jnp.abs(absorbed - full).max(), bound(cfg, full, 24))
  from xecomla import ckpt  # orbax refuses zero-size arrays: there must be none
  cks = ckpt.StageCheckpoints(str(tmp_path / 'ck'), async_save=False)
  cks.save(0, params=p, meta={'model': cfg.to_dict()})
  cks.close()
