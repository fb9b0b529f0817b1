"""Checks of data files before a run writes anything: cheap (no tokenizer), each failure one
line naming the file, the line and the fix."""

from __future__ import annotations

from etils import epath

from xecomla import fileio
from xecomla.cli import UsageError
from xecomla.data import ROLES, preference_pair, read_jsonl
from xecomla.eval import SEPARATOR


def check_text(path: str, field: str) -> None:
  """A text file must exist and hold at least one document; reads only up to its first one."""
  if not path:
    raise UsageError(f'{field} is empty: set --config.{field}=PATH.')
  if not epath.Path(path).is_file():
    raise UsageError(f'{field}={path} does not exist: fix --config.{field} (is ../shared/data '
                     'beside the project, or XECOMLA_DATA set?).')
  n = 0
  try:
    with fileio.open_text(path) as f:
      for n, line in enumerate(f, start=1):
        if line.replace(SEPARATOR, '').strip():
          return
  except UnicodeDecodeError as e:
    raise UsageError(f'{field}={path} is not UTF-8 text (line {n + 1}: {e.reason}): re-encode it '
                     'as UTF-8.') from e
  what = 'empty' if not n else f'{n} blank or separator lines'
  raise UsageError(f'{field}={path} holds no document ({what}): '
                   f'give a text file of {SEPARATOR}-separated documents.')


def check_chat(path: str, field: str = 'data.train_path') -> int:
  """Every line of a chat JSONL well-formed; returns the number of conversations."""
  rows = read_jsonl(path)
  for n, row in enumerate(rows, start=1):
    where = f'{path}:{n}'
    if not isinstance(row.get('messages'), list):
      raise UsageError(f'{where} has no "messages" list: fix or remove that line.')
    _check_messages(row['messages'], where)
  if not rows:
    raise UsageError(f'{field}={path} holds no conversation: give a JSONL file of '
                     '{"messages": [...]} rows.')
  return len(rows)


def _check_messages(messages, where: str) -> None:
  for m in messages:
    if (not isinstance(m, dict) or m.get('role') not in ROLES
        or not isinstance(m.get('content', ''), str)):
      raise UsageError(f'{where}: chat message {str(m)[:60]} needs a role in {sorted(ROLES)} '
                       'and a string content: fix or remove that line.')


def check_preferences(path: str, field: str = 'dpo.path') -> int:
  """Every line of a preference JSONL well-formed; returns the number of pairs."""
  if not epath.Path(path).is_file():
    raise UsageError(f'{field}={path} does not exist: set it to a preference JSONL file.')
  rows = read_jsonl(path)
  for n, row in enumerate(rows, start=1):
    msgs, _, _ = preference_pair(row, f'{path}:{n}')
    _check_messages(msgs, f'{path}:{n}')
  if not rows:
    raise UsageError(f'{field}={path} holds no preference pair: give a JSONL file of pairs.')
  return len(rows)
