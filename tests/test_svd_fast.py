"""The conversion's fast SVD (repeated columns once, through the smaller Gram matrix) against
LAPACK's SVD of the matrix as given: the same spectrum, and the same student to float32 rounding
plus the float64 perturbation bound of each route."""

import functools

import numpy as np
import pytest

from tests.conftest import f32_bound, f64_bound, within
from xecomla.convert import svd, upcycle as up
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig

GQA = LlamaConfig(vocab_size=50, dim=48, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8,
                  hidden_dim=40, max_seq_len=64)   # [W^K, W^V] 48 x 128 with 32 distinct columns
MHA = LlamaConfig(vocab_size=50, dim=48, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
                  hidden_dim=40, max_seq_len=64)   # W^Q 48 x 32 (tall), [W^K, W^V] 48 x 64 (wide)


@pytest.mark.parametrize('shape', [(40, 90), (90, 40), (50, 50)])
def test_fast_svd_is_an_svd_with_the_lapack_spectrum(shape):
  rng = np.random.default_rng(0)
  p, q = shape
  m = rng.normal(size=(p, q // 3 + 1))
  m = m[:, rng.integers(0, m.shape[1], q)]             # repeated columns, unequal counts
  u, s, vt = svd.spectrum_svd(m)
  s_ref = np.linalg.svd(m, compute_uv=False)
  n = u.shape[1]
  assert len(s) == min(p, q) and vt.shape == (n, q) and n == np.linalg.matrix_rank(m)
  # Singular values: the squares are eigenvalues of a Gram matrix formed and solved in float64
  # (Weyl: each moves by at most the Gram matrix's rounding, (p + q) eps64 s_1^2).
  within(np.abs(s ** 2 - s_ref ** 2).max(), f64_bound(s_ref[0] ** 2, p + q))
  # One side is the eigensolver's (orthonormal to rounding); the other is M^T U / S, orthonormal
  # to (p + q) eps64 s_1^2 / s_n^2, which the resolution rule keeps below eps32.
  eye = np.eye(n)
  within(max(np.abs(u.T @ u - eye).max(), np.abs(vt @ vt.T - eye).max()),
         f64_bound(s[0] ** 2 / s[n - 1] ** 2, p + q))
  within(np.abs(u * s[:n] @ vt - m).max(), f64_bound(np.abs(m).max() * s[0] / s[n - 1], p + q))


def _products(student, cfg):
  """What the student computes with: W^DKV [W^UK, W^UV] and W^DQ [W^UQ, W^QR] of every layer."""
  out = []
  for l in range(cfg.n_layers):
    a = {k: np.asarray(v, np.float64) for k, v in student['layers'][l]['attn'].items()}
    r, rq = cfg.r_kv[l], cfg.r_q[l]
    out.append((a['dkv'], np.concatenate([a['uk'].reshape(r, -1), a['uv'].reshape(r, -1)], 1)))
    out.append((a['dq'], np.concatenate([a['uq'], a['qr']], -1).reshape(rq, -1)))
  return out


@pytest.mark.parametrize('llama', [GQA, MHA], ids=['gqa', 'mha'])
@pytest.mark.parametrize('sigma,method', [('up', 'svd'), ('down', 'svd'), ('split', 'activation')])
def test_upcycle_gives_the_lapack_student(llama, sigma, method, monkeypatch):
  params = transformer.init_params(llama, 0)
  rng = np.random.default_rng(1)
  whiteners = None
  if method == 'activation':
    x = rng.normal(size=(200, llama.dim)) * np.linspace(0.2, 2, llama.dim)
    whiteners = [svd.cholesky_whitener(x.T @ x / len(x))] * llama.n_layers
  opts = InitOptions(method=method, r_kv=12, r_q=16, d_r=4, sigma=sigma, round_to=1)
  cfg, fast, rep = upcycle(llama, params, opts, whiteners=whiteners)
  monkeypatch.setattr(svd, 'spectrum_svd', functools.partial(svd.spectrum_svd, lapack=True))
  cfg_ref, ref, rep_ref = upcycle(llama, params, opts, whiteners=whiteners)
  monkeypatch.undo()
  assert cfg == cfg_ref
  for a, b in zip(rep['layers'], rep_ref['layers']):
    # Retained energy, a ratio of sums of the squared spectrum: (p + q) eps64 (see above).
    within(abs(a['kv_energy'] - b['kv_energy']) + abs(a['q_energy'] - b['q_energy']),
           f64_bound(2, 2 * (llama.dim + 2 * llama.n_heads * llama.head_dim)))
  layers = [up._svd_layer(llama, params['layers'][l]['attn'], opts,
                          None if whiteners is None else whiteners[l]) for l in range(llama.n_layers)]
  mats = [(x[k].reshape(llama.dim, -1), r) for x, l in zip(layers, range(llama.n_layers))
          for k, r in (('kv', cfg.r_kv[l]), ('wq', cfg.r_q[l]))]
  for (d1, u1), (d2, u2), (m, r) in zip(_products(fast, cfg), _products(ref, cfg), mats):
    w = np.eye(llama.dim) if whiteners is None else whiteners[0]
    s = np.linalg.svd(w.T @ m, compute_uv=False)
    # Each route's rank-r projector is within (p + q) eps64 s_1^2 / (s_r^2 - s_r+1^2) of the
    # exact one (Davis-Kahan on the Gram matrix; LAPACK's Wedin bound s_1 / (s_r - s_r+1) is at
    # most twice that), carried through ||L^-T|| ||L^T M||; each factor is then rounded to
    # float32 once (eps32 ||D|| ||U|| in the product).
    gap = s[0] ** 2 / (s[r - 1] ** 2 - s[r] ** 2)
    carry = np.linalg.norm(np.linalg.inv(w), 2) * np.linalg.norm(w.T @ m)
    bound = (f32_bound(np.linalg.norm(d1) * np.linalg.norm(u1) + np.linalg.norm(d2) *
                       np.linalg.norm(u2), 1) + f64_bound(3 * gap * carry, sum(m.shape)))
    within(np.linalg.norm(d1 @ u1 - d2 @ u2), bound)


def test_a_rank_past_the_distinct_columns_falls_back_to_lapack(monkeypatch):
  params = transformer.init_params(GQA, 0)
  opts = InitOptions(r_kv=40, r_q=None, d_r=4, round_to=1)   # 32 distinct columns, full rank 48
  _, fast, _ = upcycle(GQA, params, opts)
  monkeypatch.setattr(svd, 'spectrum_svd', functools.partial(svd.spectrum_svd, lapack=True))
  _, ref, _ = upcycle(GQA, params, opts)
  for l in range(GQA.n_layers):
    for k in ('dkv', 'uk', 'uv'):
      np.testing.assert_array_equal(fast['layers'][l]['attn'][k], ref['layers'][l]['attn'][k])
  monkeypatch.undo()
  u, s, vt = svd.spectrum_svd(np.ones((4, 6)))
  with pytest.raises(ValueError, match='past the 1 components'):
    svd.factor(u, s, vt, 2)
