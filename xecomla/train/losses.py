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


DIVERGENCES = ('forward_kl', 'reverse_kl', 'jsd')


def divergence(log_pt: jax.Array, log_ps: jax.Array, kind: str = 'forward_kl',
               beta: float = 0.5) -> jax.Array:
  """Per-position divergence between teacher (log_pt) and student (log_ps) distributions over the
  last axis: forward_kl KL(T || S), reverse_kl KL(S || T), or jsd, the generalised Jensen-Shannon
  divergence of GKD (Agarwal et al. 2024), beta KL(T || M) + (1 - beta) KL(S || M) with
  M = beta T + (1 - beta) S (0 < beta < 1; 0.5 is the symmetric JSD)."""
  kl = lambda log_a, log_b: jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)
  if kind == 'forward_kl':
    return kl(log_pt, log_ps)
  if kind == 'reverse_kl':
    return kl(log_ps, log_pt)
  if kind == 'jsd':
    log_m = jnp.logaddexp(jnp.log(beta) + log_pt, jnp.log1p(-beta) + log_ps)
    return beta * kl(log_pt, log_m) + (1.0 - beta) * kl(log_ps, log_m)
  raise ValueError(f'divergence {kind!r} is not one of {DIVERGENCES}')


def kd_token_losses(student_logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array,
                    temperature: float = 1.0, kind: str = 'forward_kl',
                    beta: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token divergence (`divergence`) between teacher and student at temperature tau, scaled
  by tau^2 (so that gradients keep their size across temperatures), the student's cross-entropy
  at temperature 1, and KL(teacher || student) at tau (the same as the first for forward_kl)."""
  t = temperature
  log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  kl = divergence(log_pt, log_ps) * (t * t)
  div = kl if kind == 'forward_kl' else divergence(log_pt, log_ps, kind, beta) * (t * t)
  ce = -token_log_probs(student_logits, targets)
  return div, ce, kl


def _sums(div, ce, kl, kl_weight, ce_weight, kind, tokens) -> dict[str, jax.Array]:
  out = {'loss': kl_weight * div + ce_weight * ce, 'kl': kl, 'ce': ce, 'tokens': tokens}
  if kind != 'forward_kl':
    out['div'] = div
  return out


def kd_loss_sums(student_logits, teacher_logits, tokens, segment_ids, loss_mask=None, *,
                 kl_weight=1.0, ce_weight=0.0, temperature=1.0, kind='forward_kl',
                 beta=0.5) -> dict[str, jax.Array]:
  """Sums over the batch's target tokens: `loss` = kl_weight * D + ce_weight * CE with D the
  divergence `kind` (kd_token_losses), `kl` (forward KL, logged whatever D is), `ce`, `div` (D,
  when it is not forward KL) and `tokens` (their count). The loss per token is
  sums['loss'] / sums['tokens']: an average over tokens, not over rows."""
  targets, w = next_token_targets(tokens, segment_ids, loss_mask)
  div, ce, kl = kd_token_losses(student_logits, teacher_logits, targets, temperature, kind, beta)
  return _sums(jnp.sum(div * w), jnp.sum(ce * w), jnp.sum(kl * w), kl_weight, ce_weight, kind,
               jnp.sum(w))


def kd_loss_sums_chunked(student_hidden, teacher_hidden, student_head: Callable,
                         teacher_head: Callable, tokens, segment_ids, loss_mask=None, *, chunk=0,
                         kl_weight=1.0, ce_weight=0.0, temperature=1.0, kind='forward_kl',
                         beta=0.5) -> dict[str, jax.Array]:
  """kd_loss_sums of student_head(student_hidden) against teacher_head(teacher_hidden) (hidden
  [B, T, D] -> logits [B, T, V]), `chunk` positions at a time: a lax.scan over chunks whose body is
  under jax.checkpoint, so neither pass holds more than a chunk's [B, chunk, V] logits (the
  backward recomputes them). T need not divide by chunk: the last chunk is padded with weight 0.
  chunk = 0 (or >= T) computes whole rows at once."""
  b, t = tokens.shape
  if chunk <= 0 or chunk >= t:
    return kd_loss_sums(student_head(student_hidden), teacher_head(teacher_hidden), tokens,
                        segment_ids, loss_mask, kl_weight=kl_weight, ce_weight=ce_weight,
                        temperature=temperature, kind=kind, beta=beta)
  targets, w = next_token_targets(tokens, segment_ids, loss_mask)
  n = -(-t // chunk)

  def chunks(x):  # [B, T, ...] -> [n, B, chunk, ...], zero-padded
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(carry, xs):
    s_h, t_h, tgt, wc = xs
    div, ce, kl = kd_token_losses(student_head(s_h), jax.lax.stop_gradient(teacher_head(t_h)),
                                  tgt, temperature, kind, beta)
    return tuple(c + jnp.sum(x * wc) for c, x in zip(carry, (div, ce, kl))), None

  zero = jnp.zeros((), jnp.float32)
  (div_sum, ce_sum, kl_sum), _ = jax.lax.scan(
      body, (zero,) * 3, tuple(chunks(x) for x in (student_hidden, teacher_hidden, targets, w)))
  return _sums(div_sum, ce_sum, kl_sum, kl_weight, ce_weight, kind, jnp.sum(w))


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
