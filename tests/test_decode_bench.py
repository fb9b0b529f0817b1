"""The decode benchmark at tiny shapes: naive (expand) and absorbed decoding agree on a pre-filled
cache, the analytic FLOPs agree with XLA's cost analysis, and the rows are consistent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import decode, roofline
from benchmarks.decode_cache import filled_cache
from benchmarks.flops import decode_step_flops, matmul_peak
from tests.conftest import f32_bound, forward_ops, max_abs, within
from xecomla import generate
from xecomla.models import kvcache, transformer
from xecomla.models.config import LlamaConfig, MLAConfig

TEACHER = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      hidden_dim=128, max_seq_len=256)
STUDENT = MLAConfig(llama=TEACHER, r_kv=(12, 12), r_q=(24, 24), d_r=4, d_qk=12, d_v=16,
                    rope_pairs=(None, None))
CONTEXT, STEPS, BATCH = 40, 6, 3


def random_params(config, seed):
  """Normal weights of std 1/sqrt(first axis), norm scales 1 (numpy: no per-shape compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: (np.ones(a.shape, np.float32) if 'scale' in jax.tree_util.keystr(path) else
                       (rng.standard_normal(a.shape) / np.sqrt(a.shape[0])).astype(np.float32)),
      transformer.abstract_params(config))


@pytest.fixture(scope='module')
def params():
  return {'teacher': random_params(TEACHER, 0), 'student': random_params(STUDENT, 1)}


def copy(cache):
  return jax.tree.map(jnp.copy, cache)


def test_naive_and_absorbed_decode_give_the_same_greedy_tokens(params):
  p = params['student']
  cache0 = filled_cache(STUDENT, p, BATCH, CONTEXT, CONTEXT + STEPS, jnp.float32)
  models = {m: nnx.split(transformer.from_params(STUDENT, p, mla_mode=m))
            for m in ('expand', 'absorb')}
  step = jax.jit(lambda g, s, tok, pos, cache: nnx.merge(g, s)(tok, pos, jnp.ones_like(tok), cache),
                 static_argnums=0)
  logits0 = jax.random.normal(jax.random.key(3), (BATCH, TEACHER.vocab_size), jnp.float32)
  # Teacher-forced: both modes fed the same tokens step by step; their logits must agree to the
  # rounding of two float32 evaluations (the absorbed path reduces over the latent r_kv, twice, and
  # the query latent r_q beyond a Llama's reductions), and each step's top-2 gap must exceed twice
  # that bound, so that no evaluation within it can pick another argmax (no tie is possible).
  caches = {m: copy(cache0) for m in models}
  token, reference = jnp.argmax(logits0, -1), []
  for i in range(STEPS):
    reference.append(np.asarray(token))
    pos = jnp.full((BATCH, 1), CONTEXT + i, jnp.int32)
    out = {}
    for m, (g, s) in models.items():
      logits, caches[m] = step(g, s, token[:, None], pos, caches[m])
      out[m] = np.asarray(logits[:, -1], np.float64)
    bound = f32_bound(max_abs(out['expand']),
                      forward_ops(TEACHER, CONTEXT + STEPS, 2 * STUDENT.r_kv[0] + STUDENT.r_q[0]))
    within(np.abs(out['expand'] - out['absorb']).max(), bound)
    top2 = np.sort(out['expand'], axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 2 * bound
    token = jnp.argmax(out['expand'], -1)
  reference = np.stack(reference, axis=1)
  for m, (g, s) in models.items():  # the project's jitted decode loop, on fresh copies of the cache
    tokens, _ = generate.decode(g, STEPS, generate.Sampling(), s, logits0,
                                jnp.full((BATCH,), CONTEXT, jnp.int32), copy(cache0),
                                jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(tokens), reference)


# XLA counts every op, the analytic count only the matmuls: the difference is the elementwise work
# (norms, RoPE, mask, softmax, SwiGLU's product, residuals, casts), bounded by ELEMENTWISE flops per
# attention score (B x n_h x S per layer), per mask entry (B x S) and per element of each activation
# vector ([B, D], [B, F], [B, n_h x d_h], [B, V]) of a step. Measured here: ~8 per score.
ELEMENTWISE = 16


@pytest.mark.parametrize('model', ['teacher', 'naive', 'absorbed'])
@pytest.mark.parametrize('batch,length', [(1, 32), (4, 128)])
def test_analytic_flops_match_xla_cost_analysis(params, model, batch, length):
  config = TEACHER if model == 'teacher' else STUDENT
  kwargs = {'mla_mode': decode.MODES[model]} if model in decode.MODES else {}
  p = params['teacher' if model == 'teacher' else 'student']
  g, s = nnx.split(transformer.from_params(config, p, **kwargs))
  xla = roofline.xla_step(g, s, kvcache.init_cache(config, batch, length))['flops']
  analytic = decode_step_flops(config, batch, length, absorbed=model != 'naive')
  c = TEACHER
  vectors = c.n_layers * (c.dim + c.hidden_dim + c.n_heads * c.head_dim) + c.vocab_size
  elementwise = ELEMENTWISE * batch * (c.n_layers * (c.n_heads + 1) * length + vectors)
  assert analytic <= xla <= analytic + elementwise, (analytic, xla, elementwise)


ROOF = {'bandwidth_gbps': 10.0, 'matmul_peak_gflops': 50.0}  # inputs of the arithmetic only


def check_row(r, t, config, p, dtype, cache_dtype='auto'):
  cache = kvcache.init_cache(config, BATCH, CONTEXT + STEPS, cache_dtype, dtype)
  assert r['cache_bytes'] == kvcache.cache_bytes(cache)
  assert r['cache_read_bytes'] == kvcache.cache_bytes(cache) * CONTEXT // (CONTEXT + STEPS)
  n_params = sum(x.size for x in jax.tree.leaves(p))
  emb = p['embed']['embedding']
  itemsize = jnp.dtype(dtype).itemsize
  assert r['weight_bytes'] == itemsize * (n_params - emb.size + BATCH * emb.shape[1])
  assert r['bytes_per_step'] == r['weight_bytes'] + r['cache_read_bytes']
  assert r['memory_ms'] == pytest.approx(r['bytes_per_step'] / 1e7)
  assert r['compute_ms'] == pytest.approx(r['flops_per_step'] / 5e7)
  assert r['roofline_ms'] == max(r['memory_ms'], r['compute_ms'])
  assert r['regime'] == ('memory' if r['memory_ms'] >= r['compute_ms'] else 'compute')
  assert r['roofline_fraction'] == pytest.approx(r['roofline_ms'] / r['ms_per_token'])
  assert r['tokens_per_s'] == pytest.approx(BATCH * 1e3 / r['ms_per_token'])
  assert t.shape == (BATCH, STEPS) and r['dtype'] == jnp.dtype(dtype).name
  assert sum(r['xla']['dots'].values()) > 0  # the compiled step's HLO was read


def test_benchmark_rows_are_consistent(params):
  rows, tokens = {}, {}
  for model in ('teacher', 'naive', 'absorbed'):
    config = TEACHER if model == 'teacher' else STUDENT
    p = params['teacher' if model == 'teacher' else 'student']
    r, t = decode.measure(model, config, p, dtype=jnp.float32, batch=BATCH, context=CONTEXT,
                          steps=STEPS, repeats=1, roof=ROOF, profile=model == 'absorbed')
    check_row(r, t, config, p, jnp.float32)
    assert r['xla']['bf16_to_f32_elements'] == 0  # nothing stored in bfloat16, nothing to widen
    rows[model], tokens[model] = r, t
  # the traced call's ops, named by the jax ops they came from
  assert any(op['what'].endswith('/dot_general') and op['ms_per_step'] > 0
             for op in rows['absorbed']['profile'])
  # The same pre-filled cache and first logits for both MLA modes (the margins checked above).
  np.testing.assert_array_equal(tokens['naive'], tokens['absorbed'])
  assert rows['naive']['cache_bytes'] < rows['teacher']['cache_bytes']


@pytest.mark.parametrize('model', ['teacher', 'naive', 'absorbed'])
def test_bfloat16_decode_runs_with_half_the_cache(params, model):
  config = TEACHER if model == 'teacher' else STUDENT
  p = params['teacher' if model == 'teacher' else 'student']
  r, t = decode.measure(model, config, p, dtype=jnp.bfloat16, batch=BATCH, context=CONTEXT,
                        steps=STEPS, repeats=1, roof=ROOF)
  check_row(r, t, config, p, jnp.bfloat16)
  f32 = kvcache.cache_bytes(kvcache.init_cache(config, BATCH, CONTEXT + STEPS, jnp.float32))
  assert r['cache_bytes'] * 2 == f32


def test_budget_batch_of_the_1b_model():
  """4 GiB of bfloat16 cache of the 16-layer 1B model: 16 x 1024 values x 2 bytes per token for
  the teacher, 16 x (64 + 32) x 2 for the 9.4% student."""
  teacher, student = decode.llama1b(2, 512)
  for config, per_token in ((teacher, 32768), (student, 3072)):
    for context in (8192, 32768):
      fit = decode.budget_batch(config, context, 4 * 2 ** 30, jnp.bfloat16, 'auto')
      assert fit == {'bytes_per_token_16_layers': per_token,
                     'sequences': 4 * 2 ** 30 // (per_token * context)}
  assert decode.budget_batch(student, 32768, 4 * 2 ** 30, jnp.bfloat16, 'auto')['sequences'] == 42


def test_machine_measurements_run():
  bw = roofline.memory_bandwidth(2 ** 22, repeats=2)
  assert bw['bandwidth_gbps'] == max(bw['copy_read_gbps'], bw['sum_read_gbps']) > 0
  assert bw['copy_traffic_gbps'] == pytest.approx(2 * bw['copy_read_gbps'])
  assert matmul_peak(n=64, repeats=2) > 0


def test_transformers_rows_hold_the_same_cache(params, tmp_path):
  from benchmarks import decode_hf
  models = {'teacher': (TEACHER, params['teacher']), 'student': (STUDENT, params['student']),
            'hf_dir': None}
  roof = {'bandwidth_gbps': 10.0, 'matmul_peak_gflops': 50.0}
  rows = decode_hf.rows(models, str(tmp_path), dtype=jnp.float32, batch=2, context=16, steps=2,
                        repeats=1, roof=roof)
  assert [r['model'] for r in rows] == ['hf_teacher', 'hf_absorbed']
  per_token = {'hf_teacher': 2 * TEACHER.n_kv_heads * TEACHER.head_dim,
               'hf_absorbed': STUDENT.r_kv[0] + STUDENT.d_r}
  for r in rows:  # float32, all layers, 2 rows of 16 tokens: what a JAX cache of 16 slots holds
    expected = 4 * TEACHER.n_layers * per_token[r['model']] * 2 * 16
    assert r['cache_bytes'] == r['cache_read_bytes'] == expected
    assert r['roofline_ms'] == max(r['memory_ms'], r['compute_ms']) > 0
