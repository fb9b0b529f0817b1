"""Sweeps in config files (xecomla/sweep.py, sweep_points.py, sweep_report.py): the exact
commands of a dry run, --only, finished points skipped, the report from results.json files, bad
input in one line. No point trains here: a finished point is faked with its config.json and a
results.json, and running a point is replaced by recording its command."""

import json
import os
import subprocess
import sys

import pytest

from xecomla import sweep, sweep_points, sweep_report
from xecomla.cli import UsageError

STORIES = 'configs/stories260k_sweep.py'
PY = sys.executable
NAMES = ['r4_d2', 'r6_d4', 'r12_d4']


def expected_command(root, name, r_kv, d_r, steps=300, docs=200):
  return (f'{PY} -m xecomla.main --config={STORIES}:r_kv={r_kv},d_r={d_r},rope_dims=high_freq,steps={steps} '
          f'--workdir={root}/{name} --config.stages=init,distill,eval '
          f'--config.eval.max_docs={docs}')


def fake_results(teacher_nll, student_nll, student_kv, r_kv, layers=5):
  return {'teacher': {'nll': teacher_nll, 'kv_values_per_token': 320},
          'student': {'nll': student_nll, 'kv_values_per_token': student_kv,
                      'ranks': {'r_kv': [r_kv] * layers, 'r_q': [64] * layers}}}


def finish(root, name, results, config_spec=STORIES):
  """Fakes a finished point: its config.json (as xecomla.main writes it) and a results.json."""
  path, points = sweep_points.load_sweep(config_spec)
  point = next(p for p in points if p.name == name)
  w = root / name
  w.mkdir(parents=True)
  config = sweep_points.point_config(path, point)
  (w / 'config.json').write_text(config.to_json_best_effort(indent=2))
  (w / 'results.json').write_text(json.dumps(results))


def test_dry_run_prints_each_point_and_its_exact_command(tmp_path, capsys):
  root = tmp_path / 'sw'
  assert sweep.run([f'--config={STORIES}:steps=5,max_docs=7', f'--root={root}', '--dry_run']) == 0
  want = []
  for name, (r_kv, d_r) in zip(NAMES, ((4, 2), (6, 4), (12, 4))):
    want += [f'# {name} (todo) {root}/{name}', expected_command(root, name, r_kv, d_r, 5, 7)]
  assert capsys.readouterr().out.splitlines() == want
  assert not root.exists()  # a dry run writes nothing


def test_only_and_skip_of_finished_points(tmp_path, capsys):
  root = tmp_path / 'sw'
  finish(root, 'r4_d2', fake_results(1.3, 2.0, 30, 4))
  # r6_d4 holds a run of other settings: not finished, so it is run (xecomla.main resumes or
  # refuses it).
  finish(root, 'r6_d4', fake_results(1.3, 1.9, 50, 6))
  cfg = json.loads((root / 'r6_d4' / 'config.json').read_text())
  cfg['train']['steps'] = 7
  (root / 'r6_d4' / 'config.json').write_text(json.dumps(cfg))
  # a record the run added beside the config's fields does not make a point unfinished
  cfg = json.loads((root / 'r4_d2' / 'config.json').read_text())
  cfg['resolved'] = {'teacher.path': {'commit': 'abc'}}
  (root / 'r4_d2' / 'config.json').write_text(json.dumps(cfg))
  sweep.run([f'--config={STORIES}', f'--root={root}', '--dry_run', '--only=r4_d2,r6_d4'])
  assert capsys.readouterr().out.splitlines() == [
      f'# r4_d2 (done: skipped) {root}/r4_d2',
      f'# r6_d4 (differs) {root}/r6_d4', expected_command(root, 'r6_d4', 6, 4)]


def test_run_executes_unfinished_points_then_reports(tmp_path, capsys, monkeypatch):
  root = tmp_path / 'sw'
  finish(root, 'r4_d2', fake_results(1.2832, 2.01, 30, 4))
  finish(root, 'r12_d4', fake_results(1.2832, 1.61, 80, 12))
  calls = []

  def fake_run(cmd, check):
    calls.append(cmd)
    return subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(sweep.subprocess, 'run', fake_run)
  assert sweep.run([f'--config={STORIES}', f'--root={root}']) == 0
  assert [' '.join(c) for c in calls] == [expected_command(root, 'r6_d4', 6, 4)]
  report = json.loads((root / 'sweep.json').read_text())
  rows = {r['name']: r for r in report['points']}
  assert rows['r6_d4']['status'] == 'not run'  # the recorded run wrote no results.json
  r = rows['r12_d4']
  assert (r['status'], r['student_nll'], r['teacher_nll'], r['r_kv']) == ('done', 1.61, 1.2832,
                                                                          [12] * 5)
  assert r['kv_fraction'] == 80 / 320 and r['nll_vs_teacher'] == 1.61 / 1.2832 - 1
  md = (root / 'sweep.md').read_text()
  assert ('| r12_d4 | r_kv=12,d_r=4,rope_dims=high_freq,steps=300, stages=init,distill,eval, eval.max_docs=200 | '
          '1.2832 | 1.6100 | +25.5% | 80 / 320 | 25.0% | 12 | 64 |') in md
  assert '| r6_d4 |' in md and 'not run' in md
  assert (root / 'sweep.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert md in capsys.readouterr().out


@pytest.mark.parametrize('rc, kind, code', [(75, 'Preempted', 75), (1, 'SweepFailed', 1)])
def test_a_failed_or_preempted_point(tmp_path, monkeypatch, rc, kind, code):
  monkeypatch.setattr(sweep.subprocess, 'run',
                      lambda cmd, check: subprocess.CompletedProcess(cmd, rc))
  with pytest.raises(Exception) as e:
    sweep.run([f'--config={STORIES}', f'--root={tmp_path}', '--only=r4_d2'])
  assert type(e.value).__name__ == kind and e.value.exit_code == code
  # a failed point still gets the report (of what exists); a preempted sweep stops at once
  assert (tmp_path / 'sweep.md').exists() == (kind == 'SweepFailed')


def test_report_ranks_and_unreadable_results(tmp_path):
  assert sweep_report._ranks([64, 64]) == '64'
  assert sweep_report._ranks([32, 64, 48, 64]) == '32-64 (mean 52.0)'
  (tmp_path / 'results.json').write_text('{"teacher": {}}')
  r = sweep_report.row(sweep_points.Point('p'), str(tmp_path), ['x'])
  assert r['status'].startswith('unreadable results.json (KeyError')


@pytest.mark.parametrize('launcher, flags', [('tpu', '--name=v5e --zone=us-west4-a'),
                                              ('slurm', '--nodes=2 --partition=gpu')])
def test_launcher_job_per_point(tmp_path, capsys, launcher, flags):
  root = tmp_path / 'sw'
  sweep.run([f'--config={STORIES}', f'--root={root}', '--dry_run', '--only=r6_d4',
             f'--launcher={launcher}', f'--launcher_args={flags}'])
  main = expected_command(root, 'r6_d4', 6, 4).split(' -m xecomla.main ')[1]
  assert capsys.readouterr().out.splitlines() == [
      f'# r6_d4 (todo) {root}/r6_d4', f'{PY} -m launch.{launcher} {flags} -- {main}']


def test_paper_sweep_points():
  path, points = sweep_points.load_sweep('configs/paper_sweep.py:steps=10')
  assert [p.name for p in points] == ['r64_1b', 'r64_3b', 'r64_8b', 'r128_1b', 'r128_3b',
                                      'r128_8b', 'dynamic_1b']
  configs = {p.name: sweep_points.point_config(path, p) for p in points}
  assert {n: c.mla.r_kv for n, c in configs.items()} == {
      'r64_1b': 64, 'r64_3b': 64, 'r64_8b': 64, 'r128_1b': 128, 'r128_3b': 128, 'r128_8b': 128,
      'dynamic_1b': 64}
  assert configs['r128_8b'].distill.teacher_path.endswith('Llama-3.1-8B-Instruct')
  assert configs['r64_3b'].distill.teacher_path.endswith('Llama-3.2-3B-Instruct')
  assert configs['r64_1b'].distill.teacher_path == ''
  assert configs['dynamic_1b'].mla.kv_energy == 0.95 and configs['r64_1b'].mla.kv_energy is None
  assert all(c.train.steps == 10 for c in configs.values())


BAD_SWEEP = '''
from configs import stories260k
get_config = stories260k.get_config
def get_sweep(arg=None):
  return {points}
'''


@pytest.mark.parametrize('flags, points, message', [
    (['--config=configs/stories260k.py'], None, 'defines no sweep'),
    (['--config=configs/nope.py'], None, 'no such file'),
    ([f'--config={STORIES}', '--only=r4_d2,r9'], None, "unknown sweep point 'r9'"),
    ([f'--config={STORIES}:stepz=3'], None, "get_sweep('stepz=3') failed"),
    ([f'--config={STORIES}', '--launcher=k8s'], None, 'invalid choice'),
    ([f'--config={STORIES}', '--launcher_args=--x=1'], None, '--launcher_args is for'),
    ([f'--config={STORIES}', '--launcher=tpu', '--launcher_args="--x'], None, 'balance its'),
    (['--dry_run'], None, 'required: --config'),
    ([], "[{'name': 'a b'}]", "sweep point name 'a b'"),
    ([], "[{'name': 'logs'}]", "sweep point name 'logs'"),
    ([], "[{'name': 'a'}, {'name': 'a'}]", "names ['a'] repeat"),
    ([], "[{'name': 'a', 'args': 'r_kv=4'}]", "unknown keys ['args']"),
    ([], "[]", 'returned no points'),
    ([], "[{'name': 'a', 'overrides': {'train.stepz': 3}}]", 'unknown config field'),
    ([], "[{'name': 'a', 'overrides': {'train.steps': 'x'}}]", 'bad value'),
    ([], "[{'name': 'a', 'arg': 'r_kv=x'}]", 'bad value'),
])
def test_bad_input_is_one_line(tmp_path, capsys, flags, points, message):
  if points is not None:
    path = tmp_path / 'bad_sweep.py'
    path.write_text(BAD_SWEEP.format(points=points))
    flags = [f'--config={path}', f'--root={tmp_path}/root', '--dry_run']
  with pytest.raises(SystemExit) as e:
    sweep.main(['sweep', *flags])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1, err
  assert message in err
  assert not (tmp_path / 'root').exists()


def test_the_module_entry_point(tmp_path):
  out = subprocess.run([PY, '-m', 'xecomla.sweep', f'--config={STORIES}', '--only=x'],
                       capture_output=True, text=True, check=False)
  assert out.returncode == 2 and out.stderr == (
      "error: --only=x: unknown sweep point 'x'; choose from r4_d2,r6_d4,r12_d4\n")
  with pytest.raises(UsageError, match='--only=,: unknown sweep point'):
    sweep_points.select(sweep_points.load_sweep(STORIES)[1], ',')


def test_tpu_launcher_runs_each_point_as_a_launch(tmp_path, monkeypatch, capsys):
  """Not a dry run: the sweep starts `python -m launch.tpu ... -- MAIN_ARGS` per point, which runs
  gcloud (a stand-in on PATH that records its arguments) to reuse the TPU and start the point."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text('#!/usr/bin/env python3\nimport json, os, sys\n'
                                  'open(os.environ["GCLOUD_LOG"], "a").write(json.dumps('
                                  'sys.argv[1:]) + "\\n")\n')
  (bin_dir / 'gcloud').chmod(0o700)
  monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
  monkeypatch.setenv('GCLOUD_LOG', str(tmp_path / 'gcloud.jsonl'))
  root = tmp_path / 'sw'
  sweep.run([f'--config={STORIES}', f'--root={root}', '--only=r4_d2,r12_d4', '--launcher=tpu',
             '--launcher_args=--name=t --zone=z --skip_setup'])
  calls = [json.loads(line) for line in (tmp_path / 'gcloud.jsonl').read_text().splitlines()]
  assert [c[:4] for c in calls] == [['compute', 'tpus', 'tpu-vm', 'describe'],
                                    ['compute', 'tpus', 'tpu-vm', 'ssh']] * 2
  for call, (name, r_kv, d_r) in zip(calls[1::2], (('r4_d2', 4, 2), ('r12_d4', 12, 4))):
    main = expected_command(root, name, r_kv, d_r).split(' -m xecomla.main ')[1]
    assert f'.venv/bin/python -m xecomla.main {main} > ' in call[-1]
  assert 'when the jobs are done: python -m xecomla.sweep' in capsys.readouterr().out
