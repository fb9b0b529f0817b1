"""Losses as pure functions of logits and batches: next-token NLL, distillation (KL + CE), DPO.

Conventions: logits [B, T, V] float32; `tokens` and `segment_ids` [B, T]; the target of position t
is tokens[t + 1] when t + 1 is in the same non-zero segment (so packed documents never predict
across a boundary). Optional `loss_mask` [B, T] (1 = this position's *target* counts) restricts
the loss further, e.g. to assistant tokens.
"""

from __future__ import annotations

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
