"""The train steps' loss functions, each split in two: `prepare` runs the frozen model (teacher or
reference) outside the gradient, `loss` runs the trained one and returns (objective sum, sums).

  kd   the student against a frozen teacher (KL + CE over the vocabulary, computed `chunk`
       positions at a time; optional hidden-state MSE)
  dpo  the policy against a frozen reference (sigmoid DPO); chosen and rejected rows go through
       one forward of a [2B, T] batch, so each model runs once per micro-batch
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from xecomla.train import losses

PAIR_FIELDS = ('tokens', 'positions', 'segment_ids', 'loss_mask')


@dataclasses.dataclass(frozen=True)
class LossFn:
  """prepare: (frozen params, micro-batch) -> frozen outputs (no gradient flows into them);
  loss: (params, frozen outputs, micro-batch) -> (objective sum, sums incl. `count`).
  Calling it runs both: (params, frozen params, micro-batch) -> (objective sum, sums)."""
  prepare: Callable[[Any, dict], Any]
  loss: Callable[[Any, Any, dict], tuple[jax.Array, dict[str, jax.Array]]]

  def __call__(self, params, frozen, b):
    return self.loss(params, jax.lax.stop_gradient(self.prepare(frozen, b)), b)


@dataclasses.dataclass(frozen=True)
class KDOptions:
  kl_weight: float = 1.0
  ce_weight: float = 0.0
  temperature: float = 1.0
  hidden_weight: float = 0.0
  chunk: int = 0   # positions per chunk of the vocabulary losses (0 = whole rows)


def kd_loss_fn(student_graphdef, teacher_graphdef, opts: KDOptions) -> LossFn:
  """Both models return final-normed hidden states (logits=False); their heads run inside
  losses.kd_loss_sums_chunked, so no [tokens, vocab] logits tensor is whole when opts.chunk is
  below the row length."""
  hidden = opts.hidden_weight > 0

  def forward(model, b):
    return model(b['tokens'], b['positions'], b['segment_ids'], return_hidden=hidden, logits=False)

  def prepare(teacher_params, b):
    out = forward(nnx.merge(teacher_graphdef, teacher_params), b)
    return {'final': out[0], 'layers': out[2] if hidden else None, 'params': teacher_params}

  def loss(params, t, b):
    student, teacher = nnx.merge(student_graphdef, params), nnx.merge(teacher_graphdef, t['params'])
    s_out = forward(student, b)
    sums = losses.kd_loss_sums_chunked(
        s_out[0], t['final'], student.head, teacher.head, b['tokens'], b['segment_ids'],
        b.get('loss_mask'), chunk=opts.chunk, kl_weight=opts.kl_weight, ce_weight=opts.ce_weight,
        temperature=opts.temperature)
    objective = sums['loss']
    if hidden:
      sums['hidden'] = losses.hidden_mse_sum(s_out[2], t['layers'], b['segment_ids'])
      objective = objective + opts.hidden_weight * sums['hidden']
    sums['count'] = sums['tokens']
    return objective, sums

  return LossFn(prepare, loss)


def pair_rows(b: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """chosen_* and rejected_* [B, T] -> one batch [2B, T], pairs interleaved (row 2i chosen,
  2i + 1 rejected): a device's block of pairs becomes a block of rows of its own, so the batch
  sharding stays valid and nothing moves between devices."""
  def interleave(k):
    c, r = b['chosen_' + k], b['rejected_' + k]
    return jnp.stack([c, r], axis=1).reshape((2 * c.shape[0],) + c.shape[1:])
  return {k: interleave(k) for k in PAIR_FIELDS}


def pair_logps(model, b: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Summed response log-probs of chosen and rejected, [B] each, from one forward."""
  rows = pair_rows(b)
  logits, _ = model(rows['tokens'], rows['positions'], rows['segment_ids'])
  logps = losses.sequence_log_probs(logits, rows['tokens'], rows['segment_ids'], rows['loss_mask'])
  logps = logps.reshape(-1, 2)
  return logps[:, 0], logps[:, 1]


def dpo_loss_fn(graphdef, beta: float) -> LossFn:

  def prepare(ref_params, b):
    return pair_logps(nnx.merge(graphdef, ref_params), b)

  def loss(params, ref, b):
    pc, pr = pair_logps(nnx.merge(graphdef, params), b)
    per_pair, chosen, rejected = losses.dpo_losses(pc, pr, ref[0], ref[1], beta)
    sums = {'loss': jnp.sum(per_pair), 'chosen_reward': jnp.sum(chosen),
            'rejected_reward': jnp.sum(rejected), 'reward_accuracy': jnp.sum(chosen > rejected),
            'margin': jnp.sum(chosen - rejected), 'count': jnp.asarray(per_pair.shape[0], jnp.float32)}
    return sums['loss'], sums

  return LossFn(prepare, loss)
