"""Layer scan and remat policies change how the blocks are traced and what the backward keeps, never
what is computed: logits, per-layer hidden states and gradients equal the plain loop's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import f32_bound, forward_ops, max_abs, within
from xecomla.models import kvcache, transformer
from xecomla.models.config import LlamaConfig, MLAConfig

LLAMA = LlamaConfig(vocab_size=61, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                    hidden_dim=40, max_seq_len=128)
MLA = MLAConfig(llama=LLAMA, r_kv=(6,) * 3, r_q=(12,) * 3, d_r=4, d_qk=4, d_v=8,
                rope_pairs=((0, 3),) * 3)
DYNAMIC = MLAConfig(llama=LLAMA, r_kv=(6, 4, 6), r_q=(12, None, 12), d_r=4, d_qk=4, d_v=8,
                    rope_pairs=((0, 3), (1, 2), (0, 3)))
SEQ = 24


def random_params(config, seed):
  """Random float32 parameters (numpy: no per-shape jax compilations): weights N(0, 1/fan_in),
  norm scales in [0.5, 1.5] so that a norm applied to the wrong layer shows."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: (rng.uniform(0.5, 1.5, a.shape) if len(a.shape) == 1 else
                 rng.normal(size=a.shape) / np.sqrt(a.shape[0])).astype(np.float32),
      transformer.abstract_params(config))


def batch():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, LLAMA.vocab_size, (2, SEQ)), jnp.int32)
  # Two documents in the second row, so that the mask the scan closes over is not trivial.
  segments = jnp.asarray(np.stack([np.ones(SEQ), np.repeat([1, 2], SEQ // 2)]), jnp.int32)
  positions = jnp.asarray(np.stack([np.arange(SEQ), np.tile(np.arange(SEQ // 2), 2)]), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(2, SEQ, LLAMA.vocab_size)), jnp.float32)
  return tokens, positions, segments, weights


def run(config, params, **kwargs):
  """Logits, per-layer hidden states, and the gradient of a random linear function of both."""
  tokens, positions, segments, weights = batch()
  graph, state = nnx.split(transformer.from_params(config, params, **kwargs))

  def objective(state):
    logits, _, hidden = nnx.merge(graph, state)(tokens, positions, segments, return_hidden=True)
    return jnp.sum(logits * weights) + sum(jnp.sum(h) for h in hidden), (logits, hidden)

  (_, (logits, hidden)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(state)
  return logits, hidden, grads.to_pure_dict()


def extra_ops(config):
  return 0 if isinstance(config, LlamaConfig) else max(config.r_kv) + max(r or 0 for r in config.r_q)


def assert_same(config, a, b):
  """The same float32 sums traced as a loop or a scan, with or without recomputation: they may
  fuse and order differently, so they agree to float32 rounding over the forward's reduction
  lengths (twice for the backward, which runs the same reductions transposed)."""
  n_ops = forward_ops(config.llama if isinstance(config, MLAConfig) else config, SEQ,
                      extra_ops(config))
  within(jnp.abs(a[0] - b[0]).max(), f32_bound(max_abs(a[0]), n_ops))
  assert len(a[1]) == len(b[1]) == LLAMA.n_layers
  for x, y in zip(a[1], b[1]):
    within(jnp.abs(x - y).max(), f32_bound(max_abs(x), n_ops))
  grad_scale = max(max_abs(g) for g in jax.tree.leaves(a[2]))
  assert jax.tree.structure(a[2]) == jax.tree.structure(b[2])
  for x, y in zip(jax.tree.leaves(a[2]), jax.tree.leaves(b[2])):
    within(jnp.abs(x - y).max(), f32_bound(grad_scale, 2 * n_ops))


@functools.lru_cache(maxsize=None)
def reference(config):
  """The plain loop without remat, once per model."""
  params = random_params(config, 1)
  return params, run(config, params, scan_layers=False, remat='none')


@pytest.mark.parametrize('config', [LLAMA, MLA], ids=['llama', 'mla'])
@pytest.mark.parametrize('remat', ['none', 'full', 'dots_saveable'])
def test_scan_and_remat_equal_the_plain_loop(config, remat):
  params, reference_out = reference(config)
  assert_same(config, reference_out, run(config, params, scan_layers=True, remat=remat))
  if remat != 'none':
    assert_same(config, reference_out, run(config, params, scan_layers=False, remat=remat))


def traced_blocks(config, monkeypatch, **kwargs):
  """How many times Block.__call__ is traced for one forward pass."""
  calls = []
  original = transformer.Block.__call__

  def counting(self, *args, **kw):
    calls.append(1)
    return original(self, *args, **kw)

  monkeypatch.setattr(transformer.Block, '__call__', counting)
  model = transformer.from_params(config, random_params(config, 0), **kwargs)
  graph, state = nnx.split(model)
  jax.make_jaxpr(lambda s, t: nnx.merge(graph, s)(t)[0])(state, batch()[0])
  return len(calls)


def test_scan_traces_the_block_once_and_dynamic_ranks_fall_back_to_the_loop(monkeypatch):
  assert transformer.uniform_layers(LLAMA) and transformer.uniform_layers(MLA)
  assert not transformer.uniform_layers(DYNAMIC)
  assert traced_blocks(LLAMA, monkeypatch, scan_layers=True) == 1
  assert traced_blocks(MLA, monkeypatch, scan_layers=True, remat='full') == 1
  assert traced_blocks(LLAMA, monkeypatch, scan_layers=False) == LLAMA.n_layers
  assert traced_blocks(DYNAMIC, monkeypatch, scan_layers=True) == LLAMA.n_layers
  params = random_params(DYNAMIC, 2)
  assert_same(DYNAMIC, run(DYNAMIC, params, scan_layers=False),
              run(DYNAMIC, params, scan_layers=True, remat='full'))


def test_bfloat16_compute_scans_bfloat16_weights():
  """The stacked copy of float32 weights is made in the compute dtype (what each block casts them
  to anyway), so it costs half."""
  model = transformer.from_params(LLAMA, random_params(LLAMA, 0), dtype=jnp.bfloat16,
                                  scan_layers=True)
  graph, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graph, s)(t)[0])(state, batch()[0])
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
  assert len(scans) == 1
  n_consts, n_carry = scans[0].params['num_consts'], scans[0].params['num_carry']
  xs = scans[0].invars[n_consts + n_carry:]
  assert len(xs) == len(jax.tree.leaves(state.to_pure_dict()['layers'][0]))
  assert {str(v.aval.dtype) for v in xs} == {'bfloat16'}
  assert all(v.aval.shape[0] == LLAMA.n_layers for v in xs)


def test_decode_through_a_cache_with_scan_layers_equals_the_scanned_full_forward():
  params = random_params(MLA, 3)
  model = transformer.from_params(MLA, params, scan_layers=True)
  tokens = batch()[0]
  full, _ = model(tokens)
  cache = kvcache.init_cache(MLA, 2, 32)
  prefill, cache = model(tokens[:, :16], cache=cache)
  steps = [prefill]
  for t in range(16, SEQ):
    out, cache = model(tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), None, cache)
    steps.append(out)
  # Absorbed decode and the explicit path: the same products associated differently.
  within(jnp.abs(jnp.concatenate(steps, 1) - full).max(),
         f32_bound(max_abs(full), forward_ops(LLAMA, SEQ, extra_ops(MLA))))


def test_remat_policies_change_what_the_compiled_backward_keeps():
  """Temporaries of the compiled gradient (XLA's own figures): recomputing everything keeps less
  than keeping the weight products, which keeps less than keeping everything. The model is made so
  that a layer's [B, N, T, T] attention scores dominate its activations."""
  config = LlamaConfig(vocab_size=64, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                       hidden_dim=128, max_seq_len=256)
  tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
  temps = {}
  for remat in transformer.REMAT_POLICIES:
    graph = transformer.graphdef(config, scan_layers=True, remat=remat)
    loss = lambda p, t: jnp.mean(nnx.merge(graph, p)(t)[0] ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(transformer.abstract_params(config), tokens).compile()
    temps[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temps['full'] < temps['dots_saveable'] < temps['none'], temps


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match='remat'):
    transformer.Transformer(LLAMA, rngs=nnx.Rngs(0), remat='some')
