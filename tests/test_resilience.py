"""Runs that are stopped, killed, handed damaged checkpoints or diverge, on the real stories260K
model through the command line: SIGTERM exits 75 after checkpointing, SIGKILL at any moment
resumes bit-identically, a damaged latest checkpoint falls back to the previous one, a
non-finite loss exits 3 without writing a checkpoint after the last good step.

Kill points come from the test-only XECOMLA_FAULT hook (xecomla/faults.py), not from timing. Init
runs once per module; every subprocess shares one persistent XLA compilation cache.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import STORIES_CONFIG, require_shared_data
from xecomla import ckpt, faults, workdir as wd
from xecomla.cli import EXIT_DIVERGED, EXIT_PREEMPTED

SMALL = [STORIES_CONFIG, '--config.train.seq_len=64',
         '--config.train.batch_size=8', '--config.train.log_every=1', '--config.eval.max_docs=20']


def distill(steps=6, ckpt_every=2, keep=3, *more):
  return ['--config.stages=init,distill', f'--config.train.steps={steps}',
          f'--config.train.ckpt_every={ckpt_every}', f'--config.train.keep={keep}', *more]


DISTILL = distill()
PREEMPTED = 'preempted at step {}; rerun the same command to resume'


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('xla_cache'))
  e = {k: v for k, v in os.environ.items() if k != faults.ENV}
  # one CPU device (conftest forces 8 for the mesh tests): a quarter faster to trace and compile
  e['XLA_FLAGS'] = ' '.join(f for f in e.get('XLA_FLAGS', '').split()
                            if not f.startswith('--xla_force_host_platform_device_count'))
  e.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return e


def main(env, workdir, *flags, fault=None):
  e = dict(env, **({faults.ENV: fault} if fault else {}))
  return subprocess.run([sys.executable, '-m', 'xecomla.main', *SMALL, f'--workdir={workdir}',
                         *flags], capture_output=True, text=True, env=e)


def last_line(r):
  return r.stderr.strip().splitlines()[-1]


@pytest.fixture(scope='module')
def init_dir(tmp_path_factory, env):
  require_shared_data()
  d = str(tmp_path_factory.mktemp('res') / 'init')
  r = main(env, d, '--config.stages=init')
  assert r.returncode == 0, r.stderr[-3000:]
  return d


def copy(src, tmp_path, name='w'):
  d = str(tmp_path / name)
  shutil.copytree(src, d)
  return d


def params_of(workdir, stage='distill'):
  return wd.load_student_from(workdir, stage)[1]


def metrics_of(workdir, stage='distill'):
  lines = [json.loads(l) for l in open(os.path.join(workdir, stage, 'metrics.jsonl'))]
  return [(l['step'], l['loss']) for l in lines]


@pytest.fixture(scope='module')
def reference(init_dir, env, tmp_path_factory):
  """An uninterrupted distillation, checkpointed at every step: its directory, final parameters
  and logged (step, loss)."""
  d = copy(init_dir, tmp_path_factory.mktemp('ref'))
  r = main(env, d, *distill(ckpt_every=1, keep=6))
  assert r.returncode == 0, r.stderr[-3000:]
  assert [s for s, _ in metrics_of(d)] == [1, 2, 3, 4, 5, 6]
  return d, params_of(d), metrics_of(d)


def assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def assert_same_as_reference(d, reference):
  _, params, metrics = reference
  assert_same_params(params, params_of(d))
  assert metrics_of(d) == metrics  # every step once, the same losses


def assert_latest_matches_reference(d, reference):
  """The checkpoint a rerun would resume from holds the uninterrupted run's state at its step."""
  cks = wd.checkpoints(d, 'distill')
  step = cks.latest_valid_step(('params', 'opt', 'data', 'meta'))
  cks.close()
  if step is not None:
    assert_same_params(wd.load_student_from(reference[0], 'distill', step)[1],
                       wd.load_student_from(d, 'distill', step)[1])
  return step


def test_sigterm_during_distillation_checkpoints_exits_75_and_resumes(init_dir, env, reference,
                                                                      tmp_path):
  d = copy(init_dir, tmp_path)
  r = main(env, d, *DISTILL, fault='sigterm:after_step:3')
  assert r.returncode == EXIT_PREEMPTED, r.stderr[-3000:]
  assert last_line(r) == PREEMPTED.format(3)
  assert 'Traceback' not in r.stderr
  cks = wd.checkpoints(d, 'distill')
  assert cks.latest_step() == 3 and cks.check(3, ('params', 'opt', 'data', 'meta')) is None
  cks.close()
  assert assert_latest_matches_reference(d, reference) == 3
  r = main(env, d, *DISTILL)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resuming from step 3' in r.stderr
  assert_same_as_reference(d, reference)


def test_sigterm_during_dpo_checkpoints_and_exits_75(init_dir, env, tmp_path):
  d = copy(init_dir, tmp_path)
  r = main(env, d, '--config.stages=init,dpo', '--config.dpo.steps=4', '--config.dpo.batch_size=4',
           '--config.dpo.max_len=128', '--config.dpo.max_prompt_len=96',
           '--config.dpo.eval_pairs=0', '--config.train.ckpt_every=10', fault='sigterm:after_step:2')
  assert r.returncode == EXIT_PREEMPTED, r.stderr[-3000:]
  assert last_line(r) == PREEMPTED.format(2)
  cks = wd.checkpoints(d, 'dpo')
  assert cks.all_steps() == [2] and cks.check(2, ('params', 'opt', 'data', 'meta')) is None
  cks.close()


def test_sigkill_at_any_moment_resumes_bit_identical(init_dir, env, reference, tmp_path):
  """Killed inside a step, while a checkpoint is written, after a step; each rerun resumes from
  the last complete checkpoint (the uninterrupted run's state at that step, bit for bit) and the
  last one ends bit-identical, with every step logged once."""
  d = copy(init_dir, tmp_path)
  for fault in ('sigkill:inside_step:3', 'sigkill:during_save:4', 'sigkill:after_step:5'):
    r = main(env, d, *DISTILL, fault=fault)
    assert r.returncode == -signal.SIGKILL, (fault, r.stderr[-3000:])
    step = assert_latest_matches_reference(d, reference)
    if 'during_save' in fault:  # all of step 4 written, not committed: an orbax tmp directory
      names = os.listdir(os.path.join(d, 'distill', 'ckpt'))
      assert step == 2 and '4' not in names and any(n.startswith('4.') for n in names), names
  r = main(env, d, *DISTILL)
  assert r.returncode == 0, r.stderr[-3000:]
  assert_same_as_reference(d, reference)


def test_damaged_latest_checkpoints_fall_back_with_a_warning(reference, env, tmp_path):
  d = copy(reference[0], tmp_path)
  ck = os.path.join(d, 'distill', 'ckpt')
  data_dir = os.path.join(ck, '6', 'params', 'ocdbt.process_0', 'd')
  biggest = max(os.listdir(data_dir), key=lambda n: os.path.getsize(os.path.join(data_dir, n)))
  with open(os.path.join(data_dir, biggest), 'r+b') as f:
    f.truncate(100)  # step 6: a file cut short
  shutil.rmtree(os.path.join(ck, '5', 'opt'))  # step 5: an item missing
  r = main(env, d, *DISTILL)
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [l for l in r.stderr.splitlines() if ' is unusable (' in l]
  assert len(warnings) == 2, r.stderr[-3000:]
  assert f'ckpt/6 is unusable (params/ocdbt.process_0/d/{biggest} is 100 bytes' in warnings[0]
  assert "ckpt/5 is unusable (item 'opt' is missing): trying step 4" in warnings[1]
  assert 'resuming from step 4' in r.stderr and 'Traceback' not in r.stderr
  assert_same_as_reference(d, reference)


def test_a_damaged_checkpoint_with_no_predecessor_is_a_clear_error(init_dir, tmp_path):
  d = copy(init_dir, tmp_path)
  os.remove(os.path.join(d, 'init', 'ckpt', '0', 'params', 'manifest.ocdbt'))
  with pytest.raises(ckpt.NoValidCheckpoint, match=r"step 0: params/manifest.ocdbt is missing"):
    wd.load_student_from(d, 'init')


def test_non_finite_loss_exits_3_and_keeps_the_last_good_checkpoint(reference, env, tmp_path):
  d = copy(reference[0], tmp_path)
  before = ckpt.manifest_of(os.path.join(d, 'distill', 'ckpt', '6'))
  # resumes from step 6 of 10: step 7 explodes the parameters, 8-10 are not finite
  r = main(env, d, *distill(10, 2, 3, '--config.train.lr=1e12'))
  assert r.returncode == EXIT_DIVERGED, r.stderr[-3000:]
  assert last_line(r) == ('non-finite loss at steps 8-10 (3 in a row): the learning rate '
                          '(train.lr=1e+12) is likely too high, or the data holds a bad batch; '
                          'the last good checkpoint is step 6')
  assert 'Traceback' not in r.stderr
  cks = wd.checkpoints(d, 'distill')
  assert cks.latest_step() == 6 and cks.all_steps() == [1, 2, 3, 4, 5, 6]
  cks.close()
  assert ckpt.manifest_of(os.path.join(d, 'distill', 'ckpt', '6')) == before
  logged = [json.loads(l) for l in open(os.path.join(d, 'distill', 'metrics.jsonl'))]
  assert [(l['step'], l['skipped']) for l in logged[6:]] == [(7, 0.0), (8, 1.0), (9, 1.0)]


def test_sigterm_handler_lives_only_inside_the_loop_and_processes_agree(monkeypatch):
  previous = signal.getsignal(signal.SIGTERM)
  with faults.Preemption() as p:
    assert not p.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.requested()
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    gathered = []
    monkeypatch.setattr(faults.multihost_utils, 'process_allgather',
                        lambda x: gathered.append(x) or np.array([0, 1]))
    p.signalled = False
    assert p.requested() and gathered  # another process was signalled: stop here too
  assert signal.getsignal(signal.SIGTERM) is previous


def test_non_finite_guard_counts_steps_in_a_row():
  g = faults.NonFiniteGuard(3)
  for step, skipped in enumerate([0, 1, 1, 0, 1, 1], start=1):
    g.push(step, np.float32(skipped))
  assert not g.settle(6) and g.streak == [5, 6] and g.last_skipped
  g.push(7, np.float32(1))
  assert g.settle(7) and g.streak == [5, 6, 7]
