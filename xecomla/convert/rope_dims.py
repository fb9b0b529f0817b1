"""Which head dimensions become the MLA RoPE part, and the shared RoPE key.

Llama's RoPE is rotate-half: dimension j (< d_h/2) pairs with j + d_h/2 and rotates at frequency
inv_freq[j]. Choices for d_r RoPE dimensions (k = d_r / 2 pairs):
  paper      the last d_r dimensions of each head, with a fresh RoPE over d_r dimensions (the
             official X-EcoMLA code; it splits Llama's pairs);
  high_freq  pairs 0..k-1 (fastest rotation), original frequencies;
  low_freq   the last k pairs (slowest rotation), original frequencies;
  uniform    k pairs evenly spread over the spectrum, original frequencies;
  norm       the k pairs with the largest sum over heads of ||W^Q pair|| * ||W^K pair||.
The RoPE block is laid out rotate-half itself: [first halves of the chosen pairs, second halves].
Dimensions not chosen form the no-RoPE part, in ascending order.

Shared key: `mean` (paper) averages the per-head RoPE key columns; `fit` treats each pair as a
complex number and fits all heads with one key and a complex factor per head (a rank-1 complex
SVD, weighted by the query pair norms). Since a complex factor commutes with the rotation, the
conjugate factor moves into that head's query columns exactly.

Everything is computed in float64 (numpy), like the rest of the conversion.
"""

from __future__ import annotations

import numpy as np

CHOICES = ('paper', 'high_freq', 'low_freq', 'uniform', 'norm')
KEYS = ('mean', 'fit')


def pair_norms(w: np.ndarray) -> np.ndarray:
  """w [D, N, d_h] -> [N, d_h/2]: Frobenius norm of each head's two columns of each pair."""
  half = w.shape[-1] // 2
  w = np.asarray(w, np.float64)
  return np.sqrt(np.sum(w[..., :half] ** 2 + w[..., half:] ** 2, axis=0))


def choose(choice: str, head_dim: int, d_r: int, wq: np.ndarray | None = None,
           wk_rep: np.ndarray | None = None) -> tuple[tuple[int, ...] | None, list[int], list[int]]:
  """(rope_pairs or None for a fresh RoPE, RoPE dims in block order, no-RoPE dims).

  wq [D, N, d_h] and wk_rep [D, N, d_h] (the KV heads repeated per query head) are needed for
  'norm' only.
  """
  if choice not in CHOICES:
    raise ValueError(f'rope_dims={choice!r}: choose one of {", ".join(CHOICES)}.')
  if d_r % 2 or not 2 <= d_r <= head_dim:
    raise ValueError(f'd_r={d_r} must be even and between 2 and head_dim={head_dim}.')
  half, k = head_dim // 2, d_r // 2
  if choice == 'paper':
    rope = list(range(head_dim - d_r, head_dim))
    return None, rope, [d for d in range(head_dim) if d not in rope]
  if choice == 'high_freq':
    pairs = list(range(k))
  elif choice == 'low_freq':
    pairs = list(range(half - k, half))
  elif choice == 'uniform':
    pairs = sorted(set(int(round(x)) for x in np.linspace(0, half - 1, k)))
    assert len(pairs) == k
  else:
    if wq is None or wk_rep is None:
      raise ValueError("rope_dims='norm' needs the layer's W^Q and W^K")
    score = np.sum(pair_norms(wq) * pair_norms(wk_rep), axis=0)
    pairs = sorted(int(j) for j in np.argsort(-score, kind='stable')[:k])
  rope = pairs + [j + half for j in pairs]
  return tuple(pairs), rope, [d for d in range(head_dim) if d not in rope]


def shared_key(method: str, wk_rope: np.ndarray, wq_rope: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The shared RoPE key W^KR [D, d_r] and the (possibly compensated) query RoPE columns, float64.

  wk_rope [D, N, d_r], wq_rope [D, N, d_r]: each head's RoPE columns in block (rotate-half) order.
  """
  if method not in KEYS:
    raise ValueError(f'rope_key={method!r}: choose one of {", ".join(KEYS)}.')
  if method == 'mean':
    return np.asarray(wk_rope, np.float64).mean(axis=1), np.asarray(wq_rope, np.float64)
  k = wk_rope.shape[-1] // 2
  key = np.zeros(wk_rope.shape[:1] + (2 * k,), np.float64)
  wq_out = np.array(wq_rope, np.float64)
  for p in range(k):
    z = wk_rope[:, :, p].astype(np.float64) + 1j * wk_rope[:, :, p + k]          # [D, N]
    zq = wq_rope[:, :, p].astype(np.float64) + 1j * wq_rope[:, :, p + k]
    weight = np.sqrt(np.sum(np.abs(zq) ** 2, axis=0)) + 1e-12                        # [N]
    u, s, vh = np.linalg.svd(z * weight[None, :], full_matrices=False)
    # Column i of Z diag(weight) ~= s u vh[0, i], so z_i ~= c_i * shared with
    # c_i = sqrt(N) vh[0, i] / weight_i and shared = s u / sqrt(N) (up to a common phase).
    c = np.sqrt(z.shape[1]) * vh[0] / weight                                        # [N]
    phase = np.exp(-1j * np.angle(np.sum(c))) if abs(np.sum(c)) > 0 else 1.0
    c = c * phase
    shared = s[0] * u[:, 0] / np.sqrt(z.shape[1]) / phase
    key[:, p], key[:, p + k] = shared.real, shared.imag
    # Score term Re(q_i conj(z_i)) = Re((q_i conj(c_i)) conj(shared)): fold conj(c_i) into q_i.
    zq = zq * np.conj(c)[None, :]
    wq_out[:, :, p], wq_out[:, :, p + k] = zq.real, zq.imag
  return key, wq_out
