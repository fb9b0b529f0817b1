"""Jit-compiled train steps over a device mesh. A step kind differs only in its loss function
(`loss_fns`: kd against a frozen teacher, dpo against a frozen reference, both inside the same
compiled step).

The train state is a plain dict {'step', 'params', 'opt_state'}; the optimiser sees only the
trainable parameters (`trainable`: all, or attention only). A step takes a batch of
`accum` micro-batches, accumulates summed losses and gradients over them with lax.scan and
normalises once by the total count (target tokens for kd, pairs for dpo), so accumulation equals
one large batch. Every device keeps its own rows in every micro-batch (micro-batch j is rows
j, j + accum, ... of each device's block), so accumulation moves no data and each micro-step
does 1/accum of the work. The frozen model is stored in `frozen_dtype` (e.g. bfloat16). A step
whose loss or gradient norm is not finite leaves the state unchanged (metric `skipped` = 1).
State is donated; shardings are explicit for every input and output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from xecomla import sharding
from xecomla.cli import UsageError
from xecomla.models import transformer
from xecomla.train.loss_fns import KDOptions, LossFn, dpo_loss_fn, kd_loss_fn  # noqa: F401

TRAINABLE = ('all', 'attention')


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
  abstract_frozen: Any = None   # ShapeDtypeStructs of the frozen model's, in its storage dtype

  def put_frozen(self, frozen: Any) -> Any:
    """Host parameters of the frozen model -> device arrays in their storage dtype: cast on the
    host (numpy; bfloat16 through ml_dtypes), so no device holds a float32 copy."""
    cast = jax.tree.map(lambda x, a: np.asarray(x).astype(a.dtype, copy=False), frozen,
                        self.abstract_frozen)
    return sharding.put(cast, self.frozen_shardings)  # several processes: addressable shards only


def state_shardings_for(tx, params_abstract, param_shardings, predicate, mesh):
  trainable_abstract, _ = partition(params_abstract, predicate)
  trainable_sh, _ = partition(param_shardings, predicate)
  opt_abstract = jax.eval_shape(tx.init, trainable_abstract)
  rep = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, trainable_sh,
                                 transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  return {'step': rep, 'params': param_shardings, 'opt_state': opt_sh}


def make_trainer(loss_fn: LossFn | Callable, tx: optax.GradientTransformation, *, model_config,
                 frozen_config, mesh, accum: int = 1, trainable: str = 'all',
                 frozen_dtype: Any = None) -> Trainer:
  """Compiles `loss_fn` into a sharded train step. `model_config` describes the trained model,
  `frozen_config` the frozen one (teacher or reference) passed to every step, stored in
  `frozen_dtype` (None: float32). A LossFn's `prepare` runs outside the gradient; a plain
  callable (params, frozen, micro-batch) -> (objective, sums) is differentiated whole."""
  predicate = is_trainable(trainable)
  abstract = transformer.abstract_params(model_config)
  param_sh = sharding.tree_shardings(abstract, transformer.param_axes(model_config), mesh)
  frozen_abstract = transformer.abstract_params(frozen_config)
  if frozen_dtype is not None:
    frozen_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype),
                                   frozen_abstract)
  frozen_sh = sharding.tree_shardings(frozen_abstract, transformer.param_axes(frozen_config), mesh)
  state_sh = state_shardings_for(tx, abstract, param_sh, predicate, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  micro_sh = NamedSharding(mesh, P(None, *batch_sh.spec))  # [accum, rows, ...]: rows sharded
  rep = sharding.replicated(mesh)
  if isinstance(loss_fn, LossFn):
    prepare, loss = loss_fn.prepare, loss_fn.loss
  else:
    prepare, loss = (lambda frozen, mb: frozen), loss_fn

  def init_state(params):
    trainable_params, _ = partition(params, predicate)
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': tx.init(trainable_params)}

  def micro_batches(x):
    # [B, ...] -> [accum, B / accum, ...] with micro-batch j = rows j, j + accum, ...: a device's
    # contiguous block of rows splits into accum blocks of its own (no data moves).
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
    return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), micro_sh)

  def step(state, frozen, batch):
    trainable_params, fixed = partition(state['params'], predicate)
    micro = jax.tree.map(micro_batches, batch)

    def objective(tp, f, mb):
      value, sums = loss(merge(tp, fixed), f, mb)
      return value, sums

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def frozen_outputs(mb):
      return jax.lax.stop_gradient(prepare(frozen, mb))

    def body(carry, mb):
      grads, sums = carry
      mb = jax.lax.with_sharding_constraint(mb, batch_sh)
      (_, s), g = grad_fn(trainable_params, frozen_outputs(mb), mb)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

    zeros = jax.tree.map(jnp.zeros_like, trainable_params)
    first = jax.tree.map(lambda x: x[0], micro)
    sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: objective(trainable_params, frozen_outputs(first), first)[1]))
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
      step=sharding.UnderMesh(jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh),
                                      out_shardings=(state_sh, rep), donate_argnums=(0,)), mesh),
      init_state=jax.jit(init_state, in_shardings=(param_sh,), out_shardings=state_sh),
      state_shardings=state_sh, param_shardings=param_sh, frozen_shardings=frozen_sh,
      batch_sharding=batch_sh, tx=tx, mesh=mesh, abstract_params=abstract,
      abstract_frozen=frozen_abstract)
