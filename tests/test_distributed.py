"""The multi-host runtime without several processes: the flags, jax's cluster detection (join
only a cluster of several processes), and each process's grain iterator state in checkpoints.
The runs over several processes are in tests/test_multihost.py."""

import os

import numpy as np
import pytest

from xecomla import ckpt, data, distributed
from xecomla.cli import UsageError

SLURM = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node1', 'SLURM_PROCID': '0',
         'SLURM_LOCALID': '0'}


def test_multihost_flags_go_together_and_a_cluster_is_joined_only_with_several_processes(
    monkeypatch):
  for bad, words in (((None, 2, 0), 'go together'), (('10.0.0.1', 2, 0), 'HOST:PORT'),
                     (('10.0.0.1:1234', 2, 2), 'process_id=2 must be in 0..1')):
    with pytest.raises(UsageError, match=words):
      distributed.check(distributed.Options(*bad))
  for name in SLURM:
    monkeypatch.delenv(name, raising=False)
  assert distributed.detected_cluster() is None  # no cluster around: a plain single process
  for name, value in SLURM.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert distributed.detected_cluster() is None  # one SLURM task: nothing to join
  monkeypatch.setenv('SLURM_NTASKS', '4')
  assert distributed.detected_cluster() == 'SlurmCluster'


def test_iterator_state_is_saved_per_process_and_older_json_states_still_resume(tmp_path):
  examples = [{'tokens': np.arange(n, dtype=np.int32)} for n in range(3, 16)]
  ds = data.packed_dataset(examples, seq_len=16, batch_size=2, seed=0)
  it = iter(ds)
  next(it), next(it)
  params = {'w': np.ones(3, np.float32)}
  abstract = {'params': ckpt.abstract_like(params)}
  new, old = (ckpt.StageCheckpoints(str(tmp_path / n), async_save=False) for n in ('new', 'old'))
  new.save(1, params=params, meta={}, data=it)              # grain's handler, one file a process
  old.save(1, params=params, meta={}, data=it.get_state())  # the JSON item of older checkpoints
  want = next(it)['tokens']  # the batch after the saved state
  assert 'process_0-of-1.json' in os.listdir(os.path.join(new.step_dir(1), 'data'))
  for cks in (new, old):
    cks.close()
    cks = ckpt.StageCheckpoints(cks.directory, async_save=False)  # a rerun
    fresh = iter(ds)
    out = cks.restore(1, abstract=abstract, items=('params', 'data'), iterator=fresh)
    if isinstance(out['data'], dict):  # what loop.run does with an older checkpoint
      fresh.set_state(out['data'])
    np.testing.assert_array_equal(next(fresh)['tokens'], want)
    assert cks.save(2, params=params, meta={}, data=fresh)  # and it goes on saving
    cks.close()
