"""grain input pipelines: packed plain text, chat SFT, preference pairs.

Every batch is a dict of int32 numpy arrays [B, T]: `tokens`, `positions`, `segment_ids`
(0 = padding) and, for chat, `loss_mask` (1 where the *next* token is a training target, i.e.
assistant tokens). Preference batches hold the same fields prefixed `chosen_` and `rejected_`.

Text and chat examples are shuffled by seed, repeated without end and packed first-fit into rows
of `seq_len` with per-document positions and segment ids, so attention never crosses documents
(`models.attention.attention_mask`). Documents longer than a row are cut into row-sized chunks
first. Iterators are grain `DatasetIterator`s: `get_state()` is a small JSON dict checkpointed with
the model, `set_state()` resumes exactly.

Each process reads its own 1/process_count of the examples and yields batch_size / process_count
rows; `global_batch` assembles the global array.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import grain
import grain.experimental as ge
import jax
import numpy as np

from xecomla import eval as evaluation
from xecomla.cli import UsageError

ROLES = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}


# ----------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------

def chunk(ids: list[int], length: int) -> list[list[int]]:
  """Cuts a document into pieces of at most `length` tokens (pieces of one token are dropped:
  they predict nothing)."""
  return [ids[i:i + length] for i in range(0, len(ids), length) if len(ids[i:i + length]) > 1]


def text_examples(tokenizer, path: str, bos_id: int, seq_len: int) -> list[dict[str, np.ndarray]]:
  if not os.path.exists(path):
    raise UsageError(f'training text {path} does not exist: set data.train_path.')
  docs = evaluation.read_documents(path)
  examples = []
  for ids in tokenizer.encode_batch(docs):
    for piece in chunk([bos_id] + ids, seq_len):
      examples.append({'tokens': np.asarray(piece, np.int32)})
  return examples


def chat_segments(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
  """The chat template: 'Role: content' blocks separated by blank lines; (text, is_target)
  pieces, where only assistant contents are targets. Documented in the README."""
  pieces = []
  for i, m in enumerate(messages):
    role = m.get('role')
    if role not in ROLES:
      raise UsageError(f'chat message role {role!r} is not one of {sorted(ROLES)}.')
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


def read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    raise UsageError(f'{path} does not exist: fix the path.')
  rows = []
  try:
    with open(path, encoding='utf-8') as f:
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
    ids, target = encode_pieces(tokenizer, chat_segments(row['messages']), bos_id)
    mask = target[1:] + [0]
    for start in range(0, len(ids), seq_len):
      t, m = ids[start:start + seq_len], mask[start:start + seq_len]
      if len(t) > 1 and any(m[:-1]):
        examples.append({'tokens': np.asarray(t, np.int32), 'loss_mask': np.asarray(m, np.int32)})
  return examples


# ----------------------------------------------------------------------------------------------
# Packed training pipeline
# ----------------------------------------------------------------------------------------------

def packed_dataset(examples: list[dict[str, np.ndarray]], *, seq_len: int, batch_size: int,
                   seed: int) -> grain.IterDataset:
  """Shuffled, endlessly repeated, first-fit packed batches of this process's share."""
  if not examples:
    raise UsageError('the training data holds no usable example.')
  n_proc, proc = jax.process_count(), jax.process_index()
  if batch_size % n_proc:
    raise UsageError(f'batch_size {batch_size} is not divisible by the {n_proc} processes.')
  ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None)
  ds = ds[proc::n_proc] if n_proc > 1 else ds
  fields = list(examples[0])
  packed = ge.FirstFitPackIterDataset(ds.to_iter_dataset(),
                                      length_struct={k: seq_len for k in fields},
                                      num_packing_bins=max(2 * batch_size // n_proc, 8), seed=seed)

  def rename(ex):
    out = {'tokens': ex['tokens'], 'positions': ex['tokens_positions'],
           'segment_ids': ex['tokens_segment_ids']}
    if 'loss_mask' in ex:
      out['loss_mask'] = ex['loss_mask']
    return {k: np.asarray(v, np.int32) for k, v in out.items()}

  return packed.map(rename).batch(batch_size // n_proc, drop_remainder=True)


def train_dataset(config, tokenizer, bos_id: int) -> grain.IterDataset:
  c = config
  if c.data.format == 'text':
    examples = text_examples(tokenizer, c.data.train_path, bos_id, c.train.seq_len)
  elif c.data.format == 'chat':
    examples = chat_examples(tokenizer, c.data.train_path, bos_id, c.train.seq_len)
  else:
    raise UsageError(f"data.format={c.data.format!r}: use 'text' or 'chat'.")
  return packed_dataset(examples, seq_len=c.train.seq_len, batch_size=c.train.batch_size,
                        seed=c.seed)


def global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays sharded over the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Preference pairs
# ----------------------------------------------------------------------------------------------

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


def encode_pair(tokenizer, messages, chosen: str, rejected: str, *, bos_id: int, max_len: int,
                max_prompt_len: int) -> dict[str, np.ndarray]:
  """Both sequences padded to max_len; the prompt keeps its last max_prompt_len tokens (BOS
  first), each response is cut to fit; `*_loss_mask` marks positions whose next token is a
  response token."""
  prompt_ids, _ = encode_pieces(tokenizer, chat_segments(messages) + [('\n\nAssistant: ', False)], bos_id)
  if len(prompt_ids) > max_prompt_len:
    prompt_ids = [bos_id] + prompt_ids[len(prompt_ids) - max_prompt_len + 1:]
  out = {}
  for name, text in (('chosen', chosen), ('rejected', rejected)):
    response = tokenizer.encode(text)[:max_len - len(prompt_ids)]
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
                           max_prompt_len=max_prompt_len))
  if not out:
    raise UsageError(f'{path} holds no preference pair.')
  return out


def preference_dataset(examples: list[dict[str, np.ndarray]], *, batch_size: int,
                       seed: int) -> grain.IterDataset:
  n_proc, proc = jax.process_count(), jax.process_index()
  ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None)
  ds = ds[proc::n_proc] if n_proc > 1 else ds
  return ds.to_iter_dataset().batch(batch_size // n_proc, drop_remainder=True)


def stack(examples: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  examples = list(examples)
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
