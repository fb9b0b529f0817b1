"""Losses against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import f32_bound, max_abs, within
from xecomla.train import losses


def softmax(x, t=1.0):
  e = np.exp((x - x.max(-1, keepdims=True)) / t)
  return e / e.sum(-1, keepdims=True)


def test_next_token_targets_respect_segments_and_mask():
  tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
  seg = jnp.array([[1, 1, 2, 2, 2, 0]])
  targets, w = losses.next_token_targets(tokens, seg)
  np.testing.assert_array_equal(targets[0, :5], [6, 7, 8, 9, 0])
  np.testing.assert_array_equal(w[0], [1, 0, 1, 1, 0, 0])  # no target across 1->2, none for pad
  _, w = losses.next_token_targets(tokens, seg, jnp.array([[1, 1, 0, 1, 1, 1]]))
  np.testing.assert_array_equal(w[0], [1, 0, 0, 1, 0, 0])


@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_kd_loss_equals_hand_computation(temperature):
  rng = np.random.default_rng(0)
  # float32 inputs, so that the float64 hand computation sees exactly what the loss sees.
  s, t = (rng.normal(size=(2, 1, 4, 7)) * 2).astype(np.float32).astype(np.float64)
  tokens = np.array([[1, 4, 2, 6]])
  seg = np.array([[1, 1, 1, 0]])  # the last position is padding; position 2 has no target
  sums = losses.kd_loss_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(tokens), jnp.asarray(seg),
                             kl_weight=0.7, ce_weight=0.3, temperature=temperature)
  kl = ce = 0.0
  for pos in (0, 1):
    pt, ps = softmax(t[0, pos], temperature), softmax(s[0, pos], temperature)
    kl += np.sum(pt * (np.log(pt) - np.log(ps))) * temperature ** 2
    ce += -np.log(softmax(s[0, pos])[tokens[0, pos + 1]])
  assert float(sums['tokens']) == 2
  # float32 log-softmax of 7 logits (a max, a sum of exps, a log: ~7 + 3 roundings of values up
  # to max |logit| / temperature + log 7), then sums over 7 classes and 2 positions.
  scale = 2 * (max(max_abs(s), max_abs(t)) / temperature + np.log(7)) * max(temperature ** 2, 1)
  within(abs(float(sums['kl']) - kl), f32_bound(scale, 7 + 3 + 7 + 2))
  within(abs(float(sums['ce']) - ce), f32_bound(scale, 7 + 3 + 2))
  within(abs(float(sums['loss']) - (0.7 * kl + 0.3 * ce)), f32_bound(scale, 7 + 3 + 7 + 2 + 2))


def test_kd_loss_is_zero_when_student_equals_teacher():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 11)))
  tokens = jnp.zeros((2, 5), jnp.int32)
  sums = losses.kd_loss_sums(logits, logits, tokens, jnp.ones((2, 5), jnp.int32))
  # KL = sum p (log p_t - log p_s) with both log-probabilities computed identically: exactly 0.
  assert float(sums['loss']) == 0.0 and float(sums['tokens']) == 8


def test_masked_tokens_do_not_count():
  rng = np.random.default_rng(2)
  s, t = (jnp.asarray(rng.normal(size=(1, 6, 9))) for _ in range(2))
  tokens, seg = jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 6), jnp.int32)
  mask = jnp.array([[1, 0, 1, 0, 1, 1]])
  masked = losses.kd_loss_sums(s, t, tokens, seg, mask)
  # Changing the logits at masked positions changes nothing.
  s2 = s.at[0, 1].set(100.0).at[0, 3].set(-50.0)
  again = losses.kd_loss_sums(s2, t, tokens, seg, mask)
  # Masked positions are multiplied by 0 before the same sums: bit-identical.
  assert float(masked['loss']) == float(again['loss'])
  assert float(masked['tokens']) == 3  # positions 0, 2, 4 (5 has no next token)


def test_dpo_loss_and_rewards_equal_the_published_formula():
  values = [[-10.0, -4.0], [-12.0, -3.0], [-11.0, -4.5], [-11.5, -3.2]]
  pc, pr, rc, rr = (jnp.array(v, jnp.float32) for v in values)
  beta = 0.1
  loss, chosen, rejected = losses.dpo_losses(pc, pr, rc, rr, beta)
  # By hand in float64 from the same float32 inputs (-3.2 and beta are not exact in float32).
  hpc, hpr, hrc, hrr = (np.asarray(v, np.float32).astype(np.float64) for v in values)
  hand_chosen = beta * (hpc - hrc)
  hand_rejected = beta * (hpr - hrr)
  hand_loss = -np.log(1 / (1 + np.exp(-(hand_chosen - hand_rejected))))
  # A subtraction of log-probabilities (magnitude 12) and a product by beta, then log-sigmoid.
  within(np.abs(np.asarray(chosen) - hand_chosen).max(), f32_bound(beta * 12, 3))
  within(np.abs(np.asarray(rejected) - hand_rejected).max(), f32_bound(beta * 12, 3))
  within(np.abs(np.asarray(loss) - hand_loss).max(), f32_bound(beta * 12 * 2, 3 + 3))


def test_sequence_log_probs_sum_the_response_only():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(1, 5, 6)))
  tokens = jnp.array([[1, 2, 3, 4, 5]])
  mask = jnp.array([[0, 0, 1, 1, 0]])  # targets tokens[3] and tokens[4]
  lp = jax.nn.log_softmax(logits[0])
  expected = lp[2, 4] + lp[3, 5]
  got = losses.sequence_log_probs(logits, tokens, jnp.ones((1, 5), jnp.int32), mask)
  # Two float32 log-softmaxes over 6 classes, summed over 5 positions (weights 0 or 1).
  within(abs(float(got[0]) - float(expected)), f32_bound(max_abs(lp), 6 + 3 + 5))


def test_hidden_state_mse_is_a_per_layer_mean_over_real_tokens():
  s = [jnp.ones((1, 3, 4)), jnp.zeros((1, 3, 4))]
  t = [jnp.zeros((1, 3, 4)), jnp.full((1, 3, 4), 2.0)]
  seg = jnp.array([[1, 1, 0]])
  # layer 0: mse 1 per token, layer 1: mse 4 per token; 2 real tokens; averaged over layers.
  assert float(losses.hidden_mse_sum(s, t, seg)) == (2 * 1 + 2 * 4) / 2  # small integers: exact
