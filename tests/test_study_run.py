"""One study run (experiments/stories260k/study.run_one) through the product on the real model, at
the tests' small shapes: the student before training is init's and the one after the align stage is
align's, each evaluated once and read back on a rerun, never whichever student came last."""

import json
import os
import shutil
import types

import pytest

from experiments.stories260k import study
from tests.conftest import small_config

SPEC = {'name': 'gap_align_2_s0', 'steps': 2, 'align': True, 'over': {'align.steps': 2}}


@pytest.fixture
def runs(init_dir, tmp_path, monkeypatch):
  """A --runs folder whose run SPEC starts from a copy of the session's init student; the
  study's config is the tests' small one (align.steps from the spec)."""
  monkeypatch.setattr(study, '_RUNS', types.SimpleNamespace(value=str(tmp_path)))
  monkeypatch.setattr(study, '_KEEP', types.SimpleNamespace(value=True))  # rerun: no retraining

  def config_for(over):
    c = small_config(steps=2)
    c.align.steps = over['align.steps']
    return c

  monkeypatch.setattr(study, 'config_for', config_for)
  shutil.copytree(init_dir, tmp_path / SPEC['name'])
  return tmp_path / SPEC['name']


def test_run_evaluates_init_and_align_students_once(runs):
  out = study.run_one(SPEC)
  assert (out['before']['stage'], out['after_align']['stage'], out['after']['stage']) == (
      'init', 'align', 'distill')
  assert out['align']['steps'] == 2 and len(out['align']['relative_mse']) == 5
  assert out['init_report'] == json.load(open(runs / 'init' / 'report.json'))
  assert out['before']['nll'] != out['after_align']['nll']  # two different students

  # a rerun after a stop (no study.json) reads both evaluations back; distill resumes at its end
  os.remove(runs / 'study.json')
  again = study.run_one(SPEC)
  assert again['before'] == out['before'] and again['after_align'] == out['after_align']
  assert again['after']['stage'] == 'distill'

  # the old failure: a run whose "before" was never written, with a later student in its
  # directory (as when a first attempt stopped after align), measured that student as the SVD
  # start; now it refuses
  os.remove(runs / 'study.json')
  os.remove(runs / 'study_before.json')
  with pytest.raises(RuntimeError, match="evaluated the distill student, not init's"):
    study.run_one(SPEC)
