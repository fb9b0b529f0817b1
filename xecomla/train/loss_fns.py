"""The train steps' loss functions, each split in two: `prepare` runs the frozen model (teacher or
reference) outside the gradient, `loss` runs the trained one and returns (objective sum, sums).

  kd     the student against a frozen teacher (a divergence + CE over the vocabulary, computed
         `chunk` positions at a time; optional hidden-state MSE)
  align  each student attention against the teacher's on the teacher's own normed hidden states
  dpo  the policy against a frozen reference (sigmoid DPO); chosen and rejected rows go through
       one forward of a [2B, T] batch, so each model runs once per micro-batch
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from xecomla.models.attention import attention_mask
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
  divergence: str = 'forward_kl'   # losses.DIVERGENCES
  beta: float = 0.5                # of the generalised JSD


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
        temperature=opts.temperature, kind=opts.divergence, beta=opts.beta)
    objective = sums['loss']
    if hidden:
      sums['hidden'] = losses.hidden_mse_sum(s_out[2], t['layers'], b['segment_ids'])
      objective = objective + opts.hidden_weight * sums['hidden']
    sums['count'] = sums['tokens']
    return objective, sums

  return LossFn(prepare, loss)


def teacher_attention_io(teacher, b) -> tuple[jax.Array, list, list]:
  """The attention mask and, per layer, the teacher's attention input (the normed residual
  stream) and output, from one forward of the teacher."""
  positions, segment_ids = b['positions'], b['segment_ids']
  mask = attention_mask(positions, segment_ids, positions, segment_ids)
  x, inputs, outputs = teacher.embed(b['tokens']), [], []
  for block in teacher.layers:
    h = block.attn_norm(x)
    a, _ = block.attn(h, positions, mask)
    inputs.append(h)
    outputs.append(a)
    x = x + a
    x = x + block.mlp(block.mlp_norm(x))
  return mask, inputs, outputs


def align_loss_fn(student_graphdef, teacher_graphdef) -> LossFn:
  """Sum over real tokens and layers of the mean squared difference between the student's and the
  teacher's attention outputs, both fed the teacher's hidden states: every layer trains at once
  and on its own. Also `mse_l` and `target_l` (the teacher output's mean square) per layer, so
  mse_l / target_l is each layer's relative error."""

  def prepare(teacher_params, b):
    mask, inputs, outputs = teacher_attention_io(nnx.merge(teacher_graphdef, teacher_params), b)
    return {'mask': mask, 'inputs': inputs, 'outputs': outputs}

  def loss(params, t, b):
    student = nnx.merge(student_graphdef, params)
    w = (b['segment_ids'] > 0).astype(jnp.float32)
    sums = {}
    for l, block in enumerate(student.layers):
      out, _ = block.attn(t['inputs'][l], b['positions'], t['mask'])
      target = t['outputs'][l].astype(jnp.float32)
      sums[f'mse_{l}'] = jnp.sum(jnp.mean((out.astype(jnp.float32) - target) ** 2, -1) * w)
      sums[f'target_{l}'] = jnp.sum(jnp.mean(target ** 2, -1) * w)
    sums['loss'] = sum(sums[f'mse_{l}'] for l in range(len(student.layers)))
    sums['count'] = sums['tokens'] = jnp.sum(w)
    return sums['loss'], sums

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
