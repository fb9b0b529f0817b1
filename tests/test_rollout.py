"""Documents sampled inside jit (xecomla/rollout.py), the source of teacher stories and on-policy
rows: a row depends on its key and id only, greedy rows equal the generator's output, and rows
end at their first stop token with padding after it."""

import jax
import numpy as np
import pytest

from xecomla import generate, rollout, sharding
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.generate import Sampling
from xecomla.models import kvcache, transformer
from xecomla.models.config import LlamaConfig

GQA = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  hidden_dim=40, max_seq_len=128)


@pytest.fixture(scope='module', params=['teacher', 'student'])
def model(request):
  params = transformer.init_params(GQA, 1)
  if request.param == 'teacher':
    return GQA, params
  cfg, p, _ = upcycle(GQA, params, InitOptions(r_kv=6, r_q=12, d_r=4, rope_dims='paper',
                                               rope_key='mean', keep_ends_fixed=False, round_to=1))
  return cfg, p


def docs(model, first_row, rows, sampling=Sampling(temperature=1.0), seed=0, length=40):
  cfg, p = model
  return rollout.documents(transformer.graphdef(cfg), p, seed=seed, first_row=first_row,
                           rows=rows, length=length, sampling=sampling, bos_id=1, eos_ids=(2,))


def test_a_row_does_not_depend_on_its_batch(model):
  whole = docs(model, 0, 6)
  part = docs(model, 3, 3)
  for a, b in zip(whole[3:], part):
    np.testing.assert_array_equal(a, b)
  again = docs(model, 0, 6)
  assert all(np.array_equal(a, b) for a, b in zip(whole, again))
  other = docs(model, 0, 6, seed=1)
  assert not all(np.array_equal(a, b) for a, b in zip(whole, other))


def test_greedy_rows_equal_the_generator(model):
  cfg, p = model
  rows = docs(model, 0, 2, Sampling(), length=30)
  want = generate.generate(transformer.from_params(cfg, p), [[1]], 29, eos_ids=(1, 2))['tokens'][0]
  if want[-1] == 1:  # a stop BOS is not part of the document
    want = want[:-1]
  for row in rows:  # greedy: every row the same
    np.testing.assert_array_equal(row, [1] + want)


def test_rows_end_at_their_first_stop_token(model):
  cfg, p = model
  out = jax.jit(rollout.sample_rows, static_argnums=(0, 2, 3, 4, 5))(
      transformer.from_params(cfg, p), rollout.row_keys(jax.random.key(0), np.arange(64)),
      60, Sampling(temperature=2.0), 1, (2,))
  tokens, seg, pos = (np.asarray(out[k]) for k in ('tokens', 'segment_ids', 'positions'))
  lengths = seg.sum(1)
  stopped = 0
  for row, s, p_, n in zip(tokens, seg, pos, lengths):
    assert s[:n].all() and not s[n:].any()          # real tokens first, then padding only
    np.testing.assert_array_equal(p_[:n], np.arange(n))
    assert row[0] == 1 and 1 not in row[1:n]         # BOS only at the start
    assert 2 not in row[:n - 1]                      # an EOS ends the row
    assert not row[n:].any()
    stopped += n < 60
  # vocab 61 at temperature 2: P(no stop token in 59 draws) is small; the sample is fixed by seed
  assert stopped > 0


def test_a_mesh_decodes_the_rows_one_device_does(model):
  """Rows split over data = 8 (3 rows asked: padded to 8 and dropped) equal one device's."""
  cfg, p = model
  mesh = sharding.make_mesh()
  gen = rollout.Generator(transformer.graphdef(cfg), mesh, sharding.replicated(mesh), batch=3,
                          length=40, sampling=Sampling(temperature=1.0), bos_id=1, eos_ids=(2,))
  assert gen.batch == 8
  wide = gen(sharding.put(p, sharding.replicated(mesh)), seed=0, first_row=2, rows=3)
  for a, b in zip(docs(model, 2, 3), wide, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('eos', [(2,), tuple(range(2, 40))])
def test_a_growing_cache_samples_the_rows_a_whole_one_does(model, eos):
  """Windows of 8 slots (the cache grows by 8 as it fills; with eos = 38 of the 61 tokens every
  row stops within a few draws and the later windows are skipped) against one window of 60."""
  cfg, p = model
  run = jax.jit(rollout.sample_rows, static_argnums=(0, 2, 3, 4, 5, 6))
  keys = rollout.row_keys(jax.random.key(3), np.arange(16))
  whole, grown = (run(transformer.from_params(cfg, p), keys, 60, Sampling(temperature=1.0), 1,
                      eos, w) for w in (60, 8))
  same = [np.array_equal(np.asarray(whole[k])[r], np.asarray(grown[k])[r])
          for r in range(16) for k in ('tokens', 'segment_ids', 'positions')]
  # the attention sums over 8k slots instead of 60 (the extra slots are masked: exact zeros, but
  # the reduction groups its terms differently): a row changes only at a draw within float32
  # rounding of a tie, each of 61 boundaries moving ~1e-7, <= 59 draws ~4e-4 a row; two changed
  # rows of 16 would have probability ~2e-5
  assert sum(not x for x in same) <= 3, same  # three arrays per changed row
  if len(eos) > 1:  # every row stopped in the first two windows: the rest took the skip branch,
    # whose padding must be what decoding would have written
    assert np.asarray(grown['segment_ids'])[:, 16:].sum() == 0


@pytest.mark.parametrize('cache_dtype', ['auto', 'int8'])
def test_grow_keeps_every_slot_and_appends_empty_ones(model, cache_dtype):
  cfg, _ = model
  if cache_dtype == 'int8' and cfg is GQA:
    pytest.skip('quantised caches are MLA only')
  small = kvcache.init_cache(cfg, 2, 5, cache_dtype)
  small = jax.tree.map(lambda x: x + 1 if x.ndim else x, small)  # every slot written
  big = kvcache.grow(small, 9)
  assert big.length == 9 and int(big.index) == int(small.index)
  for name, a in big.layers[0].items():
    axis = 2 if name in ('k', 'v') else 1
    np.testing.assert_array_equal(np.take(np.asarray(a), range(5), axis), small.layers[0][name])
    assert not np.take(np.asarray(a), range(5, 9), axis).any()
  assert not np.asarray(big.segment_ids)[:, 5:].any()  # the new slots are empty
