"""Losses against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  s, t = rng.normal(size=(2, 1, 4, 7)) * 2
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
  np.testing.assert_allclose(float(sums['kl']), kl, rtol=1e-5)
  np.testing.assert_allclose(float(sums['ce']), ce, rtol=1e-5)
  np.testing.assert_allclose(float(sums['loss']), 0.7 * kl + 0.3 * ce, rtol=1e-5)


def test_kd_loss_is_zero_when_student_equals_teacher():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 11)))
  tokens = jnp.zeros((2, 5), jnp.int32)
  sums = losses.kd_loss_sums(logits, logits, tokens, jnp.ones((2, 5), jnp.int32))
  assert abs(float(sums['loss'])) < 1e-6 and float(sums['tokens']) == 8


def test_masked_tokens_do_not_count():
  rng = np.random.default_rng(2)
  s, t = (jnp.asarray(rng.normal(size=(1, 6, 9))) for _ in range(2))
  tokens, seg = jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 6), jnp.int32)
  mask = jnp.array([[1, 0, 1, 0, 1, 1]])
  masked = losses.kd_loss_sums(s, t, tokens, seg, mask)
  # Changing the logits at masked positions changes nothing.
  s2 = s.at[0, 1].set(100.0).at[0, 3].set(-50.0)
  again = losses.kd_loss_sums(s2, t, tokens, seg, mask)
  np.testing.assert_allclose(float(masked['loss']), float(again['loss']), rtol=1e-6)
  assert float(masked['tokens']) == 3  # positions 0, 2, 4 (5 has no next token)


def test_dpo_loss_and_rewards_equal_the_published_formula():
  pc, pr, rc, rr = (jnp.array(v) for v in ([-10.0, -4.0], [-12.0, -3.0], [-11.0, -4.5], [-11.5, -3.2]))
  beta = 0.1
  loss, chosen, rejected = losses.dpo_losses(pc, pr, rc, rr, beta)
  hand_chosen = beta * (np.array([-10.0, -4.0]) - np.array([-11.0, -4.5]))
  hand_rejected = beta * (np.array([-12.0, -3.0]) - np.array([-11.5, -3.2]))
  hand_loss = -np.log(1 / (1 + np.exp(-(hand_chosen - hand_rejected))))
  np.testing.assert_allclose(chosen, hand_chosen, rtol=1e-6)
  np.testing.assert_allclose(rejected, hand_rejected, rtol=1e-6)
  np.testing.assert_allclose(loss, hand_loss, rtol=1e-6)


def test_sequence_log_probs_sum_the_response_only():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(1, 5, 6)))
  tokens = jnp.array([[1, 2, 3, 4, 5]])
  mask = jnp.array([[0, 0, 1, 1, 0]])  # targets tokens[3] and tokens[4]
  lp = jax.nn.log_softmax(logits[0])
  expected = lp[2, 4] + lp[3, 5]
  got = losses.sequence_log_probs(logits, tokens, jnp.ones((1, 5), jnp.int32), mask)
  np.testing.assert_allclose(float(got[0]), float(expected), rtol=1e-6)


def test_hidden_state_mse_is_a_per_layer_mean_over_real_tokens():
  s = [jnp.ones((1, 3, 4)), jnp.zeros((1, 3, 4))]
  t = [jnp.zeros((1, 3, 4)), jnp.full((1, 3, 4), 2.0)]
  seg = jnp.array([[1, 1, 0]])
  # layer 0: mse 1 per token, layer 1: mse 4 per token; 2 real tokens; averaged over layers.
  assert float(losses.hidden_mse_sum(s, t, seg)) == pytest.approx((2 * 1 + 2 * 4) / 2)
