"""Every attention implementation (`model.attention`) computes the reference path's attention: a
GQA Llama and an MLA student's explicit path on packed rows (several documents, padding), forward
and gradients; splash in Pallas interpret mode on CPU; causal blocks (`blocked`, CPU's `auto`) in
their blocks; cudnn refused off a GPU; `auto` per platform."""

import functools
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import f32_bound, forward_ops, max_abs, within
from xecomla import sharding
from xecomla.cli import UsageError
from xecomla.models import attention, kernels, transformer
from xecomla.models.config import LlamaConfig, MLAConfig

LLAMA = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    hidden_dim=40, max_seq_len=128)
# d_v 6 != d_qk + d_r 8: the fused kernels pad the narrower side; r_q None in layer 1.
MLA = MLAConfig(llama=LLAMA, r_kv=(6, 5), r_q=(12, None), d_r=4, d_qk=4, d_v=6,
                rope_pairs=((0, 3), None))
T = 100  # not a multiple of splash's 128-blocks: it pads


def packed_rows():
  """Row 0: documents of 37, 41, 12 tokens, then 10 of padding (segment 0); row 1: 6 of left
  padding, then documents of 60 and 34. Positions restart per document."""
  seg = np.stack([np.repeat([1, 2, 3, 0], [37, 41, 12, 10]), np.repeat([0, 1, 2], [6, 60, 34])])
  pos = np.zeros_like(seg)
  for b, t in np.ndindex(seg.shape):
    if t and seg[b, t] and seg[b, t] == seg[b, t - 1]:
      pos[b, t] = pos[b, t - 1] + 1
  return jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32)


@functools.lru_cache(maxsize=None)
def run(config, attention_name):
  """Logits and the gradient of a random linear function of the real tokens' logits (padding
  rows' outputs are unspecified: nothing real attends to them), for random parameters."""
  params = transformer.init_params(config, 2)
  pos, seg = packed_rows()
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, LLAMA.vocab_size, seg.shape), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(*seg.shape, LLAMA.vocab_size)), jnp.float32)
  weights = weights * (seg > 0)[..., None]
  graph, state = nnx.split(transformer.from_params(config, params, attention=attention_name))

  def objective(state):
    logits, _ = nnx.merge(graph, state)(tokens, pos, seg)
    return jnp.sum(logits * weights), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(state)
  return np.asarray(logits)[np.asarray(seg) > 0], grads.to_pure_dict()


@pytest.mark.parametrize('config,name', [(LLAMA, 'xla'), (MLA, 'xla'), (LLAMA, 'splash'),
                                         (MLA, 'splash'), (MLA, 'auto'), (LLAMA, 'blocked'),
                                         (MLA, 'blocked')],
                         ids=['gqa_llama-xla', 'mla_explicit-xla', 'gqa_llama-splash',
                              'mla_explicit-splash', 'mla_explicit-auto', 'gqa_llama-blocked',
                              'mla_explicit-blocked'])
def test_implementation_equals_the_reference_path(config, name):
  ref_logits, ref_grads = run(config, 'reference')
  logits, grads = run(config, name)
  # The same sums in another order (another kernel's blocking, the shared RoPE key scored apart
  # or concatenated): float32 rounding over the forward's reduction lengths, twice for the
  # backward, which runs them transposed.
  extra = 0 if config is LLAMA else max(config.r_kv) + 12
  n_ops = forward_ops(LLAMA, T, extra)
  within(np.abs(logits - ref_logits).max(), f32_bound(max_abs(ref_logits), n_ops))
  scale = max(max_abs(g) for g in jax.tree.leaves(ref_grads))
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    within(np.abs(np.asarray(g) - np.asarray(r)).max(), f32_bound(scale, 2 * n_ops))


def qkv(b=2, t=T, n=4, k=2, h=8, hv=6, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((b, t, n, h), (b, t, k, h), (b, t, k, hv)))


def test_splash_per_device_under_a_mesh_equals_the_reference():
  """Under jax.set_mesh the kernel runs in a shard_map: rows over data x fsdp, heads over tensor."""
  pos, seg = packed_rows()
  pos, seg = jnp.tile(pos, (2, 1)), jnp.tile(seg, (2, 1))
  mask = attention.attention_mask(pos, seg, pos, seg)
  q, k, v = qkv(b=4)
  real = (seg > 0)[:, :, None, None]
  run = lambda name: lambda q, k, v: jnp.where(
      real, attention.dot_product(q, k, v, mask, 0.3, name), 0.)
  loss = lambda name: lambda q, k, v: jnp.sum(run(name)(q, k, v) * jnp.arange(6.))
  ref, ref_grads = run('reference')(q, k, v), jax.grad(loss('reference'), (0, 1, 2))(q, k, v)
  with jax.set_mesh(sharding.make_mesh(data=2, fsdp=2, tensor=2)):
    assert 'shard_map' in str(jax.make_jaxpr(run('splash'))(q, k, v))
    out = jax.jit(run('splash'))(q, k, v)
    grads = jax.jit(jax.grad(loss('splash'), (0, 1, 2)))(q, k, v)
  # One attention: rounding over the head dim, the softmax sum and P V (T each); outputs are
  # averages of v, twice the reductions for the backward.
  n_ops = 8 + 2 * T
  within(jnp.abs(out - ref).max(), f32_bound(max_abs(v), n_ops))
  scale = max(max_abs(g) for g in ref_grads)
  for g, r in zip(grads, ref_grads):
    within(jnp.abs(g - r).max(), f32_bound(scale, 2 * n_ops))


def test_shared_rope_key_scored_apart_equals_it_concatenated_per_head():
  rng = np.random.default_rng(1)
  b, n, c, r, hv = 2, 4, 4, 2, 6
  q_c, k_c, q_r, v = (jnp.asarray(rng.normal(size=(b, T, n, d)), jnp.float32)
                      for d in (c, c, r, hv))
  k_r = jnp.asarray(rng.normal(size=(b, T, r)), jnp.float32)
  mask = attention.attention_mask(*packed_rows(), *packed_rows())
  k = jnp.concatenate([k_c, jnp.broadcast_to(k_r[:, :, None], (b, T, n, r))], -1)
  ref = attention.attend(jnp.concatenate([q_c, q_r], -1), k, v, mask, 0.3)
  out = attention.attend_shared_rope(q_c, k_c, q_r, k_r, v, mask, 0.3)
  within(jnp.abs(out - ref).max(), f32_bound(max_abs(v), c + r + 2 * T))
  only_rope = attention.attend_shared_rope(None, None, q_r, k_r, v, mask, 0.3)  # d_qk = 0
  ref = attention.attend(q_r, jnp.broadcast_to(k_r[:, :, None], (b, T, n, r)), v, mask, 0.3)
  within(jnp.abs(only_rope - ref).max(), f32_bound(max_abs(v), r + 2 * T))


def test_causal_blocks_score_each_block_against_the_keys_up_to_its_end():
  """T 100 in 6 blocks (MIN_BLOCK_ROWS 16): query rows [0, 16), [16, 33), ... against keys
  [0, 16), [0, 33), ...; the outputs in row order; cross-attention refused."""
  seen = []

  def fn(qs, ks, m):
    seen.append((qs[0].shape[1], ks[0].shape[1], m.shape[1:], ks[1] is None))
    return qs[0] * ks[0].shape[1]

  q = jnp.ones((2, T, 3))
  out = attention.causal_blocks(fn, (q,), (q, None), jnp.ones((2, T, T), bool))
  ends = [16, 33, 50, 66, 83, 100]
  starts = [0] + ends[:-1]
  assert seen == [(e - s, e, (e - s, e), True) for s, e in zip(starts, ends)]
  np.testing.assert_array_equal(out[0, :, 0], np.repeat(ends, np.diff([0] + ends)))
  with pytest.raises(ValueError, match='self-attention: 1 queries against 100 keys'):
    attention.causal_blocks(fn, (q[:, :1],), (q,), jnp.ones((2, 1, T), bool))
  with pytest.raises(UsageError, match=r"'blocked' is self-attention.*auto, reference or xla"):
    kernels.resolve('blocked', jnp.float32, 8, 1, T)


def test_segment_ids_from_the_mask_rebuild_it_causally_by_row():
  """Splash's assumption: for packed rows, same recovered id and key row <= query row is our
  position mask for every real query (padding queries attend to nothing in ours)."""
  pos, seg = packed_rows()
  mask = np.asarray(attention.attention_mask(pos, seg, pos, seg))
  ids = np.asarray(kernels.segment_ids(jnp.asarray(mask)))
  assert (ids[np.asarray(seg) == 0] == 0).all() and len(np.unique(ids[0])) == 4
  rows = np.arange(T)
  rebuilt = (ids[:, :, None] == ids[:, None, :]) & (rows[None, :] <= rows[:, None])[None]
  real = np.asarray(seg) > 0
  np.testing.assert_array_equal(rebuilt[real], mask[real])


def test_cudnn_is_refused_off_a_gpu_with_the_fix():
  pos, seg = packed_rows()
  model = transformer.from_params(LLAMA, transformer.init_params(LLAMA, 0), attention='cudnn')
  with pytest.raises(UsageError, match=r"model.attention='cudnn' needs an NVIDIA GPU.*auto or xla"):
    model(jnp.zeros(seg.shape, jnp.int32), pos, seg)
  with pytest.raises(UsageError, match=r'needs bfloat16/float16 compute.*dtype=bfloat16'):
    kernels.resolve('cudnn', jnp.float32, 64, 128, 128, platform='gpu')
  with pytest.raises(UsageError, match=r"'splash' is a TPU kernel"):
    kernels.resolve('splash', jnp.bfloat16, 64, 128, 128, platform='gpu')
  with pytest.raises(UsageError, match=r'jax.set_mesh'):  # 8 devices, no mesh to shard_map over
    kernels.resolve('splash', jnp.bfloat16, 64, 128, 128, platform='tpu')


def test_auto_resolves_per_platform():
  assert kernels.target_platform() == 'cpu'
  assert kernels.resolve('auto', jnp.float32, 8, T, T) == kernels.CPU_AUTO == 'blocked'
  assert kernels.resolve('auto', jnp.float32, 8, 1, T) == kernels.CPU_CROSS == 'xla'
  assert kernels.resolve('auto', jnp.bfloat16, 64, 2048, 2048, platform='gpu') == 'cudnn'
  assert kernels.resolve('auto', jnp.float32, 64, 2048, 2048, platform='gpu') == 'xla'
  assert kernels.resolve('auto', jnp.bfloat16, 12, 2048, 2048, platform='gpu') == 'xla'
  assert kernels.resolve('auto', jnp.bfloat16, 64, 2048, 2048, platform='tpu') == 'xla'  # no mesh
  with jax.set_mesh(sharding.make_mesh()):
    assert kernels.resolve('auto', jnp.bfloat16, 64, 2048, 2048, platform='tpu') == 'splash'
  for name in ('reference', 'blocked', 'xla', 'splash'):
    assert kernels.resolve(name, jnp.float32, 8, T, T) == name


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='libtpu is not installed')
def test_splash_compiles_for_a_tpu_topology_per_device():
  """Ahead of time for a v5e:2x2 on this host: the real Mosaic kernel (forward, dq, dkv), the
  target platform taken from the mesh, and no all-gather (each device attends its own rows)."""
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2',
                                      chip_config_name='default', chips_per_host_bounds=(2, 2, 1),
                                      num_slices=1)
  mesh = sharding.make_mesh(data=1, fsdp=4, devices=topo.devices)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp'))
  sds = lambda s, d=jnp.bfloat16: jax.ShapeDtypeStruct(s, d, sharding=rows)
  pos, seg = sds((8, 256), jnp.int32), sds((8, 256), jnp.int32)

  def loss(q, k, v, pos, seg):
    mask = attention.attention_mask(pos, seg, pos, seg)
    return jnp.sum(attention.dot_product(q, k, v, mask, 0.125, 'auto').astype(jnp.float32))

  with jax.set_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).lower(
        sds((8, 256, 4, 128)), sds((8, 256, 2, 128)), sds((8, 256, 2, 128)), pos, seg)
  text = lowered.compile().as_text()
  assert text.count('tpu_custom_call') == 3
  assert not re.search('all-gather', text)
