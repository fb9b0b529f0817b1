"""The stories260K study's plan: every run it would make is a valid configuration of the product,
with the KV cache its tables claim. (Running the study itself takes hours: see its README.)"""

import json
import zlib

import numpy as np
import pytest

from experiments.stories260k import demo_budget, gap, gap_report, plan, report, study
from tests.conftest import require_shared_data
from xecomla import pipeline


def finished(spec):
  """Stands in for a finished run when a part looks at earlier results (best choice, long run)."""
  nll = 4.0 + zlib.crc32(spec['name'].encode()) % 1000 / 1000
  return {'before': {'nll': nll}, 'after': {'nll': nll}}


SPECS = [s for part in plan.PARTS for s in plan.specs(part, finished)]


def test_run_names_are_unique_and_parts_known():
  names = [s['name'] for s in SPECS]
  assert len(names) == len(set(names))
  assert {s['part'] for s in SPECS} <= set(plan.PARTS)


def test_overrides_name_existing_fields():
  for spec in SPECS:
    study.config_for(spec['over'])   # set_dotted refuses a field the config does not have
  with pytest.raises(KeyError, match='mla.rope_kye is not a config field'):
    study.config_for({'mla.rope_kye': 'fit'})


def test_kv_fractions_are_what_the_tables_say():
  for s in SPECS:
    over = {**study.BASE, **s['over']}
    assert over['mla.d_qk'] + over['mla.d_r'] == 8, s['name']   # stories260K's head_dim
    values = over['mla.r_kv'] + over['mla.d_r']
    if s['part'] in ('grid', 'init'):
      assert values == plan.FRACTIONS[s['frac']] + 2, s['name']
    if s['part'] in ('recipe', 'goal', 'loss', 'norm', 'dpo', 'gap', 'demo'):
      want = 6 if s['name'].startswith('gap_') and '_9p4' in s['name'] else 10  # 6 / 64 = 9.4%
      assert values == want, s['name']                           # 10 / 64 = 15.6%


def test_the_demo_defaults_do_not_leak_into_the_study():
  """The demo distils with hidden-state KD; study runs do only where their lever says so."""
  for s in SPECS:
    hidden = study.config_for(s['over']).distill.hidden_weight
    assert hidden == (gap.HIDDEN_WEIGHT if 'hidden' in s.get('lever', '') else 0.0), s['name']


def test_every_run_passes_the_pipelines_validation():
  require_shared_data()
  for s in SPECS:
    c = study.config_for(s['over'])
    pipeline.validate(c, pipeline.parse_stages('init,align,distill,dpo,eval'))


def fake_run(valid, ood=5.0):
  texts = {report.VALID: {'nll': valid}, report.SHAKESPEARE: {'nll': ood}}
  return {'after': {'texts': texts}, 'train_wall_s': 600.0}


def test_gap_table_averages_seeds_and_lists_what_is_not_run():
  teacher = {'texts': {report.VALID: {'nll': 1.5}, report.SHAKESPEARE: {'nll': 4.8}}}
  runs = {'goal_5_low_freq_fit': fake_run(1.8), gap.name('base', 1000, 1): fake_run(1.7),
          gap.name('teacher', 1000, 0): fake_run(1.65, 4.9)}
  md = '\n'.join(gap_report.section(teacher, runs, []))
  rows = [l for l in md.splitlines() if l.startswith('| slowest') or l.startswith('| teacher-')]
  assert rows[0].split(' | ')[1:6] == ['1000 (4.1M)', '2', '1.7500 ± 0.0500', '+16.7%',
                                       's0 1.8000, s1 1.7000']
  assert rows[1].split(' | ')[1:5] == ['1000 (4.1M)', '1', '1.6500', '+10.0%']
  assert gap.name('teacher', 1000, 1) in md.split('Not run yet')[1]
  assert gap.name('base', 1000, 1) not in md.split('Not run yet')[1]


def test_teacher_story_stats_outlive_their_cache(tmp_path):
  """A report keeps the throughput of a cache that is gone (the last report's) beside those on
  disk."""
  root = tmp_path / 'cache'
  (root / 'k2').mkdir(parents=True)
  gone = {'key': 'k1', 'stories': 4, 'stories_per_s': 2.0}
  (root / 'k2' / 'done.json').write_text(json.dumps({'stories': 2, 'tokens': 10}))
  (root / 'k3').mkdir()  # unfinished: no done.json
  stats = study.teacher_data_stats(str(root), [gone])
  assert stats == [gone, {'stories': 2, 'tokens': 10, 'key': 'k2', 'mean_tokens': 5.0}]


def test_demo_budgets_fit_ten_minutes_and_their_table_averages_seeds():
  """Each part-demo variant is estimated at about 10 minutes as the demo (the full recipe at its
  measured 14 min 9 s), and its row averages the seeds run and lists the others as not run."""
  assert round(demo_budget.estimate_s(300, 1000)) == 849
  for align, steps in demo_budget.VARIANTS:
    assert 570 <= demo_budget.estimate_s(align, steps) <= 630, (align, steps)
  teacher = {'texts': {report.VALID: {'nll': 1.5}, report.SHAKESPEARE: {'nll': 4.8}}}
  runs = {demo_budget.name(300, 600, 0): fake_run(1.8), demo_budget.name(300, 600, 1): fake_run(1.7)}
  md = '\n'.join(demo_budget.section(teacher, runs))
  row = [l for l in md.splitlines() if l.startswith('| 300 | 600 |')][0]
  assert row.split(' | ')[3:7] == ['2', '1.7500 ± 0.0500', '+16.7%', 's0 1.8000, s1 1.7000']
  assert demo_budget.name(0, 800, 1) in md.split('Not run yet')[1]
  assert demo_budget.section(teacher, {}) == []


def test_budget_curves_join_budgets_and_say_where_a_geometric_series_flattens():
  """Each lever run at two budgets or more is a budget curve (teacher_fresh starts at the teacher
  lever's 1000-step run, the same settings); three budgets whose gains shrink give the limit of
  the geometric series through them: 2.0, 1.8, 1.7 -> 1.7 - 0.1^2 / (0.2 - 0.1) = 1.6."""
  runs = {'goal_5_low_freq_fit': fake_run(2.05), gap.name('base', 1000, 1): fake_run(1.95),
          'goal_long': fake_run(1.8), gap.name('base', 4000, 0): fake_run(1.7),
          gap.name('teacher', 1000, 0): fake_run(1.9), gap.name('teacher_fresh', 2000, 0): fake_run(1.85),
          gap.name('jsd', 1000, 0): fake_run(2.2)}
  series = gap_report.budget_series(runs)
  base, fresh = (gap.levers('')[k][0] for k in ('base', 'teacher_fresh'))
  assert set(series) == {base, fresh}   # jsd: one budget only
  assert series[base] == [(1000, 2.0, pytest.approx(0.05), 2), (2000, 1.8, 0.0, 1), (4000, 1.7, 0.0, 1)]
  assert series[fresh] == [(1000, 1.9, 0.0, 1), (2000, 1.85, 0.0, 1)]
  assert gap_report.flattens_at(series[base]) == pytest.approx(1.6)
  assert gap_report.flattens_at(series[fresh]) is None                    # two budgets
  assert gap_report.flattens_at([(1000, 2.0), (2000, 1.9), (4000, 1.7)]) is None  # gains grow
  line = gap_report.budget_lines(series, 1.5)[0]
  assert f'{base}: 1.6000 (+6.7%)' in line


def test_the_readme_headline_is_regenerated_between_its_markers_only(tmp_path):
  """headline.update rewrites the table between the markers and nothing else; a README without
  them is left as it is."""
  from experiments.stories260k import headline
  teacher = {'texts': {report.VALID: {'nll': 1.5}, report.SHAKESPEARE: {'nll': 4.8}}}
  runs = {'goal_5_low_freq_fit': fake_run(1.8), gap.name('base', 1000, 1): fake_run(1.7),
          gap.name('hidden', 2000, 0): fake_run(1.65), demo_budget.name(0, 800, 0): fake_run(1.9)}
  text = headline.table(teacher, runs)
  lines = text.splitlines()
  assert lines[3].split(' | ')[1:5] == ['1000 (4.1M)', '2', '1.7500 ± 0.0500', '+16.7%']
  assert lines[4].startswith('| + hidden-state MSE') and '| 2000 (8.2M) | 1 | 1.6500 |' in lines[4]
  assert lines[5].startswith('| no align stage, hidden-state KD') and '| 800 (3.3M) | 1 | 1.9000 |' in lines[5]
  readme = tmp_path / 'README.md'
  readme.write_text(f'intro\n{headline.BEGIN}\nold table\n{headline.END}\nafter\n')
  assert headline.update(str(readme), text)
  assert readme.read_text() == f'intro\n{headline.BEGIN}\n{text}{headline.END}\nafter\n'
  readme.write_text('no markers\n')
  assert not headline.update(str(readme), text) and readme.read_text() == 'no markers\n'
  assert not headline.update(str(tmp_path / 'absent.md'), text)


def test_by_position_splits_the_token_weighted_mean():
  """Each part's mean and count come from exactly its tokens: the parts by context (or by story)
  weigh back to the overall mean."""
  from experiments.stories260k import by_position
  rng = np.random.default_rng(0)
  story, pos = rng.integers(0, 400, 5000), rng.integers(0, 512, 5000)
  a = np.stack([story, pos, rng.random(5000)], axis=1).astype(np.float64)
  parts = by_position.split(a)
  assert parts['all'] == (pytest.approx(a[:, 2].mean()), 5000)
  assert parts['first 200, context >=256'] == (
      pytest.approx(a[(story < 200) & (pos >= 256), 2].mean()), int(((story < 200) & (pos >= 256)).sum()))
  for a_key, b_key in (('context <256', 'context >=256'), ('first 200', 'the rest')):
    (ma, na), (mb, nb) = parts[a_key], parts[b_key]
    assert na + nb == 5000 and (ma * na + mb * nb) / 5000 == pytest.approx(parts['all'][0])


def test_by_difficulty_weighs_tokens_within_teacher_quartiles():
  """Stories are put in quartiles of the teacher's per-story NLL; each model's figure there is its
  token-weighted NLL over those stories' tokens."""
  from experiments.stories260k import by_position
  # 8 stories, story s has s + 1 tokens of teacher NLL s (so quartiles hold stories 0-1, 2-3, ...)
  story = np.repeat(np.arange(8), np.arange(1, 9))
  teacher = np.stack([story, np.zeros_like(story), story], axis=1).astype(np.float64)
  student = teacher.copy()
  student[:, 2] = 10.0 + (np.arange(len(story)) % 2)   # 10, 11, 10, 11, ... along the tokens
  rows = by_position.by_difficulty(teacher, {'teacher': teacher, 'student': student})
  assert [r[:3] for r in rows] == [[1, '2 (2)', '3'], [2, '2 (2)', '7'], [3, '2 (2)', '11'],
                                   [4, '2 (2)', '15']]
  assert rows[0][3] == f'{(0 * 1 + 1 * 2) / 3:.4f}'                       # teacher, stories 0-1
  first3 = student[:3, 2].mean()
  assert rows[0][4] == f'{first3:.4f}'


@pytest.mark.parametrize('module', ['report', 'plan', 'demo_budget', 'headline', 'gap_report'])
def test_each_study_module_imports_first(module):
  """No import cycle among the study's modules: each imports in a fresh interpreter on its own."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', f'import experiments.stories260k.{module}'], check=True,
                 cwd=root)
