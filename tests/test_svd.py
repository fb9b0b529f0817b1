"""Low-rank maths, rank selection and the upcycling conversion."""

import numpy as np
import pytest

from tests.conftest import f32_bound, f64_bound, within
from xecomla.convert import rope_dims, svd
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig

CFG = LlamaConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                  hidden_dim=40, max_seq_len=64)


def rel_err(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(a)


@pytest.mark.parametrize('sigma', ['up', 'down', 'split'])
def test_reconstruction_error_falls_with_rank_and_vanishes_at_full_rank(sigma):
  m = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
  u, s, vt = svd.spectrum_svd(m)
  errs = []
  for r in range(1, 33):
    down, up = svd.factor(u, s, vt, r, sigma)
    assert down.shape == (32, r) and up.shape == (r, 64)
    errs.append(rel_err(m, down.astype(np.float64) @ up))
  assert all(a > b for a, b in zip(errs, errs[1:]))
  # The SVD is float64; the only error left is each factor's rounding to float32 (eps/2 per
  # entry), carried through the rank-32 product: relative to ||M||, at most ~32 * eps32.
  within(errs[-1], f32_bound(1.0, 32))
  # The error at rank r is the discarded energy (Eckart-Young); d(err^2) = 2 err d(err).
  within(abs(errs[9] ** 2 - (1 - svd.retained_energy(s)[9])), 2 * errs[9] * f32_bound(1.0, 32))


def test_activation_aware_factor_minimises_activation_error():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(500, 16)) @ np.diag(np.linspace(0.1, 3, 16))  # anisotropic activations
  m = rng.normal(size=(16, 24))
  whiten = svd.cholesky_whitener(x.T @ x / len(x), damp=1e-8)
  u, s, vt = svd.spectrum_svd(m, whiten)
  d_a, u_a = svd.factor(u, s, vt, 6, whiten=whiten)
  u0, s0, vt0 = svd.spectrum_svd(m)
  d_p, u_p = svd.factor(u0, s0, vt0, 6)
  err_act = np.linalg.norm(x @ m - x @ d_a @ u_a)
  assert err_act < np.linalg.norm(x @ m - x @ d_p @ u_p)
  # ... and equals the best rank-6 approximation of X M itself. Everything is float64 but the
  # factors' final rounding to float32 (eps/2 per entry), which moves X D U by at most
  # ~eps32 * ||X|| ||D|| ||U|| * (16 + 6) (the products' lengths).
  ux, sx, _ = np.linalg.svd(x @ m, full_matrices=False)
  within(abs(err_act - np.sqrt(np.sum(sx[6:] ** 2))),
         f32_bound(np.linalg.norm(x, 2) * np.linalg.norm(d_a, 2) * np.linalg.norm(u_a, 2), 16 + 6))
  # At full rank D U = M up to the same rounding, amplified by L^-T: relative to ||M||, the scale
  # is ||D|| ||U|| / ||M||.
  d_f, u_f = svd.factor(u, s, vt, 16, whiten=whiten)
  d_f = d_f.astype(np.float64)
  within(rel_err(m, d_f @ u_f),
         f32_bound(np.linalg.norm(d_f) * np.linalg.norm(u_f) / np.linalg.norm(m), 16))


def test_energy_rank_is_exact_on_constructed_spectra():
  s = np.sqrt(np.array([50.0, 30.0, 10.0, 5.0, 3.0, 2.0]))  # energies /100
  assert svd.rank_for_energy(s, 0.50) == 1
  assert svd.rank_for_energy(s, 0.80) == 2
  assert svd.rank_for_energy(s, 0.8001) == 3
  assert svd.rank_for_energy(s, 0.95) == 4
  assert svd.rank_for_energy(s, 0.98) == 5
  assert svd.rank_for_energy(s, 1.0) == 6
  assert svd.rank_for_energy(s, 0.95, multiple=4) == 4
  assert svd.rank_for_energy(s, 0.96, multiple=4) == 6  # rounded up, capped at full rank


def test_budget_allocation_maximises_retained_energy():
  flat = np.ones(8)                    # energy grows linearly
  steep = np.array([10.0, 1, 1, 1, 1, 1, 1, 1])
  ranks = svd.allocate_budget([flat, steep], budget=8)
  assert sum(ranks) == 8 and ranks[0] > ranks[1]
  # Exhaustive check of optimality on random spectra.
  rng = np.random.default_rng(0)
  spectra = [np.sort(rng.random(6))[::-1] for _ in range(3)]
  best = max(((a, b, c) for a in range(1, 7) for b in range(1, 7) for c in range(1, 7)
              if a + b + c <= 10),
             key=lambda r: sum(svd.retained_energy(s)[k - 1] for s, k in zip(spectra, r)))
  got = svd.allocate_budget(spectra, 10)
  total = lambda r: sum(svd.retained_energy(s)[k - 1] for s, k in zip(spectra, r))
  # Float64 sums of three energies <= 1, each from a float64 cumulative sum of 6 terms.
  within(abs(total(got) - total(best)), f64_bound(3.0, 3 + 6))
  with pytest.raises(ValueError, match='cannot give 3 layers'):
    svd.allocate_budget(spectra, 5, multiple=2)


def test_rope_dimension_choices():
  assert rope_dims.choose('paper', 8, 2) == (None, [6, 7], [0, 1, 2, 3, 4, 5])
  assert rope_dims.choose('high_freq', 8, 4) == ((0, 1), [0, 1, 4, 5], [2, 3, 6, 7])
  assert rope_dims.choose('low_freq', 8, 2) == ((3,), [3, 7], [0, 1, 2, 4, 5, 6])
  assert rope_dims.choose('uniform', 16, 6)[0] == (0, 4, 7)
  rng = np.random.default_rng(0)
  wq, wk = rng.normal(size=(2, 16, 4, 8))
  wq[:, :, 2] *= 10  # pair 2 (dims 2 and 6) dominates
  wk[:, :, 6] *= 10
  assert rope_dims.choose('norm', 8, 2, wq, wk)[0] == (2,)
  with pytest.raises(ValueError, match='choose one of'):
    rope_dims.choose('middle', 8, 2)


def test_fitted_shared_key_is_exact_when_heads_differ_by_a_complex_factor():
  rng = np.random.default_rng(0)
  d, n, k = 16, 4, 2
  base = rng.normal(size=(d, k)) + 1j * rng.normal(size=(d, k))
  factors = rng.normal(size=(n, k)) + 1j * rng.normal(size=(n, k))
  z = base[:, None, :] * factors[None]                          # [D, N, pairs]
  wk = np.concatenate([z.real, z.imag], axis=-1)                # block layout [D, N, 2k]
  wq = rng.normal(size=(d, n, 2 * k))
  key, wq2 = rope_dims.shared_key('fit', wk, wq)
  x = rng.normal(size=(5, d))
  theta = rng.random(k)

  def score(q_cols, k_cols, t, s):  # rotate-half RoPE at positions t (query) and s (key)
    def rot(v, pos):
      a, b = v[..., :k], v[..., k:]
      c, si = np.cos(theta * pos), np.sin(theta * pos)
      return np.concatenate([a * c - b * si, b * c + a * si], -1)
    return np.sum(rot(x @ q_cols, t) * rot(x @ k_cols, s), -1)

  for i in range(n):
    # All float64 (a rank-1 complex SVD, exact here, then products of length d and 2k): the
    # scale is the size of the score's terms, |x| |q columns| |k columns|.
    ref = score(wq[:, i], wk[:, i], 7, 3)
    scale = (np.linalg.norm(x, axis=1).max() * np.linalg.norm(wq[:, i]) *
             max(np.linalg.norm(wk[:, i]), np.linalg.norm(key)))
    within(np.abs(score(wq2[:, i], key, 7, 3) - ref).max(), f64_bound(scale, d + 2 * k + n))
  mean_key, _ = rope_dims.shared_key('mean', wk, wq)
  np.testing.assert_array_equal(mean_key, wk.mean(1))  # the same float64 mean


def test_upcycle_shapes_ranks_and_report():
  params = transformer.init_params(CFG, 0)
  cfg, student, report = upcycle(CFG, params, InitOptions(r_kv=12, r_q=16, d_r=4, round_to=1))
  assert cfg.r_kv == (12, 12, 12) and cfg.r_q == (16, 16, 16) and cfg.d_qk == 4
  a = student['layers'][1]['attn']
  assert a['dq'].shape == (32, 16) and a['uq'].shape == (16, 4, 4) and a['qr'].shape == (16, 4, 4)
  assert a['dkv'].shape == (32, 12) and a['uk'].shape == (12, 4, 4) and a['uv'].shape == (12, 4, 8)
  assert a['kr'].shape == (32, 4) and a['o'].shape == (4, 8, 32)
  transformer.from_params(cfg, student)  # shapes agree with the model
  assert report['kv_values_per_token'] == 3 * (12 + 4)
  assert report['kv_fraction'] == 48 / 96  # exactly 1/2
  assert all(0 < r['kv_energy'] < 1 for r in report['layers'])
  # The student shares everything but attention with the teacher.
  np.testing.assert_array_equal(student['layers'][2]['mlp']['gate'], params['layers'][2]['mlp']['gate'])
  np.testing.assert_array_equal(student['layers'][2]['attn']['o'], params['layers'][2]['attn']['o'])


def test_dynamic_and_budget_ranks_are_per_layer():
  params = transformer.init_params(CFG, 0)
  for l, scale in enumerate([1.0, 0.05, 1.0]):  # a nearly low-rank middle layer
    a = params['layers'][l]['attn']
    a['k'] = a['k'] * np.concatenate([np.ones(2), scale * np.ones(30)])[:, None, None]
    a['v'] = a['v'] * np.concatenate([np.ones(2), scale * np.ones(30)])[:, None, None]
  cfg, _, _ = upcycle(CFG, params, InitOptions(r_kv=16, d_r=2, kv_energy=0.9, round_to=2))
  assert cfg.r_kv[0] == cfg.r_kv[2] == 16 and cfg.r_kv[1] < 8  # ends fixed, middle by energy
  cfg, _, _ = upcycle(CFG, params, InitOptions(r_kv=16, d_r=2, kv_energy=0.9, round_to=2,
                                               keep_ends_fixed=False))
  assert cfg.r_kv[0] > cfg.r_kv[1] < cfg.r_kv[2]
  cfg, _, rep = upcycle(CFG, params, InitOptions(d_r=2, kv_budget=0.25, round_to=1))
  assert cfg.kv_values_per_token() <= 0.25 * CFG.kv_values_per_token()
  assert cfg.kv_values_per_token() == 24 and cfg.r_kv[1] < cfg.r_kv[0]


def test_bad_options_are_named():
  with pytest.raises(ValueError, match="mla.rope_dims='middle'"):
    InitOptions(rope_dims='middle')
  with pytest.raises(ValueError, match='either mla.kv_energy or mla.kv_budget'):
    InitOptions(kv_energy=0.9, kv_budget=0.2)
  with pytest.raises(ValueError, match='exceeds the full rank'):
    upcycle(CFG, transformer.init_params(CFG), InitOptions(r_kv=40, d_r=2))
