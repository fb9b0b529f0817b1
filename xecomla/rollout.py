"""Whole documents sampled from a model inside jit, for training data: the teacher-generated stories
(`teacher_data`) and on-policy distillation (`train/onpolicy`) both draw their rows here.

A row starts at BOS (position 0) and is decoded token by token through the model's cache (the
student's holds only its latent and shared RoPE key) until `length` tokens. Row r of a call draws
with its own key, fold_in(key, row_ids[r]), one fold per position, so a row's sample depends only on
the key, its id and the model: not on the batch it is decoded in, nor on the devices. A row stops
at its first stop token: an EOS is kept (the model learns to end), a BOS is not (in llama2.c-style
data every document starts with BOS and none ends with EOS, so a BOS is where the next one would
begin). What follows the stop is padding: segment 0, never a target, never attended to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xecomla import sharding
from xecomla.generate import Sampling, sample
from xecomla.models import kvcache


def row_keys(key: jax.Array, row_ids: jax.Array) -> jax.Array:
  """One key per row: fold_in(key, row id)."""
  return jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)


WINDOW = 128  # the cache grows by this many slots at a time (sample_rows)


def sample_rows(model, keys: jax.Array, length: int, sampling: Sampling, bos_id: int,
                eos_ids: tuple[int, ...], window: int = WINDOW) -> dict[str, jax.Array]:
  """keys [B] -> {'tokens', 'positions', 'segment_ids'} [B, length] int32 (traceable).

  The cache starts with `window` slots and grows by `window` when full, so a step attends over
  the slots written so far rounded up to a window, not all `length` (a decode step's cost grows
  with its cache: measured on stories260K at batch 256, 39 ms a step with 128 slots, 108 ms with
  512); a window is skipped once every row has stopped."""
  b = keys.shape[0]
  ones = jnp.ones((b, 1), jnp.int32)
  cache = kvcache.init_cache(model.config, b, min(window, length), 'auto', model.dtype)
  first = jnp.full((b, 1), bos_id, jnp.int32)
  logits, cache = model(first, jnp.zeros((b, 1), jnp.int32), ones, cache)
  eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

  def draw(row_logits, key, t):
    return sample(row_logits[None], jax.random.fold_in(key, t), sampling)[0]

  def step(carry, t):
    logits, cache, stopped = carry
    token = jax.vmap(draw, (0, 0, None))(logits[:, -1], keys, t)
    is_eos = jnp.any(token[:, None] == eos[None], axis=-1)
    real = ~stopped & (token != bos_id)          # a stop EOS is real, a stop BOS is not
    stopped = stopped | is_eos | (token == bos_id)
    logits, cache = model(token[:, None], jnp.full((b, 1), t, jnp.int32), ones, cache)
    return (logits, cache, stopped), (token, real)

  carry, tokens, real = (logits, cache, jnp.zeros((b,), bool)), [], []
  for start in range(0, length, window):  # positions [start, end): slots 0 .. end - 1
    end = min(start + window, length)
    carry = (carry[0], kvcache.grow(carry[1], end), carry[2])
    start = max(start, 1)  # position 0 is the BOS, fed above
    steps = jnp.arange(start, end, dtype=jnp.int32)
    idle = (jnp.zeros((end - start, b), jnp.int32), jnp.zeros((end - start, b), bool))
    carry, (tok, rl) = jax.lax.cond(jnp.all(carry[2]), lambda c: (c, idle),
                                    lambda c: jax.lax.scan(step, c, steps), carry)
    tokens.append(tok)
    real.append(rl)
  tokens = jnp.concatenate([first] + [x.T for x in tokens], axis=1)
  segment = jnp.concatenate([ones] + [x.T.astype(jnp.int32) for x in real], axis=1)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  return {'tokens': jnp.where(segment > 0, tokens, 0), 'positions': positions * segment,
          'segment_ids': segment}


class Generator:
  """Rows of one seed's stream decoded on a mesh: the model's parameters in `param_shardings`
  (those the trainer gives them, so a teacher too large for one device is decoded where it is
  held), the rows split over the mesh's batch axes, every process calling with the same
  arguments (SPMD); each gets all rows back. Calls are padded to `batch` rows (rounded up to the
  batch axes' devices), so one program serves every call; the padding rows are drawn and dropped.

  A row's tokens depend on its key and id only, on one device as on a data-parallel mesh; over
  fsdp or tensor axes the sums split differently, so a draw at a float-close tie may differ."""

  def __init__(self, graphdef, mesh, param_shardings, *, batch: int, length: int,
               sampling: Sampling, bos_id: int, eos_ids: tuple[int, ...]):
    self.mesh = mesh
    devices = sharding.batch_devices(mesh)
    self.batch = -(-batch // devices) * devices
    self.row_sharding = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)

    def fn(state, seed, ids):
      keys = row_keys(jax.random.key(seed), ids)
      return sample_rows(nnx.merge(graphdef, state), keys, length, sampling, bos_id,
                         tuple(eos_ids))

    self._fn = sharding.UnderMesh(jax.jit(fn, in_shardings=(param_shardings, rep,
                                                            self.row_sharding),
                                          out_shardings=rep), mesh)

  def __call__(self, state, *, seed: int, first_row: int, rows: int) -> list[np.ndarray]:
    """Rows first_row .. first_row + rows - 1 of seed's stream, each cut to its real tokens."""
    if rows > self.batch:
      raise ValueError(f'{rows} rows asked of a generator of {self.batch}')
    ids = np.arange(first_row, first_row + self.batch, dtype=np.uint32)
    seed = sharding.put(np.int32(seed), sharding.replicated(self.mesh))
    out = self._fn(state, seed, sharding.put(ids, self.row_sharding))
    # replicated: every process holds the whole result on each of its devices
    tokens, segment = (np.asarray(out[k].addressable_data(0))[:rows]
                       for k in ('tokens', 'segment_ids'))
    return [row[:int(n)] for row, n in zip(tokens, segment.sum(axis=1))]


def documents(graphdef, state, *, seed: int, first_row: int, rows: int, length: int,
              sampling: Sampling, bos_id: int, eos_ids: tuple[int, ...]) -> list[np.ndarray]:
  """Rows first_row .. first_row + rows - 1 of seed's stream on the default device."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  gen = Generator(graphdef, mesh, sharding.replicated(mesh), batch=rows, length=length,
                  sampling=sampling, bos_id=bos_id, eos_ids=tuple(eos_ids))
  return gen(state, seed=seed, first_row=first_row, rows=rows)
