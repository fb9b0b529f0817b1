"""The distillation divergences (forward KL, reverse KL, generalised JSD of GKD) against float64
hand computations, their known bounds, and the chunked loss agreeing with the whole-row one."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import f32_bound, max_abs, within
from xecomla.train import losses

V = 11


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(kind, t, s, beta):
  """float64: t, s logits [..., V] -> the divergence per position."""
  lt, ls = log_softmax(t), log_softmax(s)
  kl = lambda a, b: np.sum(np.exp(a) * (a - b), -1)
  if kind == 'forward_kl':
    return kl(lt, ls)
  if kind == 'reverse_kl':
    return kl(ls, lt)
  lm = np.log(beta * np.exp(lt) + (1 - beta) * np.exp(ls))
  return beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)


def logits(seed, scale=3.0):
  # float32 values, so that the float64 reference sees exactly what the float32 code sees
  return (np.random.default_rng(seed).normal(size=(2, 5, V)) * scale).astype(np.float32).astype(np.float64)


@pytest.mark.parametrize('kind,beta', [('forward_kl', 0.5), ('reverse_kl', 0.5), ('jsd', 0.5),
                                       ('jsd', 0.1), ('jsd', 0.9)])
def test_divergence_equals_float64_reference(kind, beta):
  t, s = logits(0), logits(1)
  got = losses.divergence(jnp.asarray(log_softmax(t), jnp.float32),
                          jnp.asarray(log_softmax(s), jnp.float32), kind, beta)
  want = reference(kind, t, s, beta)
  # V-term sums of p * log-ratio terms, each |log p| <= 2 max|logit| + log V: rounding of V terms
  within(max_abs(np.asarray(got) - want), f32_bound(2 * max_abs([t, s]) + np.log(V), 4 * V))


def test_divergences_vanish_on_equal_distributions_and_jsd_is_bounded():
  t, s = logits(2), logits(3)
  lt = jnp.asarray(log_softmax(t), jnp.float32)
  for kind in losses.DIVERGENCES:
    within(max_abs(losses.divergence(lt, lt, kind)), f32_bound(2 * max_abs(t) + np.log(V), 4 * V))
  for beta in (0.1, 0.5, 0.9):
    jsd = reference('jsd', t, s, beta)
    # JSD(beta) <= the binary entropy of beta (equality for disjoint supports)
    assert np.all(jsd <= -beta * np.log(beta) - (1 - beta) * np.log(1 - beta))
  sym = reference('jsd', t, s, 0.5), reference('jsd', s, t, 0.5)
  np.testing.assert_allclose(sym[0], sym[1], rtol=1e-12)  # float64: symmetric at beta 0.5


@pytest.mark.parametrize('kind', ['reverse_kl', 'jsd'])
def test_loss_sums_report_the_divergence_and_forward_kl(kind):
  t, s = logits(4), logits(5)
  tokens = np.tile(np.arange(5), (2, 1)) % V
  seg = np.ones((2, 5), np.int32)
  seg[1, 3:] = 0
  sums = losses.kd_loss_sums(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                             jnp.asarray(tokens), jnp.asarray(seg), kind=kind, beta=0.3)
  _, w = losses.next_token_targets(jnp.asarray(tokens), jnp.asarray(seg))
  w = np.asarray(w)
  bound = f32_bound(2 * max_abs([t, s]) + np.log(V), 4 * V * w.sum())
  within(abs(float(sums['div']) - np.sum(reference(kind, t, s, 0.3) * w)), bound)
  within(abs(float(sums['kl']) - np.sum(reference('forward_kl', t, s, 0.3) * w)), bound)
  within(abs(float(sums['loss']) - float(sums['div'])), 0.0)  # kl_weight 1, ce_weight 0


def test_chunked_jsd_equals_whole_rows():
  rng = np.random.default_rng(6)
  d = 4
  head_s, head_t = (jnp.asarray(rng.normal(size=(d, V)), jnp.float32) for _ in range(2))
  hs, ht = (jnp.asarray(rng.normal(size=(2, 7, d)), jnp.float32) for _ in range(2))
  tokens = jnp.asarray(rng.integers(0, V, (2, 7)))
  seg = jnp.ones((2, 7), jnp.int32)
  kw = dict(kind='jsd', beta=0.7, ce_weight=0.5)
  whole = losses.kd_loss_sums_chunked(hs, ht, lambda x: x @ head_s, lambda x: x @ head_t, tokens,
                                      seg, chunk=0, **kw)
  chunked = losses.kd_loss_sums_chunked(hs, ht, lambda x: x @ head_s, lambda x: x @ head_t,
                                        tokens, seg, chunk=3, **kw)
  scale = 2 * max_abs([hs @ head_s, ht @ head_t]) + np.log(V)
  for k in ('loss', 'div', 'kl', 'ce'):
    within(abs(float(whole[k]) - float(chunked[k])), f32_bound(scale, 4 * V * 14))
