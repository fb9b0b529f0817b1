"""On-policy distillation (xecomla/train/onpolicy.py): rows sampled from the current student on the
step's mesh, deterministic by step (so a resumed run equals an uninterrupted one)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from tests.conftest import small_config
from xecomla import pipeline, rollout, sharding, workdir as wd
from xecomla.cli import UsageError
from xecomla.generate import Sampling
from xecomla.models import transformer
from xecomla.stages import distill
from xecomla.train import onpolicy, steps


@pytest.mark.parametrize('fraction,batch,rows', [(0.0, 16, 0), (0.25, 16, 4), (0.5, 16, 8),
                                                 (0.01, 16, 1)])
def test_policy_rows(fraction, batch, rows):
  assert onpolicy.policy_rows(batch, fraction) == rows


@pytest.mark.parametrize('fraction,message', [(1.0, 'must be in [0, 1)'), (-0.1, 'must be in'),
                                              (0.97, 'leaves no data row')])
def test_policy_rows_refused(fraction, message):
  with pytest.raises(UsageError, match=message.replace('[', r'\[').replace(')', r'\)')):
    onpolicy.policy_rows(16, fraction)


def test_sampler_on_a_mesh_appends_student_rows_deterministically(init_dir):
  cfg, params, _ = wd.load_student_from(init_dir, 'init')
  mesh = sharding.make_mesh(2, 2, 2)
  trainer = steps.make_trainer(lambda p, f, b: (0.0, {'count': 1.0}), distill.optimizer(
      small_config(), 1e-3, 2)[0], model_config=cfg, frozen_config=cfg, mesh=mesh)
  rows, seq = 4, 32
  sampler = onpolicy.make_sampler(cfg, {}, trainer, rows=rows, seq_len=seq,
                                  sampling=Sampling(temperature=1.0), seed=0)
  state = trainer.init_state(sharding.put(params, trainer.param_shardings))
  text = {k: np.full((4, seq), i + 3, np.int32) for i, k in enumerate(('tokens', 'positions',
                                                                       'segment_ids'))}
  data = {k: jax.device_put(v, trainer.batch_sharding) for k, v in text.items()}
  a = sampler(state['params'], data, 7)
  assert a['tokens'].sharding.is_equivalent_to(trainer.batch_sharding, 2)
  for k in text:  # the data rows come first, unchanged
    np.testing.assert_array_equal(np.asarray(a[k])[:4], text[k])
  again, other = sampler(state['params'], data, 7), sampler(state['params'], data, 8)
  np.testing.assert_array_equal(np.asarray(a['tokens']), np.asarray(again['tokens']))
  assert not np.array_equal(np.asarray(a['tokens'])[4:], np.asarray(other['tokens'])[4:])
  # the new rows are the student's own samples for keys (seed, step 7, row r), computed here on
  # one device without the mesh
  keys = rollout.row_keys(jax.random.fold_in(jax.random.key(0), 1),
                          np.arange(7 * rows, 8 * rows, dtype=np.uint32))
  want = rollout.sample_rows(transformer.from_params(cfg, params), keys, seq, Sampling(1.0), 1,
                             tuple(cfg.llama.eos_ids))
  for k in text:
    np.testing.assert_array_equal(np.asarray(a[k])[4:], np.asarray(want[k]))


def test_resumed_on_policy_run_ends_with_the_same_parameters(init_dir, tmp_path):
  dirs = []
  for name in ('a', 'b'):
    dirs.append(str(tmp_path / name))
    shutil.copytree(init_dir, dirs[-1])
  c = small_config(steps=4)
  c.stages = 'distill'
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 1, 4  # rows split over 2 devices: 2 + 6
  c.distill.policy_fraction = 0.25  # 2 of 8 rows
  c.distill.divergence = 'reverse_kl'
  c.train.eval_every, c.train.eval_docs = 2, 4  # held-out NLL during training as well
  out = pipeline.run(c, dirs[0])['distill']
  assert 'div' in out['last']
  c.train.stop_after = 2
  pipeline.run(c, dirs[1])
  c.train.stop_after = 0
  pipeline.run(c, dirs[1])
  pa, pb = (wd.load_student_from(d, 'distill')[1] for d in dirs)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)
  lines = [json.loads(l) for l in open(os.path.join(dirs[1], 'distill', 'metrics.jsonl'))]
  assert lines[-1]['tokens'] > 0 and all('eval_nll' in l for l in lines if l['step'] % 2 == 0)


def test_on_policy_rows_train_with_accumulation_and_hidden_kd(init_dir, tmp_path):
  """The step splits data and student rows into micro-batches like any batch: the first step's
  loss with train.accum = 2 is the one of accum = 1 (same rows: the sampler does not depend on
  accum), hidden-state KD included."""
  c = small_config(steps=1)
  c.stages = 'distill'
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 1, 4
  c.distill.policy_fraction, c.distill.hidden_weight = 0.25, 0.5
  first = []
  for accum in (1, 2):
    d = str(tmp_path / f'accum{accum}')
    shutil.copytree(init_dir, d)
    c.train.accum = accum
    pipeline.run(c, d)
    first.append(json.loads(open(os.path.join(d, 'distill', 'metrics.jsonl')).readline()))
  a, b = first
  assert a['hidden'] > 0 and a['count'] == b['count']
  # the same per-token terms summed in another order: <= n x eps32 relative, n = 8 rows x 64
  np.testing.assert_allclose(b['loss'], a['loss'], rtol=8 * 64 * 1.2e-7)
