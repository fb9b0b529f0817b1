"""Chat SFT examples and preference pairs read from JSONL: rendered with the tokenizer's own chat
template when it has one (`xecomla.chat`: assistant turns end with its end-of-turn token, which is
a target; DPO prompts end with its generation prompt), else with the fallback 'Role: content'
format (BOS first, documented in the README), whose ids are those of earlier versions.

`loss_mask` marks positions whose *next* token is a target (assistant tokens); preference
examples hold the same fields prefixed `chosen_` and `rejected_`, padded to max_len.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from etils import epath

from xecomla import chat, fileio
from xecomla.cli import UsageError

ROLES = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}


def check_roles(messages: list[dict[str, str]]) -> None:
  for m in messages:
    if m.get('role') not in ROLES:
      raise UsageError(f"chat message role {m.get('role')!r} is not one of {sorted(ROLES)}.")


def chat_segments(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
  """The fallback chat format, for tokenizers without a chat template: 'Role: content' blocks
  separated by blank lines; (text, is_target) pieces, where only assistant contents are targets.
  Documented in the README."""
  check_roles(messages)
  pieces = []
  for i, m in enumerate(messages):
    role = m['role']
    sep = '\n\n' if i else ''
    pieces.append((f'{sep}{ROLES[role]}: ', False))
    pieces.append((m.get('content', ''), role == 'assistant'))
  return pieces


def encode_pieces(tokenizer, pieces: list[tuple[str, bool]], bos_id: int) -> tuple[list[int], list[int]]:
  """Token ids (BOS first) and per-token target flags for template pieces."""
  ids, target = [bos_id], [0]
  for text, is_target in pieces:
    if text:
      new = tokenizer.encode(text)
      ids += new
      target += [int(is_target)] * len(new)
  return ids, target


def encode_chat(tokenizer, messages: list[dict[str, str]], bos_id: int,
                where: str) -> tuple[list[int], list[int]]:
  """Token ids and per-token target flags of a conversation: rendered with the tokenizer's own
  chat template when it has one (xecomla.chat: assistant turns with their end-of-turn token are
  targets, the BOS is the template's), else chat_segments with BOS first."""
  template = getattr(tokenizer, 'chat_template', None)
  if template is None:
    return encode_pieces(tokenizer, chat_segments(messages), bos_id)
  check_roles(messages)
  try:
    return chat.encode_conversation(tokenizer, template, messages)
  except ValueError as e:
    raise UsageError(f'{where}: {e}: fix or remove that line.') from e


def read_jsonl(path: str) -> list[dict[str, Any]]:
  if not epath.Path(path).exists():
    raise UsageError(f'{path} does not exist: fix the path.')
  rows = []
  try:
    with fileio.open_text(path) as f:  # also gs://
      for n, line in enumerate(f, start=1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise UsageError(f'{path}:{n} is not valid JSON ({e.msg}): fix or remove that '
                             'line.') from e
          if not isinstance(rows[-1], dict):
            raise UsageError(f'{path}:{n} is not a JSON object: fix or remove that line.')
  except UnicodeDecodeError as e:
    raise UsageError(f'{path} is not UTF-8 text ({e.reason} at byte {e.start}): re-encode it as '
                     'UTF-8.') from e
  return rows


def chat_examples(tokenizer, path: str, bos_id: int, seq_len: int) -> list[dict[str, np.ndarray]]:
  """JSONL rows {"messages": [...]}: loss on assistant tokens only (loss_mask marks positions
  whose next token is a target)."""
  examples = []
  for n, row in enumerate(read_jsonl(path), start=1):
    if not isinstance(row.get('messages'), list):
      raise UsageError(f'{path}:{n} has no "messages" list.')
    ids, target = encode_chat(tokenizer, row['messages'], bos_id, f'{path}:{n}')
    mask = target[1:] + [0]
    for start in range(0, len(ids), seq_len):
      t, m = ids[start:start + seq_len], mask[start:start + seq_len]
      if len(t) > 1 and any(m[:-1]):
        examples.append({'tokens': np.asarray(t, np.int32), 'loss_mask': np.asarray(m, np.int32)})
  return examples


def _content(turns: Any, where: str) -> str:
  if isinstance(turns, str):
    return turns
  if (isinstance(turns, list) and turns and isinstance(turns[-1], dict)
      and isinstance(turns[-1].get('content'), str)):
    return turns[-1]['content']
  raise UsageError(f'{where}: expected a string or a list of messages ending in an assistant '
                   'turn: fix or remove that line.')


def preference_pair(row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], str, str]:
  """(prompt messages, chosen response, rejected response) from either schema:
  {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]} or
  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}."""
  if 'preferred_output' in row:
    msgs = row.get('input', {}).get('messages') if isinstance(row.get('input'), dict) else None
    if not isinstance(msgs, list):
      raise UsageError(f'{where}: "input" needs a "messages" list: fix or remove that line.')
    return msgs, _content(row['preferred_output'], where), _content(row.get('non_preferred_output'), where)
  if {'prompt', 'chosen', 'rejected'} <= set(row):
    prompt = row['prompt']
    msgs = [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(msgs, list):
      raise UsageError(f'{where}: "prompt" must be a string or a list of messages: fix or remove '
                       'that line.')
    return msgs, _content(row['chosen'], where), _content(row['rejected'], where)
  raise UsageError(f'{where}: a preference row needs either input/preferred_output/'
                   'non_preferred_output or prompt/chosen/rejected: fix or remove that line.')


def pair_ids(tokenizer, messages, chosen: str, rejected: str, bos_id: int,
             where: str) -> tuple[list[int], dict[str, list[int]]]:
  """(prompt ids, {'chosen', 'rejected': response ids}): with the tokenizer's chat template the
  prompt ends in its generation prompt and each response in the end-of-turn token; else the
  fallback format's prompt ending 'Assistant: ' (BOS first) and the bare responses."""
  template = getattr(tokenizer, 'chat_template', None)
  if template is None:
    pieces = chat_segments(messages) + [('\n\nAssistant: ', False)]
    return (encode_pieces(tokenizer, pieces, bos_id)[0],
            {'chosen': tokenizer.encode(chosen), 'rejected': tokenizer.encode(rejected)})
  check_roles(messages)
  try:
    prompt, c = chat.encode_prompt_response(tokenizer, template, messages, chosen)
    _, r = chat.encode_prompt_response(tokenizer, template, messages, rejected)
  except ValueError as e:
    raise UsageError(f'{where}: {e}: fix or remove that line.') from e
  return prompt, {'chosen': c, 'rejected': r}


def encode_pair(tokenizer, messages, chosen: str, rejected: str, *, bos_id: int, max_len: int,
                max_prompt_len: int, where: str = 'a preference pair') -> dict[str, np.ndarray]:
  """Both sequences padded to max_len; the prompt keeps its last max_prompt_len tokens (its BOS
  first), each response is cut to fit; `*_loss_mask` marks positions whose next token is a
  response token."""
  prompt_ids, responses = pair_ids(tokenizer, messages, chosen, rejected, bos_id, where)
  if len(prompt_ids) > max_prompt_len:
    head = prompt_ids[:1] if prompt_ids[0] == bos_id else []
    prompt_ids = head + prompt_ids[len(prompt_ids) - max_prompt_len + len(head):]
  out = {}
  for name in ('chosen', 'rejected'):
    response = responses[name][:max_len - len(prompt_ids)]
    ids = prompt_ids + response
    n = len(ids)
    pad = max_len - n
    mask = [0] * (len(prompt_ids) - 1) + [1] * len(response) + [0]
    out[f'{name}_tokens'] = np.asarray(ids + [0] * pad, np.int32)
    out[f'{name}_positions'] = np.asarray(list(range(n)) + [0] * pad, np.int32)
    out[f'{name}_segment_ids'] = np.asarray([1] * n + [0] * pad, np.int32)
    out[f'{name}_loss_mask'] = np.asarray(mask[:n] + [0] * pad, np.int32)
  return out


def preference_examples(tokenizer, path: str, *, bos_id: int, max_len: int,
                        max_prompt_len: int) -> list[dict[str, np.ndarray]]:
  if max_prompt_len >= max_len:
    raise UsageError(f'dpo.max_prompt_len ({max_prompt_len}) must be below dpo.max_len ({max_len}).')
  out = []
  for n, row in enumerate(read_jsonl(path), start=1):
    msgs, chosen, rejected = preference_pair(row, f'{path}:{n}')
    out.append(encode_pair(tokenizer, msgs, chosen, rejected, bos_id=bos_id, max_len=max_len,
                           max_prompt_len=max_prompt_len, where=f'{path}:{n}'))
  if not out:
    raise UsageError(f'{path} holds no preference pair.')
  return out
