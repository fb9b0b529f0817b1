"""Jit-compiled train steps over a device mesh. A step kind differs only in its loss function:

  kd   the student against a frozen teacher running inside the same compiled step
       (KL + CE, optional hidden-state MSE)
  dpo  the policy against a frozen reference (sigmoid DPO)

The train state is a plain dict {'step', 'params', 'opt_state'}; the optimiser sees only the
trainable parameters (`trainable`: all, or attention only). A step takes a batch of
`accum` micro-batches, accumulates summed losses and gradients over them with lax.scan and
normalises once by the total count (target tokens for kd, pairs for dpo), so accumulation equals
one large batch. A step whose loss or gradient norm is not finite leaves the state unchanged
(metric `skipped` = 1). State is donated; shardings are explicit for every input and output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util
from jax.sharding import NamedSharding

from xecomla import sharding
from xecomla.cli import UsageError
from xecomla.models import transformer
from xecomla.train import losses

TRAINABLE = ('all', 'attention')

LossFn = Callable[[Any, Any, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


# ----------------------------------------------------------------------------------------------
# Trainable / frozen split of a parameter tree
# ----------------------------------------------------------------------------------------------

def is_trainable(kind: str) -> Callable[[tuple], bool]:
  if kind not in TRAINABLE:
    raise UsageError(f'train.trainable={kind!r}: choose one of {", ".join(TRAINABLE)}.')
  if kind == 'all':
    return lambda path: True
  return lambda path: 'attn' in path


def partition(params: dict, predicate: Callable[[tuple], bool]) -> tuple[dict, dict]:
  flat = traverse_util.flatten_dict(params)
  keep = {k: v for k, v in flat.items() if predicate(k)}
  rest = {k: v for k, v in flat.items() if not predicate(k)}
  return traverse_util.unflatten_dict(keep), traverse_util.unflatten_dict(rest)


def merge(a: dict, b: dict) -> dict:
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)})


# ----------------------------------------------------------------------------------------------
# Loss functions: (params, frozen model params, micro-batch) -> (objective sum, sums)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KDOptions:
  kl_weight: float = 1.0
  ce_weight: float = 0.0
  temperature: float = 1.0
  hidden_weight: float = 0.0


def kd_loss_fn(student_graphdef, teacher_graphdef, opts: KDOptions) -> LossFn:
  hidden = opts.hidden_weight > 0

  def loss(params, teacher_params, b):
    args = (b['tokens'], b['positions'], b['segment_ids'])
    t_out = nnx.merge(teacher_graphdef, teacher_params)(*args, return_hidden=hidden)
    s_out = nnx.merge(student_graphdef, params)(*args, return_hidden=hidden)
    t_logits = jax.lax.stop_gradient(t_out[0])
    sums = losses.kd_loss_sums(s_out[0], t_logits, b['tokens'], b['segment_ids'],
                               b.get('loss_mask'), kl_weight=opts.kl_weight,
                               ce_weight=opts.ce_weight, temperature=opts.temperature)
    objective = sums['loss']
    if hidden:
      sums['hidden'] = losses.hidden_mse_sum(s_out[2], jax.lax.stop_gradient(t_out[2]),
                                             b['segment_ids'])
      objective = objective + opts.hidden_weight * sums['hidden']
    sums['count'] = sums['tokens']
    return objective, sums

  return loss


def dpo_loss_fn(graphdef, beta: float) -> LossFn:

  def logps(model, b, prefix):
    logits, _ = model(b[prefix + 'tokens'], b[prefix + 'positions'], b[prefix + 'segment_ids'])
    return losses.sequence_log_probs(logits, b[prefix + 'tokens'], b[prefix + 'segment_ids'],
                                     b[prefix + 'loss_mask'])

  def loss(params, ref_params, b):
    policy, ref = nnx.merge(graphdef, params), nnx.merge(graphdef, ref_params)
    pc, pr = logps(policy, b, 'chosen_'), logps(policy, b, 'rejected_')
    rc = jax.lax.stop_gradient(logps(ref, b, 'chosen_'))
    rr = jax.lax.stop_gradient(logps(ref, b, 'rejected_'))
    per_pair, chosen, rejected = losses.dpo_losses(pc, pr, rc, rr, beta)
    sums = {'loss': jnp.sum(per_pair), 'chosen_reward': jnp.sum(chosen),
            'rejected_reward': jnp.sum(rejected), 'reward_accuracy': jnp.sum(chosen > rejected),
            'margin': jnp.sum(chosen - rejected), 'count': jnp.asarray(per_pair.shape[0], jnp.float32)}
    return sums['loss'], sums

  return loss


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Trainer:
  """A compiled step plus what is needed to build, shard and restore its state."""
  step: Callable                # (state, frozen, batch) -> (state, metrics)
  init_state: Callable          # params -> state (sharded)
  state_shardings: Any
  param_shardings: Any
  frozen_shardings: Any
  batch_sharding: NamedSharding
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  abstract_params: Any = None   # ShapeDtypeStructs of the trained model's parameters


def state_shardings_for(tx, params_abstract, param_shardings, predicate, mesh):
  trainable_abstract, _ = partition(params_abstract, predicate)
  trainable_sh, _ = partition(param_shardings, predicate)
  opt_abstract = jax.eval_shape(tx.init, trainable_abstract)
  rep = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, trainable_sh,
                                 transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  return {'step': rep, 'params': param_shardings, 'opt_state': opt_sh}


def make_trainer(loss_fn: LossFn, tx: optax.GradientTransformation, *, model_config,
                 frozen_config, mesh, accum: int = 1, trainable: str = 'all') -> Trainer:
  """Compiles `loss_fn` into a sharded train step. `model_config` describes the trained model,
  `frozen_config` the frozen one (teacher or reference) passed to every step."""
  predicate = is_trainable(trainable)
  abstract = transformer.abstract_params(model_config)
  param_sh = sharding.tree_shardings(abstract, transformer.param_axes(model_config), mesh)
  frozen_sh = sharding.tree_shardings(transformer.abstract_params(frozen_config),
                                      transformer.param_axes(frozen_config), mesh)
  state_sh = state_shardings_for(tx, abstract, param_sh, predicate, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)

  def init_state(params):
    trainable_params, _ = partition(params, predicate)
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': tx.init(trainable_params)}

  def step(state, frozen, batch):
    trainable_params, fixed = partition(state['params'], predicate)
    micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

    def objective(tp, mb):
      value, sums = loss_fn(merge(tp, fixed), frozen, mb)
      return value, sums

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def body(carry, mb):
      grads, sums = carry
      (_, s), g = grad_fn(trainable_params, mb)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

    zeros = jax.tree.map(jnp.zeros_like, trainable_params)
    first = jax.tree.map(lambda x: x[0], micro)
    sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: objective(trainable_params, first)[1]))
    (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), micro)
    count = jnp.maximum(sums['count'], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state['opt_state'], trainable_params)
    new_params = optax.apply_updates(trainable_params, updates)
    metrics = {k: v / count for k, v in sums.items() if k not in ('count', 'tokens')}
    metrics['count'] = sums['count']
    if 'tokens' in sums:
      metrics['tokens'] = sums['tokens']
    metrics['grad_norm'] = optax.global_norm(grads)
    # A non-finite loss or gradient is never applied: parameters and optimiser state stay as they
    # were (the step counter still advances: it counts batches), and `skipped` says so.
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    keep = lambda new, old: jnp.where(finite, new, old)
    new_params = merge(jax.tree.map(keep, new_params, trainable_params), fixed)
    opt_state = jax.tree.map(keep, opt_state, state['opt_state'])
    metrics['skipped'] = 1.0 - finite.astype(jnp.float32)
    return {'step': state['step'] + 1, 'params': new_params, 'opt_state': opt_state}, metrics

  return Trainer(
      step=jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, rep),
                   donate_argnums=(0,)),
      init_state=jax.jit(init_state, in_shardings=(param_sh,), out_shardings=state_sh),
      state_shardings=state_sh, param_shardings=param_sh, frozen_shardings=frozen_sh,
      batch_sharding=batch_sh, tx=tx, mesh=mesh, abstract_params=abstract)
