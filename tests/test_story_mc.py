"""Story completion as multiple choice (xecomla/story_mc.py): sentence splitting, the rows built
from held-out stories, the eval stage scoring them for teacher and student, the study's column."""

import json
import os
import shutil

import pytest

from tests.conftest import VALID_TEXT, require_shared_data, small_config
from xecomla import eval as evaluation
from xecomla import pipeline, story_mc
from xecomla.cli import UsageError

STORIES = [
    'Tom had a red ball. He threw it high. "Look at me!" said Tom. Mr. Sun smiled down at him.',
    'Lily saw a cat.\n\nThe cat was sad. Lily gave it milk and it purred.',
    'A bird sang all day long.',                       # one sentence: skipped
    'Sam ran home. His mom hugged him. The end.',      # the closing formula is not the ending
    'Ben ate a big cake! Then he slept. He dreamed of 3 dogs.',
    'Mia found a shell. She kept it forever.',
]


def test_sentences_split_at_an_end_mark_before_a_capital_and_keep_dialogue_whole():
  text = STORIES[0]
  starts = story_mc.sentence_starts(text)
  assert [text[a:b].strip() for a, b in zip(starts, starts[1:] + [len(text)])] == [
      'Tom had a red ball.', 'He threw it high.', '"Look at me!" said Tom.',
      'Mr. Sun smiled down at him.']
  assert story_mc.split_ending(STORIES[1]) == ('Lily saw a cat.\n\nThe cat was sad.',
                                               'Lily gave it milk and it purred.')
  assert story_mc.split_ending(STORIES[2]) is None
  assert story_mc.split_ending(STORIES[3]) == ('Sam ran home.', 'His mom hugged him.')
  assert story_mc.split_ending(STORIES[4])[1] == 'He dreamed of 3 dogs.'


def test_rows_hold_the_true_ending_among_other_stories_endings_deterministically():
  rows = story_mc.build_rows(STORIES, items=5, choices=3, seed=1)
  endings = [story_mc.split_ending(s) for s in STORIES]
  endings = [e for e in endings if e]
  assert len(rows) == 5 and [r['context'] for r in rows] == [c for c, _ in endings]
  for row, (_, true) in zip(rows, endings):
    assert row['choices'][row['label']] == true
    assert len(set(row['choices'])) == 3
    others = set(row['choices']) - {true}
    assert others <= {e for _, e in endings} - {true}  # drawn from the other stories' endings
  assert rows == story_mc.build_rows(STORIES, items=5, choices=3, seed=1)
  assert rows[:2] == story_mc.build_rows(STORIES, items=2, choices=3, seed=1)  # a prefix
  draws = {json.dumps(story_mc.build_rows(STORIES, items=5, choices=3, seed=s)) for s in range(4)}
  assert len(draws) > 1  # the seed moves the draws


def test_rows_are_read_back_by_the_multiple_choice_reader(tmp_path):
  rows = story_mc.build_rows(STORIES, items=5, choices=4, seed=0)
  path = tmp_path / 'story.jsonl'
  path.write_text(story_mc.to_jsonl(rows), encoding='utf-8')
  assert evaluation.read_mc(str(path)) == rows


@pytest.mark.parametrize('items, choices, message', [
    (6, 2, 'only 5 stories have 2 or more sentences; 6 items asked'),
    (2, 6, '5 distinct story endings cannot make 6 choices'),
    (0, 4, 'needs items >= 1'),
])
def test_too_few_stories_or_endings_is_an_error(items, choices, message):
  with pytest.raises(ValueError, match=message):
    story_mc.build_rows(STORIES, items=items, choices=choices)


def test_heldout_rows_cut_each_story_at_its_last_sentence():
  require_shared_data()
  stories = evaluation.read_documents(VALID_TEXT)
  rows = story_mc.build_rows(stories, items=200, choices=4, seed=0)
  for story, row in zip(stories, rows):  # no held-out story has under 2 sentences
    true = row['choices'][row['label']]
    assert story.startswith(row['context']) and true in story[len(row['context']):]
    assert story.rstrip().endswith(true) or story_mc.THE_END.search(story[-12:])
  labels = [r['label'] for r in rows]
  assert min(labels.count(k) for k in range(4)) > 30  # the true ending's place is drawn (~50 each)


@pytest.mark.parametrize('field, value, message', [
    ('story_mc', -1, 'eval.story_mc=-1, eval.story_mc_choices=4: give story_mc >= 0'),
    ('story_mc_choices', 1, 'eval.story_mc=3, eval.story_mc_choices=1'),
    ('story_mc', 1001, 'only 1000 stories have 2 or more sentences; 1001 items asked: lower'),
])
def test_bad_story_settings_are_refused_before_anything_is_written(tmp_path, field, value, message):
  require_shared_data()
  c = small_config()
  c.stages = 'eval'
  c.eval.story_mc = 3
  c.eval[field] = value
  with pytest.raises(UsageError, match=message):
    pipeline.run(c, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


def test_eval_stage_scores_story_completion_for_teacher_and_student(init_dir, tmp_path):
  d = str(tmp_path / 'w')
  shutil.copytree(init_dir, d)
  c = small_config()
  c.stages = 'eval'
  c.eval.max_docs = 4
  c.eval.max_len = 64  # each request cut on the left to 65 tokens: one batch shape to compile
  c.eval.sample_tokens = 0
  c.eval.story_mc = 6
  c.eval.story_mc_choices = 3
  results = pipeline.run(c, d)['eval']
  expected = story_mc.build_rows(evaluation.read_documents(VALID_TEXT), items=6, choices=3)
  assert evaluation.read_mc(os.path.join(d, 'story_mc.jsonl')) == expected
  on_disk = json.load(open(os.path.join(d, 'results.json')))
  for name in ('teacher', 'student'):
    task = on_disk[name]['tasks']['story_mc']
    assert task['n'] == 6 and task['choices'] == 3
    assert task['acc'] * 6 == round(task['acc'] * 6) and 0 <= task['acc_norm'] <= 1
    assert {'nll', 'kv_values_per_token'} <= set(on_disk[name])  # the contract keys stay
  assert on_disk['student']['ranks'] == {'r_kv': [6] * 5, 'r_q': [64] * 5}
  assert results['teacher']['tasks']['story_mc']['acc'] == on_disk['teacher']['tasks']['story_mc']['acc']
  assert 'story_mc: acc' in open(os.path.join(d, 'results.md')).read()


def test_study_tables_carry_the_column_only_for_rows_that_have_it():
  from experiments.stories260k import report
  teacher = {'texts': {report.VALID: {'nll': 1.5}}, 'first200_nll': 1.3}
  scored = {'texts': {report.VALID: {'nll': 2.0}},
            'tasks': {'story_mc': {'acc': 0.375, 'acc_norm': 0.5, 'n': 8, 'choices': 4}}}
  run = {'name': 'a', 'kv_fraction': 0.156, 'kv_values_per_token': 50,
         'ranks': {'r_kv': [8] * 5}, 'before': {'texts': {report.VALID: {'nll': 5.0}}}}
  both = report.simple_table(teacher, [{**run, 'after': scored}, {**run, 'after': {
      'texts': {report.VALID: {'nll': 2.1}}}}], lambda r: r['name'])
  header, _, first, second = both.strip().splitlines()
  assert header.endswith('| story acc / acc_norm |')
  assert first.endswith('| 0.375 / 0.500 |') and second.endswith('| 2.1000 | +40.0% |  |  |')
  none = report.simple_table(teacher, [{**run, 'after': {'texts': {report.VALID: {'nll': 2.1}}}}],
                             lambda r: r['name'])
  assert 'story' not in none
