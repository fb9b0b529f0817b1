"""The optimiser: AdamW with linear warmup then cosine decay, global-norm gradient clipping.
Weight decay applies to matrices only (not norm scales)."""

from __future__ import annotations

import jax
import optax


def warmup_steps(warmup: float, steps: int) -> int:
  """warmup < 1 is a fraction of the steps, >= 1 a number of steps."""
  return int(round(warmup * steps)) if warmup < 1 else int(warmup)


def schedule(lr: float, steps: int, warmup: float, min_lr_ratio: float = 0.0) -> optax.Schedule:
  w = min(warmup_steps(warmup, steps), max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if w else lr, peak_value=lr, warmup_steps=w,
      decay_steps=max(steps, w + 1), end_value=lr * min_lr_ratio)


def adamw(*, lr: float, steps: int, warmup: float = 0.01, min_lr_ratio: float = 0.0,
          b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.0,
          grad_clip: float = 1.0) -> optax.GradientTransformation:
  parts = []
  if grad_clip and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adamw(schedule(lr, steps, warmup, min_lr_ratio), b1=b1, b2=b2, eps=1e-8,
                           weight_decay=weight_decay,
                           mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))
  return optax.chain(*parts)
