"""Story completion as multiple choice: which sentence ends this held-out story?

Built from the evaluation stories (eval.path), so that a student's quality shows at the level of a
task as well as in NLL. Each item's context is one story without its last sentence; its choices are
that story's true last sentence and `choices - 1` last sentences of other stories, so every choice
is a story ending of the same kind and only the context tells them apart. Rows are xecomla's
multiple-choice JSONL rows (`eval.read_mc`: context, choices, label; delimiter " ", the default),
scored as lm-evaluation-harness scores acc / acc_norm.

Sentence splitting (a heuristic for TinyStories' plain prose): a sentence ends at `.`, `!` or `?`,
together with any closing quotes or brackets right after it, where whitespace follows and the next
character is an upper-case letter or digit, possibly after an opening quote; `Mr.`, `Mrs.`, `Ms.`
and `Dr.` end no sentence. So `"I like it!" said Tom.` stays one sentence (a lower-case word
follows the `!"`). A closing formula "The end." (any case, `.` or `!`; the last sentence of 88 of
the 1000 held-out TinyStories) is dropped first: as a choice it would be a short, likely string
that fits every story. The context is the text before the last sentence, trailing whitespace removed.

Items are the first `items` stories (in file order) with at least 2 sentences; stories with fewer
are skipped. Distractors are drawn, without replacement, from the distinct last sentences of all
the stories given, never equal to the item's own ending; the true ending's position is drawn too.
One numpy generator seeded with `seed` draws everything in item order, so the rows are a pure
function of (stories, choices, seed), and the first k rows for `items` = n are the rows for k.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

SENTENCE_BREAK = re.compile(
    r'(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)[.!?]["\'\u201d\u2019)\]]*\s+(?=["\'\u201c\u2018(]?[A-Z0-9])')
THE_END = re.compile(r'the end[.!]*', re.IGNORECASE)


def sentence_starts(text: str) -> list[int]:
  """Offsets at which the sentences of `text` begin (the first is 0)."""
  return [0] + [m.end() for m in SENTENCE_BREAK.finditer(text)]


def split_ending(story: str) -> tuple[str, str] | None:
  """(the story without its last sentence, its last sentence), or None under 2 sentences."""
  story = story.strip()
  starts = sentence_starts(story)
  if len(starts) > 1 and THE_END.fullmatch(story[starts[-1]:]):
    story = story[:starts[-1]].rstrip()
    starts = starts[:-1]
  if len(starts) < 2:
    return None
  context, ending = story[:starts[-1]].rstrip(), story[starts[-1]:].strip()
  return (context, ending) if context and ending else None


def build_rows(stories: list[str], *, items: int, choices: int = 4, seed: int = 0) -> list[dict[str, Any]]:
  """`items` multiple-choice rows {"context", "choices", "label"} from `stories` (module
  docstring); ValueError when the stories give too few items or too few distinct endings."""
  if items < 1 or choices < 2:
    raise ValueError(f'story completion needs items >= 1 and choices >= 2 (got {items}, {choices})')
  split = [s for s in map(split_ending, stories) if s is not None]
  if len(split) < items:
    raise ValueError(f'only {len(split)} stories have 2 or more sentences; {items} items asked')
  endings = list(dict.fromkeys(ending for _, ending in split))  # distinct, in order of first use
  if len(endings) < choices:
    raise ValueError(f'{len(endings)} distinct story endings cannot make {choices} choices')
  rng = np.random.default_rng(seed)
  rows = []
  for context, ending in split[:items]:
    others = [e for e in endings if e != ending]
    picked = [others[k] for k in rng.choice(len(others), size=choices - 1, replace=False)]
    label = int(rng.integers(choices))
    rows.append({'context': context, 'choices': picked[:label] + [ending] + picked[label:],
                 'label': label})
  return rows


def to_jsonl(rows: list[dict[str, Any]]) -> str:
  """The rows as JSONL text (one object a line), for `eval.read_mc` and lm-evaluation-harness."""
  return ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)


def lm_eval_task(name: str, jsonl_path: str) -> str:
  """An lm-evaluation-harness task (YAML for `--include_path`) over a file of these rows, scored
  as xecomla scores them: zero-shot, context then " " + choice, acc and acc_norm."""
  return '\n'.join([
      f'task: {name}',
      'dataset_path: json',
      'dataset_kwargs:',
      '  data_files:',
      f'    test: {json.dumps(jsonl_path)}',
      'test_split: test',
      'output_type: multiple_choice',
      'doc_to_text: context',
      'doc_to_choice: choices',
      'doc_to_target: label',
      'target_delimiter: " "',
      'num_fewshot: 0',
      'metric_list:',
      '  - metric: acc',
      '    aggregation: mean',
      '    higher_is_better: true',
      '  - metric: acc_norm',
      '    aggregation: mean',
      '    higher_is_better: true',
  ]) + '\n'
