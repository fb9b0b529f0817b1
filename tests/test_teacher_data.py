"""Teacher-generated distillation data (xecomla/teacher_data.py): generated once into a cache keyed
by its settings, reused by a rerun, resumed part by part, and mixed with text at a ratio."""

import os
import shutil

import jax
import numpy as np
import pytest

from configs.common import base_config
from tests.conftest import make_hf_llama
from xecomla import data, rollout, sharding, teacher_data


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('teacher') / 'hf')
  make_hf_llama(d)
  return d


def config(tmp, **data_fields):
  c = base_config()
  c.data.teacher_stories = 10
  c.data.teacher_batch = 4
  c.data.teacher_max_len = 16
  c.data.teacher_cache = str(tmp / 'cache')
  for k, v in data_fields.items():
    c.data[k] = v
  return c


ONE = sharding.make_mesh(devices=jax.devices()[:1])


def stories(c, teacher, tmp, mesh=ONE):
  return teacher_data.stories(c, str(tmp / 'w'), teacher, teacher, mesh)


def counting(monkeypatch):
  calls = []
  real = rollout.Generator.__call__

  def wrapped(self, *args, **kwargs):
    calls.append(kwargs['first_row'])
    return real(self, *args, **kwargs)
  monkeypatch.setattr(rollout.Generator, '__call__', wrapped)
  return calls


def test_generated_once_then_read_back(teacher, tmp_path, monkeypatch):
  calls = counting(monkeypatch)
  docs, stats = stories(config(tmp_path), teacher, tmp_path)
  assert calls == [0, 4, 8] and len(docs) == 10
  assert all(d[0] == 1 and 1 <= len(d) <= 16 for d in docs)
  assert sorted(os.listdir(stats['directory'])) == ['done.json', 'part-00000.npz', 'part-00001.npz',
                                                   'part-00002.npz', 'settings.json']
  assert stats['stories_per_s'] > 0 and stats['tokens_per_s'] > 0  # parts 2 and 3 timed
  assert stats['tokens'] == sum(map(len, docs)) and stats['devices'] == 1
  again, _ = stories(config(tmp_path), teacher, tmp_path)
  assert calls == [0, 4, 8]  # nothing generated
  assert all(np.array_equal(a, b) for a, b in zip(docs, again))


def test_an_interrupted_generation_resumes_with_the_same_stories(teacher, tmp_path, monkeypatch):
  docs, stats = stories(config(tmp_path), teacher, tmp_path)
  os.remove(os.path.join(stats['directory'], 'part-00001.npz'))
  os.remove(os.path.join(stats['directory'], 'done.json'))
  calls = counting(monkeypatch)
  # another batch size now: the parts already written keep theirs (settings.json)
  again, _ = stories(config(tmp_path, teacher_batch=8), teacher, tmp_path)
  assert calls == [4]
  assert all(np.array_equal(a, b) for a, b in zip(docs, again))


def test_more_stories_extend_the_cache_and_fewer_read_its_start(teacher, tmp_path, monkeypatch):
  docs, stats = stories(config(tmp_path), teacher, tmp_path)        # 10: parts of 4, 4, 2
  calls = counting(monkeypatch)
  more, more_stats = stories(config(tmp_path, teacher_stories=13), teacher, tmp_path)
  assert more_stats['directory'] == stats['directory']
  assert calls == [8, 12]  # the short last part again, then a new one
  assert len(more) == 13 and all(np.array_equal(a, b) for a, b in zip(docs, more))
  fewer, _ = stories(config(tmp_path, teacher_stories=5), teacher, tmp_path)
  assert calls == [8, 12] and len(fewer) == 5
  assert all(np.array_equal(a, b) for a, b in zip(docs, fewer))


def test_stories_do_not_depend_on_the_batch_but_on_the_settings(teacher, tmp_path):
  docs, stats = stories(config(tmp_path), teacher, tmp_path)
  other, other_stats = stories(config(tmp_path / 'b', teacher_batch=3), teacher, tmp_path / 'b')
  assert all(np.array_equal(a, b) for a, b in zip(docs, other))
  assert os.path.basename(stats['directory']) == os.path.basename(other_stats['directory'])
  for change in (dict(teacher_seed=1), dict(teacher_temperature=0.7), dict(teacher_top_p=0.9)):
    changed, s = stories(config(tmp_path, **change), teacher, tmp_path)
    assert s['directory'] != stats['directory']
    assert not all(np.array_equal(a, b) for a, b in zip(docs, changed))


def test_a_recopied_teacher_keeps_its_cache_and_a_changed_one_does_not(teacher, tmp_path):
  """Small files are named by their bytes: a new mtime (a fresh copy) keeps the key, one changed
  byte of the config gives a new one."""
  copy = str(tmp_path / 'copy')
  shutil.copytree(teacher, copy)
  c = config(tmp_path)
  key_of = lambda: teacher_data.cache_dir(c, '', teacher_data.settings(c, copy, 16))
  key = key_of()
  for name in os.listdir(copy):
    os.utime(os.path.join(copy, name), (1.0, 1.0))
  again = key_of()
  with open(os.path.join(copy, 'config.json'), 'a') as f:
    f.write(' ')
  changed = key_of()
  assert key == again and changed != key


def test_drawn_on_a_mesh_of_eight_devices_as_on_one(teacher, tmp_path):
  """The teacher replicated over data = 8 (rows 4 per call padded to 8) and sharded over
  fsdp 2 x tensor 2 x data 2 (what a teacher too large for one device gets)."""
  docs, _ = stories(config(tmp_path), teacher, tmp_path)
  wide, stats = stories(config(tmp_path / 'd'), teacher, tmp_path / 'd', sharding.make_mesh())
  assert stats['devices'] == 8 and all(np.array_equal(a, b) for a, b in zip(docs, wide))
  split, _ = stories(config(tmp_path / 's'), teacher, tmp_path / 's',
                     sharding.make_mesh(data=2, fsdp=2, tensor=2))
  same = np.mean([np.array_equal(a, b) for a, b in zip(docs, split)])
  # sums split over devices round differently in the last bit: a story changes only where a draw
  # is that close to a tie: each of vocab 97 boundaries moves by ~1e-7 (float32 rounding of
  # values <= 1), ~1e-5 a draw, <= 16 draws ~2e-4 a story; three changed stories of ten, ~1e-9
  assert len(split) == len(docs) and same >= 0.8, same


def test_mixed_with_text_at_the_chosen_ratio():
  seq = 8
  ours = [{'tokens': np.full(seq, 5, np.int32)} for _ in range(7)]
  text = [{'tokens': np.full(seq, 9, np.int32)} for _ in range(13)]
  ds = data.packed_dataset(ours, seq_len=seq, batch_size=4, seed=0, mix=(text, 0.25))
  it = iter(ds)
  rows = np.concatenate([next(it)['tokens'] for _ in range(25)])  # 100 rows of one example each
  share = np.mean(rows[:, 0] == 5)
  assert set(rows[:, 0]) == {5, 9}
  assert abs(share - 0.25) <= 0.02, share  # grain mixes by weight deterministically
