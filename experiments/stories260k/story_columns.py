"""The story-completion column of the study's tables: acc / acc_norm of `eval.story_mc` (which of
k story endings ends each held-out story; xecomla/story_mc.py), shown wherever a row has it."""

from __future__ import annotations

from typing import Any

STORY_HEADER = 'story acc / acc_norm'


def story(r: dict | None) -> str:
  """Story-completion acc / acc_norm of an evaluation ('' for one made without eval.story_mc)."""
  t = (r or {}).get('tasks', {}).get('story_mc')
  return f"{t['acc']:.3f} / {t['acc_norm']:.3f}" if t else ''


def story_note(teacher: dict) -> str:
  t = teacher['tasks']['story_mc']
  return (f"which of {t['choices']} story endings ends each of {t['n']} held-out stories "
          f"(`eval.story_mc`, chance {1 / t['choices']:.2f}); teacher {story(teacher)}.")


def with_story(header: list[str], rows: list[list[Any]], evals: list[dict | None]) -> None:
  """Appends the story-completion column (of `evals`, one per row) when any row has it."""
  cells = [story(r) for r in evals]
  if any(cells):
    header.append(STORY_HEADER)
    for row, cell in zip(rows, cells):
      row.append(cell)
