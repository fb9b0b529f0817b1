"""Losses as pure functions of logits and batches: next-token NLL, distillation (KL + CE), DPO.

Conventions: logits [B, T, V] float32; `tokens` and `segment_ids` [B, T]; the target of position t
is tokens[t + 1] when t + 1 is in the same non-zero segment (so packed documents never predict
across a boundary). Optional `loss_mask` [B, T] (1 = this position's *target* counts) restricts
the loss further, e.g. to assistant tokens.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def next_token_targets(tokens: jax.Array, segment_ids: jax.Array,
                       loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Targets [B, T] (tokens shifted left) and float weights [B, T] (1 where a target exists)."""
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
  weights = jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1).astype(jnp.float32)
  if loss_mask is not None:
    weights = weights * loss_mask.astype(jnp.float32)
  return targets, weights


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position, [B, T]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def kd_token_losses(student_logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array,
                    temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Per-token KL(p_teacher || p_student) at temperature tau, scaled by tau^2 (so that gradients
  keep their size across temperatures), and the student's cross-entropy at temperature 1."""
  t = temperature
  log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1) * (t * t)
  ce = -token_log_probs(student_logits, targets)
  return kl, ce


def kd_loss_sums(student_logits, teacher_logits, tokens, segment_ids, loss_mask=None, *,
                 kl_weight=1.0, ce_weight=0.0, temperature=1.0) -> dict[str, jax.Array]:
  """Sums over the batch's target tokens: `loss` = kl_weight * KL + ce_weight * CE, `kl`, `ce`,
  and `tokens` (their count). The loss per token is sums['loss'] / sums['tokens']: an average
  over tokens, not over rows."""
  targets, w = next_token_targets(tokens, segment_ids, loss_mask)
  kl, ce = kd_token_losses(student_logits, teacher_logits, targets, temperature)
  kl_sum, ce_sum = jnp.sum(kl * w), jnp.sum(ce * w)
  return {'loss': kl_weight * kl_sum + ce_weight * ce_sum, 'kl': kl_sum, 'ce': ce_sum,
          'tokens': jnp.sum(w)}


def kd_loss_sums_chunked(student_hidden, teacher_hidden, student_head: Callable,
                         teacher_head: Callable, tokens, segment_ids, loss_mask=None, *, chunk=0,
                         kl_weight=1.0, ce_weight=0.0, temperature=1.0) -> dict[str, jax.Array]:
  """kd_loss_sums of student_head(student_hidden) against teacher_head(teacher_hidden) (hidden
  [B, T, D] -> logits [B, T, V]), `chunk` positions at a time: a lax.scan over chunks whose body is
  under jax.checkpoint, so neither pass holds more than a chunk's [B, chunk, V] logits (the
  backward recomputes them). T need not divide by chunk: the last chunk is padded with weight 0.
  chunk = 0 (or >= T) computes whole rows at once."""
  b, t = tokens.shape
  if chunk <= 0 or chunk >= t:
    return kd_loss_sums(student_head(student_hidden), teacher_head(teacher_hidden), tokens,
                        segment_ids, loss_mask, kl_weight=kl_weight, ce_weight=ce_weight,
                        temperature=temperature)
  targets, w = next_token_targets(tokens, segment_ids, loss_mask)
  n = -(-t // chunk)

  def chunks(x):  # [B, T, ...] -> [n, B, chunk, ...], zero-padded
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(carry, xs):
    s_h, t_h, tgt, wc = xs
    kl, ce = kd_token_losses(student_head(s_h), jax.lax.stop_gradient(teacher_head(t_h)), tgt,
                             temperature)
    return (carry[0] + jnp.sum(kl * wc), carry[1] + jnp.sum(ce * wc)), None

  zero = jnp.zeros((), jnp.float32)
  (kl_sum, ce_sum), _ = jax.lax.scan(
      body, (zero, zero), tuple(chunks(x) for x in (student_hidden, teacher_hidden, targets, w)))
  return {'loss': kl_weight * kl_sum + ce_weight * ce_sum, 'kl': kl_sum, 'ce': ce_sum,
          'tokens': jnp.sum(w)}


def hidden_mse_sum(student_hidden, teacher_hidden, segment_ids) -> jax.Array:
  """Sum over real tokens of the per-layer mean squared difference of the residual streams,
  averaged over layers."""
  w = (segment_ids > 0).astype(jnp.float32)
  per_layer = [jnp.sum(jnp.mean((s.astype(jnp.float32) - t.astype(jnp.float32)) ** 2, -1) * w)
               for s, t in zip(student_hidden, teacher_hidden)]
  return sum(per_layer) / len(per_layer)


def sequence_log_probs(logits, tokens, segment_ids, loss_mask) -> jax.Array:
  """Sum of log p(token) over the masked (response) targets of each row: [B]."""
  targets, w = next_token_targets(tokens, segment_ids, loss_mask)
  return jnp.sum(token_log_probs(logits, targets) * w, axis=-1)


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
  """Sigmoid DPO (Rafailov et al. 2023): per pair
  loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]),
  with rewards beta * (log pi - log ref) for chosen (y_w) and rejected (y_l)."""
  chosen_reward = beta * (policy_chosen - ref_chosen)
  rejected_reward = beta * (policy_rejected - ref_rejected)
  loss = -jax.nn.log_sigmoid(chosen_reward - rejected_reward)
  return loss, chosen_reward, rejected_reward
