"""The entry point and its stages on the real stories260K model."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import STORIES_CONFIG, require_shared_data, small_config
from xecomla import pipeline, workdir as wd


def copy(init_dir, tmp_path, name='w'):
  d = str(tmp_path / name)
  shutil.copytree(init_dir, d)
  return d


def test_init_writes_student_and_report(init_dir):
  report = json.load(open(os.path.join(init_dir, 'init', 'report.json')))
  assert report['kv_values_per_token'] == 50 and report['teacher_kv_values_per_token'] == 320
  assert report['ranks']['r_kv'] == [6] * 5 and report['ranks']['r_q'] == [64] * 5
  cfg, params, _ = wd.load_student_from(init_dir, 'init')
  assert cfg.r_kv == (6,) * 5 and cfg.d_r == 4 and cfg.rope_pairs == ((0, 1),) * 5
  assert params['layers'][0]['attn']['dkv'].shape == (64, 6)


def test_resumed_run_ends_with_the_same_parameters(init_dir, tmp_path):
  a, b = copy(init_dir, tmp_path, 'a'), copy(init_dir, tmp_path, 'b')
  c = small_config(steps=6)
  c.stages = 'distill'
  pipeline.run(c, a)
  c.train.stop_after = 3
  out = pipeline.run(c, b)
  assert out['distill']['interrupted'] and out['distill']['steps'] == 3
  c.train.stop_after = 0
  pipeline.run(c, b)  # resumes from step 3
  _, pa, _ = wd.load_student_from(a, 'distill')
  _, pb, _ = wd.load_student_from(b, 'distill')
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)
  lines = [json.loads(l) for l in open(os.path.join(b, 'distill', 'metrics.jsonl'))]
  assert [l['step'] for l in lines] == [2, 3, 4, 6]  # logged steps, none duplicated by the resume
  ref = [json.loads(l) for l in open(os.path.join(a, 'distill', 'metrics.jsonl'))]
  assert lines[-1]['loss'] == ref[-1]['loss']  # same data order after the resume


def test_short_distillation_lowers_heldout_nll_and_results_follow_the_contract(init_dir, tmp_path):
  d = copy(init_dir, tmp_path)
  c = small_config(steps=40, batch_size=16, seq_len=128, lr=3e-3)
  c.stages = 'eval'
  before = pipeline.run(c, d)['eval']['student']['nll']
  c.stages = 'distill,eval'
  results = pipeline.run(c, d)['eval']
  assert results['student']['stage'] == 'distill'
  assert results['student']['nll'] < before - 0.5, (before, results['student']['nll'])
  on_disk = json.load(open(os.path.join(d, 'results.json')))
  assert on_disk['teacher']['kv_values_per_token'] == 320
  assert 1.1 < on_disk['teacher']['nll'] < on_disk['student']['nll']  # first 20 stories only
  assert on_disk['student']['kv_values_per_token'] == 50
  assert on_disk['student']['ranks'] == {'r_kv': [6] * 5, 'r_q': [64] * 5}
  assert os.path.exists(os.path.join(d, 'results.md'))
  assert os.listdir(os.path.join(d, 'distill', 'tb'))


def test_dpo_stage_trains_against_a_frozen_reference(init_dir, tmp_path):
  d = copy(init_dir, tmp_path)
  c = small_config()
  c.stages = 'dpo'
  c.dpo.steps = 4
  c.dpo.batch_size = 8
  c.dpo.lr = 1e-4
  c.dpo.max_len = 256
  c.dpo.max_prompt_len = 192
  c.dpo.eval_pairs = 16
  out = pipeline.run(c, d)['dpo']
  assert out['pairs'] == {'train': 268, 'heldout': 16}
  assert out['heldout_before']['margin'] == 0.0  # the policy starts as the reference
  assert out['heldout_after']['margin'] != 0.0
  assert wd.latest_student(d)[0] == 'dpo'


def run_main(*args, cwd=None):
  return subprocess.run([sys.executable, '-m', 'xecomla.main', *args], capture_output=True,
                        text=True, cwd=cwd or os.getcwd())


@pytest.mark.parametrize('flags,message', [
    (['--config.stages=init,train'], "unknown stage 'train'"),
    (['--config.teacher.path=/nope/model'], 'teacher.path=/nope/model does not exist'),
    (['--config.mla.d_qk=5'], 'must equal the teacher head_dim 8'),
    (['--config.mla.rope_dims=middle'], "mla.rope_dims='middle'"),
    (['--config.dtype=float8'], "dtype 'float8' is not supported"),
    (['--config.mesh.data=3'], 'devices, but'),
])
def test_bad_input_fails_with_one_line_and_exit_2(tmp_path, flags, message):
  require_shared_data()
  w = tmp_path / 'w'
  c = [STORIES_CONFIG, f'--workdir={w}', '--config.stages=init,distill',
       '--config.train.steps=1', *flags]
  r = run_main(*c)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, last
  assert 'Traceback' not in r.stderr
  assert not w.exists()  # rejected before anything was written


def test_export_stage_command_and_generation_tool(init_dir, tmp_path):
  d = copy(init_dir, tmp_path)
  c = small_config()
  c.stages = 'export'
  out = pipeline.run(c, d)['export']
  assert out['path'] == os.path.join(d, 'export', 'hf')
  from xecomla.export import import_hf
  cfg, params = import_hf(out['path'])
  cfg0, params0, _ = wd.load_student_from(d, 'init')
  assert cfg == cfg0
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)):
    np.testing.assert_array_equal(a, b)
  assert pipeline.run(c, d)['export'].get('existing')  # up to date: kept
  source = os.path.join(out['path'], 'xecomla_source.json')
  assert json.load(open(source)) == {'stage': 'init', 'step': 0}
  json.dump({'stage': 'distill', 'step': 7}, open(source, 'w'))  # as if made from another student
  from xecomla.cli import UsageError
  with pytest.raises(UsageError, match='but the latest student is'):
    pipeline.run(c, d)
  r = subprocess.run([sys.executable, '-m', 'xecomla.export', f'--workdir={d}',
                      f'--out={tmp_path / "cli"}'], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  assert os.path.exists(tmp_path / 'cli' / 'modeling_xecomla.py')
  r = subprocess.run([sys.executable, '-m', 'xecomla.export', f'--workdir={d}',
                      f'--out={tmp_path / "cli"}'], capture_output=True, text=True)
  assert r.returncode == 2 and 'exists and is not empty' in r.stderr.strip().splitlines()[-1]
  r = subprocess.run([sys.executable, '-m', 'xecomla.tools.generate', f'--model={tmp_path / "cli"}',
                      '--prompt=Once upon a time', '--max_new_tokens=12'], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.startswith('Once upon a time') and 'tokens/s' in r.stdout
  assert 'cache 50 values per token' in r.stdout


def test_eval_stage_scores_multiple_choice_files(init_dir, tmp_path):
  d = copy(init_dir, tmp_path)
  mc = tmp_path / 'mc.jsonl'
  mc.write_text(json.dumps({'context': 'The sun was', 'choices': ['hot', 'purple'], 'label': 0}) + '\n')
  c = small_config()
  c.stages = 'eval'
  c.eval.mc_paths = str(mc)
  results = pipeline.run(c, d)['eval']
  for name in ('teacher', 'student'):
    task = results[name]['tasks']['mc.jsonl']
    assert task['n'] == 1 and task['acc'] in (0.0, 1.0)
    assert results[name]['kv_report']['max_context'] > 0
  assert 'mc.jsonl: acc' in open(os.path.join(d, 'results.md')).read()


def test_distillation_teacher_must_share_the_vocabulary(init_dir, tmp_path, hf_llama):
  from xecomla.cli import UsageError
  d = copy(init_dir, tmp_path)
  other, _ = hf_llama(vocab=97)
  c = small_config(steps=2)
  c.stages = 'distill'
  c.distill.teacher_path = other
  with pytest.raises(UsageError, match='vocabulary of 97 tokens, the student 512'):
    pipeline.run(c, d)
  assert not os.path.exists(os.path.join(d, 'distill'))
