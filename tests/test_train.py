"""Sharded train steps: mesh invariance, accumulation, packing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.conftest import EPS32, f32_bound, forward_ops, max_abs, within
from xecomla import data, sharding
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig
from xecomla.train import losses, optim, steps

TEACHER = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                      hidden_dim=96, max_seq_len=64)


@pytest.fixture(scope='module')
def setup():
  params = transformer.init_params(TEACHER, 0)
  cfg, student, _ = upcycle(TEACHER, params, InitOptions(r_kv=8, r_q=16, d_r=2, round_to=1))
  return params, cfg, student


def batch(b=8, t=32, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.ones((b, t), np.int32)
  seg[:, t // 2:] = 2  # two documents per row
  seg[0, -3:] = 0      # some padding
  pos = np.concatenate([np.arange(t // 2)] * 2)[None].repeat(b, 0).astype(np.int32)
  return {'tokens': rng.integers(0, 64, (b, t)).astype(np.int32), 'positions': pos,
          'segment_ids': seg}


def step_bounds(cfg, params_before, params_after, metrics, tokens=8 * 32):
  """Rounding bounds for one SGD step computed two ways (other mesh, accumulation, remat).

  Loss: a float32 forward of the student and the teacher, then a sum over `tokens` targets.
  Parameters: p - lr * g; g is a backward pass (about twice the forward's reductions) plus the
  sum over tokens and devices; the update is bounded by the largest step taken, plus one
  rounding of the parameter itself.
  """
  ops = forward_ops(cfg.llama, 32, max(cfg.r_kv) + max(cfg.r_q)) + tokens
  loss = f32_bound(abs(float(metrics['loss'])), ops)
  steps_taken = max(jax.tree.leaves(jax.tree.map(lambda a, b: max_abs(np.asarray(a) - np.asarray(b)),
                                                 params_after, params_before)))
  sizes = max(jax.tree.leaves(jax.tree.map(max_abs, params_after)))
  return loss, f32_bound(steps_taken, 2 * ops) + EPS32 * sizes


def param_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: max_abs(np.asarray(x) - np.asarray(y)), a, b)))


def one_step(mesh_shape, setup, accum=1, b=None, trainable='all', tx=None):
  params, cfg, student = setup
  mesh = sharding.make_mesh(*mesh_shape)
  loss = steps.kd_loss_fn(transformer.graphdef(cfg), transformer.graphdef(TEACHER),
                          steps.KDOptions(kl_weight=1.0, ce_weight=0.5))
  # Plain SGD by default: Adam's first step is lr * sign(g), which turns reduction-order noise in
  # near-zero gradients into full-size differences and would hide what is compared here.
  tx = tx or optax.sgd(0.5)
  trainer = steps.make_trainer(loss, tx, model_config=cfg, frozen_config=TEACHER, mesh=mesh,
                               accum=accum, trainable=trainable)
  state = trainer.init_state(jax.device_put(student, trainer.param_shardings))
  state, metrics = trainer.step(state, jax.device_put(params, trainer.frozen_shardings),
                                jax.device_put(b or batch(), trainer.batch_sharding))
  return jax.device_get(state['params']), jax.device_get(metrics), state


def test_eight_devices_are_there():
  assert len(jax.devices()) == 8


def test_one_distillation_step_is_the_same_on_every_mesh(setup):
  ref_params, ref_metrics, _ = one_step((8, 1, 1), setup)
  loss_bound, param_bound = step_bounds(setup[1], setup[2], ref_params, ref_metrics)
  for shape in [(2, 4, 1), (2, 2, 2), (1, 1, 8)]:
    p, m, state = one_step(shape, setup)
    within(abs(m['loss'] - ref_metrics['loss']), loss_bound)
    within(param_diff(p, ref_params), param_bound)
  # The parameters really are sharded on the last mesh (tensor = 8 splits the 8 heads).
  q = state['params']['layers'][0]['attn']['uq']
  assert q.sharding.spec[1] == 'tensor'


def test_gradient_accumulation_equals_one_large_batch(setup):
  p1, m1, _ = one_step((8, 1, 1), setup, accum=1)
  p2, m2, _ = one_step((4, 1, 2), setup, accum=2)
  loss_bound, param_bound = step_bounds(setup[1], setup[2], p1, m1)
  within(abs(m1['loss'] - m2['loss']), loss_bound)
  within(param_diff(p1, p2), param_bound)


def test_attention_only_training_freezes_the_rest(setup):
  p, _, _ = one_step((8, 1, 1), setup, trainable='attention',
                     tx=optim.adamw(lr=1e-2, steps=10, warmup=0, weight_decay=0.01))
  student = setup[2]
  np.testing.assert_array_equal(p['layers'][0]['mlp']['up'], student['layers'][0]['mlp']['up'])
  np.testing.assert_array_equal(p['embed']['embedding'], student['embed']['embedding'])
  assert np.abs(p['layers'][0]['attn']['dkv'] - student['layers'][0]['attn']['dkv']).max() > 0


def test_packed_rows_give_the_same_per_token_loss_as_documents_alone(setup):
  params = setup[0]
  model = transformer.from_params(TEACHER, params)
  rng = np.random.default_rng(5)
  docs = [list(rng.integers(1, 64, n)) for n in (5, 9, 3, 12, 7, 4)]
  ds = data.packed_dataset([{'tokens': np.asarray(d, np.int32)} for d in docs], seq_len=16,
                           batch_size=len(docs), seed=0)
  b = next(iter(ds))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0])  # right padding is unseen
  logits, _ = model(jnp.asarray(b['tokens']), jnp.asarray(b['positions']), jnp.asarray(b['segment_ids']))
  targets, w = losses.next_token_targets(jnp.asarray(b['tokens']), jnp.asarray(b['segment_ids']))
  packed_nll = np.asarray(-losses.token_log_probs(logits, targets))
  seen = 0
  for r in range(b['tokens'].shape[0]):
    for s in set(b['segment_ids'][r]) - {0}:
      idx = np.where(b['segment_ids'][r] == s)[0]
      doc = b['tokens'][r, idx]
      alone = forward(state, jnp.asarray(np.pad(doc, (0, 16 - len(doc)))[None]))[:, :len(doc)]
      nll = -np.asarray(losses.token_log_probs(alone, jnp.asarray(np.append(doc[1:], 0)[None])))[0]
      # The same float32 forward over 16 positions, other neighbours masked out (exact zeros).
      within(np.abs(packed_nll[r, idx[:-1]] - nll[:-1]).max(),
             2 * f32_bound(max_abs(logits), forward_ops(TEACHER, 16)))
      assert np.asarray(w)[r, idx[-1]] == 0  # the document's last token predicts nothing
      seen += 1
  assert seen > b['tokens'].shape[0]  # really packed several documents to a row


def test_uneven_dimensions_fall_back_to_replication():
  mesh = sharding.make_mesh(1, 1, 8)
  assert sharding.spec_for((64, 4, 8), ('embed', 'kv_heads', 'head_dim'), mesh) == jax.sharding.PartitionSpec(None, None, None)
  assert sharding.spec_for((64, 8, 8), ('embed', 'heads', 'head_dim'), mesh) == jax.sharding.PartitionSpec(None, 'tensor', None)
  mesh = sharding.make_mesh(2, 4, 1)
  assert sharding.spec_for((64, 172), ('embed', 'mlp'), mesh) == jax.sharding.PartitionSpec('fsdp', None)


def test_bad_mesh_is_named():
  from xecomla.cli import UsageError
  with pytest.raises(UsageError, match='devices, but 8 are available'):
    sharding.make_mesh(3, 1, 1)
  with pytest.raises(UsageError, match='do not divide'):
    sharding.make_mesh(-1, 3, 1)


def test_hidden_state_distillation_of_an_exact_student_is_zero():
  mqa = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=8,
                    hidden_dim=48, max_seq_len=64)
  params = transformer.init_params(mqa, 1)
  cfg, student, _ = upcycle(mqa, params, InitOptions(r_kv=32, r_q=None, d_r=8, round_to=1,
                                                     rope_dims='high_freq'))
  loss = steps.kd_loss_fn(transformer.graphdef(cfg), transformer.graphdef(mqa),
                          steps.KDOptions(hidden_weight=1.0))
  trainer = steps.make_trainer(loss, optax.sgd(0.1), model_config=cfg, frozen_config=mqa,
                               mesh=sharding.make_mesh(8, 1, 1))
  _, m = trainer.step(trainer.init_state(student), params, batch())
  # The student is exact up to float32 rounding: its residual streams are off by at most h_err
  # (scale: the teacher's largest |h|), so the per-token mean squared difference is <= h_err^2;
  # its logits by at most l_err, so the per-token KL, sum_v p_t (log p_t - log p_s), by 2 l_err.
  logits, _, hidden = transformer.from_params(mqa, params)(jnp.asarray(batch()['tokens']),
                                                           return_hidden=True)
  ops = forward_ops(mqa, 32, 32)
  h_err = f32_bound(max(max_abs(h) for h in hidden), ops)
  l_err = f32_bound(max_abs(logits), ops + mqa.vocab_size)
  within(abs(float(m['hidden'])), h_err ** 2)
  within(abs(float(m['loss'])), 2 * l_err + h_err ** 2)


def test_rematerialised_blocks_give_the_same_step(setup):
  params, cfg, student = setup
  results = []
  for remat in (False, True):
    loss = steps.kd_loss_fn(transformer.graphdef(cfg, remat=remat), transformer.graphdef(TEACHER),
                            steps.KDOptions())
    trainer = steps.make_trainer(loss, optax.sgd(0.5), model_config=cfg, frozen_config=TEACHER,
                                 mesh=sharding.make_mesh(8, 1, 1))
    state, m = trainer.step(trainer.init_state(student), params, batch())
    results.append((jax.device_get(state['params']), float(m['loss'])))
  # Rematerialisation recomputes the same products, possibly fused differently.
  loss_bound, param_bound = step_bounds(cfg, student, results[0][0], {'loss': results[0][1]})
  within(abs(results[0][1] - results[1][1]), loss_bound)
  within(param_diff(results[0][0], results[1][0]), param_bound)
