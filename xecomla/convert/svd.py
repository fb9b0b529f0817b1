"""Low-rank factorisation and rank selection: pure numpy functions, computed in float64.

The conversion is a one-off cost, so every product, SVD and solve here runs in numpy/LAPACK
float64 on the host: the result is the same on every backend (an accelerator's default matmul
precision, bfloat16 on TPU or TF32 on recent GPUs, never enters). Spectra and factors stay
float64 until `factor` casts its result to float32. The SVD goes through the smaller Gram matrix
and factorises repeated columns once (GQA repeats each K/V head per query head): the 1B shapes'
[W^K, W^V] (2048 x 4096, 1024 distinct columns) and W^Q (2048 x 2048) of a layer take 4.7x less
time than LAPACK's SVD of the matrices as given, to float32 precision (benchmarks/svd_init.py).

For a weight M [d_in, d_out] (row-vector convention, y = x M) and rank r:
  plain SVD            M = U S V^T,       M ~= (U_r S_r^a) (S_r^(1-a) V_r^T)
  activation-aware     C = X^T X / n = L L^T (Cholesky, damped), L^T M = U S V^T,
                       M ~= (L^-T U_r S_r^a) (S_r^(1-a) V_r^T), the rank-r minimiser of ||X M - X A B||_F
where a = 0 ('up': singular values go to the up-projection, the paper's choice), 1 ('down') or
1/2 ('split'). Retained energy of rank r: sum_{k<=r} s_k^2 / sum_k s_k^2.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SIGMA = {'up': 0.0, 'down': 1.0, 'split': 0.5}


def spectrum_svd(m: np.ndarray, whiten: np.ndarray | None = None, *, lapack: bool = False):
  """SVD of M (or of L^T M with `whiten` = L): returns (U, S, V^T) as float64 numpy arrays.

  S always holds min(M.shape) values. By default (see `gram_svd`) repeated columns of M are
  factorised once and the SVD is read off the smaller Gram matrix, which leaves out of U and V^T
  the trailing components it cannot resolve to float32 precision (their singular values are kept
  in S): a caller that needs a rank beyond U's columns asks again with `lapack=True`, LAPACK's
  divide-and-conquer SVD of M as given (the reference; slower, see the module docstring).
  """
  m = np.asarray(m, np.float64)
  if lapack:
    if whiten is not None:
      m = np.asarray(whiten, np.float64).T @ m
    return np.linalg.svd(m, full_matrices=False)
  first, which, counts = distinct_columns(m)
  b = m[:, first] if len(first) < m.shape[1] else m
  if whiten is not None:
    b = np.asarray(whiten, np.float64).T @ b
  u, s, vt = gram_svd(b * np.sqrt(counts)[None, :])
  # M = B C^(-1/2) E (E picks each column's distinct one) = U S (V_B^T C^(-1/2) E).
  vt = (vt / np.sqrt(counts)[None, :])[:, which] if len(first) < m.shape[1] else vt
  return u, np.pad(s, (0, min(m.shape) - len(s))), vt


def distinct_columns(m: np.ndarray, key_rows: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(index of each distinct column of M, first appearances in order; for every column of M the
  position of its distinct column; how often each occurs), for float64 M. Columns are equal when
  bitwise equal: grouped by their first `key_rows` entries, then every grouped column is compared
  in full with its group's first (the grouping is redone on whole columns if any differs)."""
  bits = m.view(np.int64)
  for rows in (min(key_rows, len(m)), len(m)):
    seen: dict[bytes, int] = {}
    which, first = [], []
    for j, col in enumerate(np.ascontiguousarray(bits[:rows].T)):
      k = seen.setdefault(col.tobytes(), len(seen))
      if k == len(first):
        first.append(j)
      which.append(k)
    first, which = np.array(first), np.array(which)
    dup = np.flatnonzero(first[which] != np.arange(len(which)))
    if rows == len(m) or np.array_equal(bits[:, dup], bits[:, first[which[dup]]]):
      return first, which, np.bincount(which)
  raise AssertionError('unreachable: whole columns group exactly')


def gram_svd(m: np.ndarray):
  """Thin SVD of M [p, q] through the eigendecomposition of its smaller Gram matrix (M M^T or
  M^T M, k x k with k = min(p, q)): (U [p, n], S [k], V^T [n, q]), S descending.

  The eigenvectors give one side orthonormal to float64 rounding; the other side is M^T U / S (or
  M V / S), orthonormal to about max(p, q) eps64 s_1^2 / s_i^2 (the error of forming and solving
  the Gram matrix, over the i-th eigenvalue). Only the n components where that is below eps32,
  the precision the factors are stored in, are returned in U and V^T; S has all k values
  (negative rounding clipped to 0).
  """
  p, q = m.shape
  wide = p <= q
  lam, vec = np.linalg.eigh(m @ m.T if wide else m.T @ m)
  lam, vec = np.maximum(lam[::-1], 0.0), vec[:, ::-1]
  s = np.sqrt(lam)
  eps64, eps32 = np.finfo(np.float64).eps, np.finfo(np.float32).eps
  n = int(np.sum(lam > lam[0] * max(p, q) * eps64 / eps32)) if lam[0] > 0 else 0
  vec, sn = vec[:, :n], s[:n]
  if wide:
    return vec, s, (vec.T @ m) / sn[:, None]
  return (m @ vec) / sn[None, :], s, vec.T


def factor(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int, sigma: str = 'up',
           whiten: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(down [d_in, r], up [r, d_out]) as float32, from an SVD; `whiten` = L undoes the whitening on
  the down side. Computed in float64, cast once at the end."""
  if sigma not in SIGMA:
    raise ValueError(f"sigma={sigma!r}: choose one of {sorted(SIGMA)}")
  if not 1 <= rank <= len(s):
    raise ValueError(f'rank {rank} outside 1..{len(s)}')
  if rank > u.shape[1]:
    raise ValueError(f'rank {rank} is past the {u.shape[1]} components this SVD resolves: '
                     'factor the spectrum_svd(..., lapack=True) of the matrix instead.')
  a = SIGMA[sigma]
  u, s, vt = (np.asarray(x, np.float64) for x in (u, s, vt))
  sr = s[:rank]
  down = u[:, :rank] * (sr ** a)[None, :]
  up = (sr ** (1 - a))[:, None] * vt[:rank]
  if whiten is not None:
    # L^-T U_r: solve L^T Y = U_r.
    down = np.linalg.solve(np.asarray(whiten, np.float64).T, down)
  return down.astype(np.float32), up.astype(np.float32)


def cholesky_whitener(gram: np.ndarray, damp: float = 1e-2) -> np.ndarray:
  """L with L L^T = C + damp * mean(diag C) * I (the damping keeps L invertible)."""
  c = np.asarray(gram, np.float64)
  c = c + damp * np.mean(np.diag(c)) * np.eye(len(c))
  return np.linalg.cholesky(c)


def retained_energy(s: np.ndarray) -> np.ndarray:
  """e[r-1] = fraction of squared singular values kept by rank r (r = 1..len(s))."""
  e = np.cumsum(np.asarray(s, np.float64) ** 2)
  return e / e[-1] if e[-1] > 0 else np.ones_like(e)


def round_up(r: int, multiple: int, cap: int) -> int:
  return min(cap, int(math.ceil(r / multiple) * multiple))


def rank_for_energy(s: np.ndarray, delta: float, multiple: int = 1) -> int:
  """The smallest rank whose retained energy reaches delta, rounded up to a multiple (capped at
  full rank)."""
  if not 0.0 < delta <= 1.0:
    raise ValueError(f'energy threshold {delta} must be in (0, 1]')
  e = retained_energy(s)
  r = int(np.searchsorted(e, delta - 1e-12) + 1)
  return round_up(min(r, len(s)), multiple, len(s))


def allocate_budget(spectra: Sequence[np.ndarray], budget: int, multiple: int = 1) -> list[int]:
  """Per-layer ranks (multiples of `multiple`, at least one chunk each) summing to at most
  `budget` that maximise the total retained energy sum_l e_l(r_l).

  Greedy by marginal gain, one chunk at a time; optimal because each e_l is concave in r (the
  singular values are sorted), so chunk gains only decrease.
  """
  n = len(spectra)
  if budget < n * multiple:
    raise ValueError(f'a budget of {budget} latent values cannot give {n} layers a rank of '
                     f'{multiple} each: raise the KV fraction or lower round_to.')
  energies = [retained_energy(s) for s in spectra]
  caps = [len(s) for s in spectra]
  ranks = [min(multiple, c) for c in caps]
  used = sum(ranks)

  def gain(l):
    r, new = ranks[l], min(ranks[l] + multiple, caps[l])
    return energies[l][new - 1] - energies[l][r - 1] if new > r else -1.0

  while True:
    candidates = [(gain(l), -l) for l in range(n)
                  if ranks[l] < caps[l] and used + min(multiple, caps[l] - ranks[l]) <= budget]
    if not candidates:
      return ranks
    g, neg_l = max(candidates)
    if g < 0:
      return ranks
    l = -neg_l
    step = min(multiple, caps[l] - ranks[l])
    ranks[l] += step
    used += step
