"""On-policy distillation (generalised KD, Agarwal et al. 2024): every step, a fraction of the batch's
rows is sampled from the current student and scored, like the data rows, by the teacher's
token-level divergence (distill.divergence: forward KL, reverse KL or generalised JSD).

`make_sampler` compiles one function on the train step's mesh: the student's parameters in their
training shardings, the data rows and the step number in; the data rows followed by `rows` new
BOS-started rows of `seq_len` tokens out, in the step's batch sharding. The new rows are decoded
through the student's own (latent) cache by `rollout.sample_rows`, each from the key
fold_in(fold_in(seed key, 1), step * rows + r), so a resumed run samples what the uninterrupted one
did. No gradient flows through the sampling: the rows are data to the step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from xecomla import rollout, sharding
from xecomla.cli import UsageError
from xecomla.generate import Sampling
from xecomla.models import transformer


def policy_rows(batch_size: int, fraction: float) -> int:
  """Rows of each batch sampled from the student: round(fraction x batch), at least 1 when the
  fraction is above 0, and fewer than the whole batch."""
  if not 0.0 <= fraction < 1.0:
    raise UsageError(f'distill.policy_fraction={fraction} must be in [0, 1): the share of each '
                     'batch sampled from the student (0 = off; some rows stay data).')
  if fraction == 0.0:
    return 0
  n = max(1, round(fraction * batch_size))
  if n >= batch_size:
    raise UsageError(f'distill.policy_fraction={fraction} leaves no data row in a batch of '
                     f'{batch_size}: lower it or raise train.batch_size.')
  return n


def make_sampler(student_config, model_kwargs: dict, trainer, *, rows: int, seq_len: int,
                 sampling: Sampling, seed: int) -> Callable:
  """(params, data batch [B - rows, T], step) -> batch [B, T] (module docstring)."""
  graphdef = transformer.graphdef(student_config, **model_kwargs)
  llama = student_config.llama
  eos = tuple(llama.eos_ids)

  def fn(params, data, step):
    ids = (step * rows + jnp.arange(rows)).astype(jnp.uint32)
    keys = rollout.row_keys(jax.random.fold_in(jax.random.key(seed), 1), ids)
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    policy = rollout.sample_rows(model, keys, seq_len, sampling, llama.bos_id, eos)
    out = {k: jnp.concatenate([data[k], policy[k].astype(data[k].dtype)], axis=0) for k in data}
    return jax.lax.with_sharding_constraint(out, trainer.batch_sharding)

  rep = sharding.replicated(trainer.mesh)
  jitted = sharding.UnderMesh(jax.jit(fn, in_shardings=(trainer.param_shardings,
                                                        trainer.batch_sharding, rep),
                                      out_shardings=trainer.batch_sharding), trainer.mesh)
  return lambda params, data, step: jitted(params, data, jnp.asarray(step, jnp.int32))
