"""Train steps at scale, seen through the compiler: accumulation without repeated work, the KD loss
in sequence chunks, frozen models in bfloat16, DPO with one forward per model."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.conftest import f32_bound, forward_ops, max_abs, within
from xecomla import sharding
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig
from xecomla.train import losses, steps

TEACHER = LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=8, n_kv_heads=4, head_dim=8,
                      hidden_dim=96, max_seq_len=64)
IDS = ('tokens', 'positions', 'segment_ids')


@pytest.fixture(scope='module')
def setup():
  params = transformer.init_params(TEACHER, 0)
  cfg, student, _ = upcycle(TEACHER, params, InitOptions(r_kv=8, r_q=16, d_r=2, round_to=1))
  return params, cfg, student


def batch(b, t, seed=0, vocab=64):
  rng = np.random.default_rng(seed)
  seg = np.ones((b, t), np.int32)
  seg[:, t // 2:] = 2  # two documents per row
  seg[0, -3:] = 0      # some padding
  pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
  return {'tokens': rng.integers(0, vocab, (b, t)).astype(np.int32),
          'positions': pos.astype(np.int32), 'segment_ids': seg}


def kd_trainer(student_cfg, teacher_cfg, mesh, accum=1, opts=steps.KDOptions(), **kw):
  loss = steps.kd_loss_fn(transformer.graphdef(student_cfg), transformer.graphdef(teacher_cfg),
                          opts)
  return steps.make_trainer(loss, optax.sgd(0.1), model_config=student_cfg,
                            frozen_config=teacher_cfg, mesh=mesh, accum=accum, **kw)


def moves_data(compiled) -> set[str]:
  """The collectives in compiled HLO that move rows or parameters between devices (all but the
  all-reduce of the gradient and the metrics)."""
  return set(re.findall(r'all-gather|all-to-all|collective-permute', compiled.as_text()))


def compiled_kd_step(student_cfg, teacher_cfg, mesh, b, t, accum=1, opts=steps.KDOptions()):
  """The KD step compiled for abstract inputs (nothing allocated or run)."""
  trainer = kd_trainer(student_cfg, teacher_cfg, mesh, accum, opts)
  state = jax.eval_shape(trainer.init_state, trainer.abstract_params)
  rows = {k: jax.ShapeDtypeStruct((b, t), jnp.int32) for k in IDS}
  return trainer.step.lower(state, trainer.abstract_frozen, rows).compile()


# --- 1. Gradient accumulation: a micro-step does 1/accum of the work, no rows move ---

def test_accumulation_splits_each_devices_rows_and_moves_no_data(setup):
  _, cfg, student = setup
  mesh = sharding.make_mesh(8, 1, 1)  # pure data parallel: every parameter is replicated
  one, four = (compiled_kd_step(cfg, TEACHER, mesh, 64, 32, accum=a) for a in (1, 4))
  quarter = compiled_kd_step(cfg, TEACHER, mesh, 16, 32, accum=1)
  for c in (one, four):
    assert not moves_data(c)  # only the gradient all-reduce crosses devices
  f1, f4, fq = (c.cost_analysis()['flops'] for c in (one, four, quarter))
  # XLA counts a while-loop body once, so f4 = one micro-step (16 rows) + the work outside the
  # loop. f(B) = B/16 * R + P for accum 1, with P the work that does not scale with rows (the
  # optimiser update, the normalisation and norm of the gradient: elementwise over the
  # parameters), measured from the two accum-1 figures. A micro-step that does its quarter then
  # gives f4 = f1/4 + 3P/4, plus the loop's own work: one add per trainable parameter to
  # accumulate the gradient (with accum 1 XLA folds the add to zeros away) and a few scalar
  # sums (64 is ample for those). The old split (each micro-batch gathered) gave f4 ~= f1.
  n_trainable = sum(x.size for x in jax.tree.leaves(student))
  p = (4 * fq - f1) / 3
  assert 0 <= p < 0.01 * f1  # so "about a quarter" means within 1% of f1 / 4
  within(abs(f4 - (f1 / 4 + 3 * p / 4)), n_trainable + 64)


# --- 2. The KD loss in chunks of the sequence ---

def test_chunked_kd_loss_and_gradients_equal_whole_rows(setup):
  params, cfg, student = setup
  b = {k: jnp.asarray(v) for k, v in batch(4, 32, seed=1).items()}
  results = []
  for chunk in (0, 12):  # 12 does not divide 32: the last chunk is padded
    opts = steps.KDOptions(kl_weight=1.0, ce_weight=0.5, temperature=2.0, hidden_weight=0.5,
                           chunk=chunk)
    loss = steps.kd_loss_fn(transformer.graphdef(cfg), transformer.graphdef(TEACHER), opts)
    (value, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(student, params, b)
    results.append((float(value), jax.device_get(sums), jax.device_get(grads)))
  (v0, s0, g0), (v1, s1, g1) = results
  assert s0['tokens'] == s1['tokens']
  # The same logits, each a dot product over dim (possibly blocked differently for a chunk), then
  # log-softmaxes over the vocabulary, then sums over the targets in another order.
  ops = forward_ops(cfg.llama, 32, max(cfg.r_kv) + max(cfg.r_q)) + 2 * TEACHER.vocab_size + 4 * 32
  within(abs(v0 - v1), f32_bound(abs(v0), ops))
  within(abs(float(s0['kl'] - s1['kl'])), f32_bound(float(s0['kl']), ops))
  within(abs(float(s0['hidden'] - s1['hidden'])), f32_bound(float(s0['hidden']), ops))
  # The backward: about twice the forward's reductions, scaled by the largest gradient.
  scale = max(jax.tree.leaves(jax.tree.map(max_abs, g0)))
  diff = max(jax.tree.leaves(jax.tree.map(lambda x, y: max_abs(x - y), g0, g1)))
  within(diff, f32_bound(scale, 2 * ops))


def test_chunked_kd_step_holds_no_whole_vocabulary_tensor():
  """A tiny-width model with a large vocabulary, where the [B, T, V] logits dominate memory."""
  teacher = LlamaConfig(vocab_size=32768, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                        head_dim=8, hidden_dim=32, max_seq_len=1024, tie_embeddings=True)
  cfg, _, _ = upcycle(teacher, transformer.init_params(teacher, 0),
                      InitOptions(r_kv=4, r_q=None, d_r=2, round_to=1))
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  whole, chunked = (compiled_kd_step(cfg, teacher, mesh, 2, 1024, opts=steps.KDOptions(chunk=c))
                    for c in (0, 128))
  logits_buffer = 'f32[2,1024,32768]'
  assert logits_buffer in whole.as_text()
  assert logits_buffer not in chunked.as_text()
  t_whole, t_chunked = (c.memory_analysis().temp_size_in_bytes for c in (whole, chunked))
  logits_bytes = 2 * 1024 * 32768 * 4
  print(f'KD step temporaries: whole rows {t_whole / 2**20:.1f} MiB, chunks of 128 '
        f'{t_chunked / 2**20:.1f} MiB; one [2, 1024, 32768] float32 tensor '
        f'{logits_bytes / 2**20:.0f} MiB')
  # Whole rows hold at least one full logits tensor at a time; chunks of 128 hold each chunk's
  # handful of [2, 128, V] tensors (an eighth each), so the whole-vocabulary tensors are gone.
  assert t_whole >= logits_bytes
  assert t_chunked <= t_whole - logits_bytes


# --- 3. Frozen models stored in bfloat16 ---

def test_bfloat16_teacher_is_stored_as_such_and_distils_like_the_float32_one(setup):
  params, cfg, student = setup
  mesh = sharding.make_mesh(8, 1, 1)
  rows = batch(8, 32)
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), params)
  loss, trainers = {}, {d: kd_trainer(cfg, TEACHER, mesh, frozen_dtype=d)
                        for d in (jnp.float32, jnp.bfloat16)}
  for dtype, teacher in ((jnp.float32, params), (jnp.float32, rounded), (jnp.bfloat16, params)):
    trainer = trainers[dtype]
    frozen = trainer.put_frozen(teacher)  # cast on the host, then placed
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(dtype)}
    assert {x.dtype for x in jax.tree.leaves(trainer.abstract_frozen)} == {jnp.dtype(dtype)}
    state = trainer.init_state(jax.device_put(student, trainer.param_shardings))
    _, m = trainer.step(state, frozen, jax.device_put(rows, trainer.batch_sharding))
    loss[jnp.dtype(dtype).name, teacher is rounded] = float(m['loss'])
  assert np.isfinite(loss['bfloat16', False])
  # Compute stays float32 and bfloat16 -> float32 is exact, so the bfloat16-stored teacher is the
  # float32 teacher holding the rounded weights: the same float32 forward and KL sum.
  ops = forward_ops(cfg.llama, 32, max(cfg.r_kv) + max(cfg.r_q)) + 2 * TEACHER.vocab_size + 8 * 32
  within(abs(loss['bfloat16', False] - loss['float32', True]),
         f32_bound(loss['float32', True], ops))
  # Against the float32 weights: rounding a weight to bfloat16 changes it by at most u = 2^-8
  # relative, so each weight tensor on a logit's path (per layer two norms, q, k, v, o, gate, up,
  # down; then embedding, final norm, head) shifts it by at most u * |logit| to first order:
  # delta. Then |log p_t' - log p_t| <= 2 delta and |p_t' - p_t| <= (e^(2 delta) - 1) p_t, and
  # KL(p_t' || p_s) - KL(p_t || p_s) = sum (p_t' - p_t)(r - KL) + KL(p_t' || p_t) with
  # r = log p_t - log p_s, so per token it moves by <= (e^(2 delta) - 1) E_pt|r - KL| +
  # (e^(2 delta) - 1)^2 (KL <= chi-square); so does the mean over the target tokens.
  ids = [jnp.asarray(rows[k]) for k in IDS]
  logits = lambda c, p: jax.jit(lambda p: transformer.from_params(c, p)(*ids)[0])(p)
  t_logits = logits(TEACHER, params)
  log_pt = jax.nn.log_softmax(t_logits)
  r = log_pt - jax.nn.log_softmax(logits(cfg, student))
  kl = jnp.sum(jnp.exp(log_pt) * r, -1, keepdims=True)
  spread = jnp.sum(jnp.exp(log_pt) * jnp.abs(r - kl), -1)
  _, w = losses.next_token_targets(ids[0], ids[2])
  delta = f32_bound(max_abs(t_logits), 9 * TEACHER.n_layers + 3, eps=2.0 ** -8)
  # The measured shift of the teacher's logits stays within that first-order bound.
  moved = logits(TEACHER, rounded)
  within(max_abs(moved - t_logits), delta)
  g = np.expm1(2 * delta)
  within(abs(loss['bfloat16', False] - loss['float32', False]),
         g * float(jnp.sum(spread * w) / jnp.sum(w)) + g * g)


# --- 4. DPO: chosen and rejected in one forward, the reference once per batch ---

def pair_batch(b, t, seed=0):
  rng, out = np.random.default_rng(seed), {}
  for name in ('chosen', 'rejected'):
    n = rng.integers(t // 2, t + 1, b)  # real lengths; the rest is padding
    seg = (np.arange(t)[None] < n[:, None]).astype(np.int32)
    mask = ((np.arange(t)[None] >= 3) & (np.arange(t)[None] < n[:, None] - 1)).astype(np.int32)
    out[f'{name}_tokens'] = (rng.integers(1, 64, (b, t)) * seg).astype(np.int32)
    out[f'{name}_positions'] = (np.arange(t)[None] * seg).astype(np.int32)
    out[f'{name}_segment_ids'] = seg
    out[f'{name}_loss_mask'] = mask
  return {k: jnp.asarray(v) for k, v in out.items()}


def four_forward_dpo_sums(graphdef, params, ref_params, b, beta):
  """The DPO loss as it was: policy and reference, chosen and rejected, one forward each."""
  def logps(p, prefix):
    logits, _ = nnx.merge(graphdef, p)(*(b[prefix + k] for k in IDS))
    return losses.sequence_log_probs(logits, b[prefix + 'tokens'], b[prefix + 'segment_ids'],
                                     b[prefix + 'loss_mask'])
  per_pair, chosen, rejected = losses.dpo_losses(
      logps(params, 'chosen_'), logps(params, 'rejected_'), logps(ref_params, 'chosen_'),
      logps(ref_params, 'rejected_'), beta)
  return {'loss': jnp.sum(per_pair), 'chosen_reward': jnp.sum(chosen),
          'rejected_reward': jnp.sum(rejected)}


def test_dpo_runs_each_model_once_and_equals_four_forwards(setup, monkeypatch):
  _, cfg, student = setup
  ref = jax.tree.map(lambda x: x * 1.05, student)  # a reference that differs from the policy
  graphdef, beta, b = transformer.graphdef(cfg), 0.5, pair_batch(4, 24)
  loss = steps.dpo_loss_fn(graphdef, beta)
  calls, forward = [], transformer.Transformer.__call__
  monkeypatch.setattr(transformer.Transformer, '__call__',
                      lambda self, *a, **k: calls.append(a[0].shape) or forward(self, *a, **k))
  jax.make_jaxpr(loss)(student, ref, b)
  assert calls == [(8, 24), (8, 24)]  # the reference, then the policy, each on all 2 x 4 rows
  monkeypatch.undo()
  _, sums = jax.jit(loss)(student, ref, b)
  old = jax.jit(four_forward_dpo_sums, static_argnums=(0, 4))(graphdef, student, ref, b, beta)
  # Each row's logits are the same float32 forward over 24 positions (other rows beside it):
  # they may differ by eps * |logit| * forward_ops; a log-softmax over the vocabulary doubles
  # that, a row's log-prob sums <= 24 of them (plus its own rounding), and a reward is beta
  # times a difference of two; the loss sums 4 pairs of -log sigmoid (slope <= 1) of two rewards.
  logits, _ = transformer.from_params(cfg, student)(b['chosen_tokens'])
  per_logit = f32_bound(max_abs(logits) + np.log(64), forward_ops(cfg.llama, 24, 24) + 64)
  logp_err = 24 * 2 * per_logit
  reward_err = 4 * beta * 2 * logp_err
  within(abs(float(sums['chosen_reward'] - old['chosen_reward'])), reward_err)
  within(abs(float(sums['rejected_reward'] - old['rejected_reward'])), reward_err)
  within(abs(float(sums['loss'] - old['loss'])), 2 * reward_err + f32_bound(float(old['loss']), 8))


def test_dpo_step_on_a_sharded_batch_moves_no_pairs(setup):
  _, cfg, _ = setup
  mesh = sharding.make_mesh(8, 1, 1)
  trainer = steps.make_trainer(steps.dpo_loss_fn(transformer.graphdef(cfg), 0.1), optax.sgd(0.1),
                               model_config=cfg, frozen_config=cfg, mesh=mesh)
  state = jax.eval_shape(trainer.init_state, trainer.abstract_params)
  pairs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in pair_batch(8, 16).items()}
  compiled = trainer.step.lower(state, trainer.abstract_frozen, pairs).compile()
  # Interleaving keeps each device's pairs on it (concatenating chosen and rejected instead
  # makes XLA exchange rows with an all-to-all).
  assert not moves_data(compiled)
