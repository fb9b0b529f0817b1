"""Evaluation: the held-out NLL definition used everywhere, and the pieces around it.

The definition (README, "Evaluation"): a text file holds documents separated by `<|endoftext|>`;
each document is stripped, encoded with BOS prepended and no EOS, and truncated so that at most
`max_len` tokens are predicted, each from a context of at most `max_len` tokens (i.e. to
max_len + 1 tokens), max_len = min(eval.max_len, the model's maximum length): a Llama-3 allows
131,072 positions, and rows that long would need a [rows, T, T] mask and [rows, heads, T, T]
scores. The figure is the mean negative log-likelihood per predicted token over all documents
(token-weighted), optionally over the first N documents only. A file that contains no
`<|endoftext|>` at all (e.g. tiny-shakespeare) is split into documents at blank lines.

Documents are packed several to a row (positions restart, attention never crosses documents), so
the batch shape is fixed and the result does not depend on the batch size.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xecomla import fileio
from xecomla.train.losses import next_token_targets, token_log_probs

SEPARATOR = '<|endoftext|>'


def read_documents(path: str, max_docs: int | None = None) -> list[str]:
  """The stripped, non-empty documents of a `<|endoftext|>`-separated text file (paragraphs, split
  at blank lines, when the file has no separator)."""
  text = fileio.read_text(path)
  parts = text.split(SEPARATOR) if SEPARATOR in text else re.split(r'\n\s*\n', text)
  docs = [d.strip() for d in parts]
  docs = [d for d in docs if d]
  return docs[:max_docs] if max_docs else docs


def encode_documents(tokenizer, docs: list[str], bos_id: int, max_len: int) -> list[list[int]]:
  """BOS + ids, no EOS, truncated to max_len + 1 tokens (max_len predicted tokens)."""
  return [([bos_id] + ids)[:max_len + 1] for ids in tokenizer.encode_batch(docs)]


def pack(seqs: list[list[int]], length: int) -> dict[str, np.ndarray]:
  """First-fit packing, in order, into rows of `length`: tokens, positions, segment_ids [R, length]
  (segment 0 = padding; segment ids count from 1 within each row)."""
  rows: list[list[list[int]]] = []
  free: list[int] = []
  for s in seqs:
    if len(s) > length:
      raise ValueError(f'a sequence of {len(s)} tokens does not fit rows of {length}')
    for i, room in enumerate(free):
      if room >= len(s):
        rows[i].append(s)
        free[i] -= len(s)
        break
    else:
      rows.append([s])
      free.append(length - len(s))
  out = {k: np.zeros((len(rows), length), np.int32) for k in ('tokens', 'positions', 'segment_ids')}
  for r, row in enumerate(rows):
    t = 0
    for seg, s in enumerate(row, start=1):
      out['tokens'][r, t:t + len(s)] = s
      out['positions'][r, t:t + len(s)] = np.arange(len(s))
      out['segment_ids'][r, t:t + len(s)] = seg
      t += len(s)
  return out


def nll_sums_fn(graphdef: nnx.GraphDef):
  """A jitted (state, tokens, positions, segment_ids) -> (sum of NLL, number of predictions)."""

  @jax.jit
  def f(state, tokens, positions, segment_ids):
    logits, _ = nnx.merge(graphdef, state)(tokens, positions, segment_ids)
    targets, weights = next_token_targets(tokens, segment_ids)
    nll = -token_log_probs(logits, targets)
    return jnp.sum(nll * weights), jnp.sum(weights)

  return f


def packed_batches(seqs: list[list[int]], row_length: int, batch_rows: int) -> list[dict[str, np.ndarray]]:
  """`seqs` packed into rows, grouped into batches of `batch_rows` (the last padded with empty
  rows), so that every batch has the same shape."""
  packed = pack(seqs, row_length)
  n_rows = packed['tokens'].shape[0]
  pad = (-n_rows) % batch_rows
  packed = {k: np.concatenate([v, np.zeros((pad, row_length), np.int32)]) for k, v in packed.items()}
  return [{k: v[i:i + batch_rows] for k, v in packed.items()} for i in range(0, n_rows + pad, batch_rows)]


def nll_of(graphdef: nnx.GraphDef, params, batches: list[dict[str, np.ndarray]],
           f=None) -> dict[str, Any]:
  """Token-weighted mean NLL of the model (graphdef, params) over prepared batches."""
  f = f or nll_sums_fn(graphdef)
  total, count = 0.0, 0.0
  for b in batches:
    s, c = f(params, *(jnp.asarray(b[k]) for k in ('tokens', 'positions', 'segment_ids')))
    total += float(s)
    count += float(c)
  mean = total / count
  return {'nll': mean, 'ppl': math.exp(mean), 'tokens': int(count)}


def evaluate_nll(model, seqs: list[list[int]], *, row_length: int, batch_rows: int = 16) -> dict[str, Any]:
  """Token-weighted mean NLL of `model` over the encoded documents `seqs`."""
  graphdef, state = nnx.split(model)
  return {**nll_of(graphdef, state, packed_batches(seqs, row_length, batch_rows)), 'docs': len(seqs)}


def nll_evaluator(graphdef: nnx.GraphDef, tokenizer, path: str, *, max_docs: int | None,
                  bos_id: int, max_len: int, batch_rows: int = 16):
  """params -> {'nll': ...} on the first max_docs documents of `path` (batches prepared once)."""
  seqs = encode_documents(tokenizer, read_documents(path, max_docs), bos_id, max_len)
  batches = packed_batches(seqs, max_len + 1, batch_rows)
  f = nll_sums_fn(graphdef)
  return lambda params: {'nll': nll_of(graphdef, params, batches, f)['nll']}


def evaluate_text(model, tokenizer, path: str, *, max_docs: int | None, bos_id: int,
                  max_len: int, batch_rows: int = 16, through_cache: str = '') -> dict[str, Any]:
  """The README's evaluation definition, end to end, on one text file; with `through_cache` (a
  kvcache.CACHE_DTYPES name) also the same documents decoded token by token through a cache of
  that dtype (`xecomla.cache_eval`), as 'through_cache'."""
  seqs = encode_documents(tokenizer, read_documents(path, max_docs), bos_id, max_len)
  out = {'path': path, **evaluate_nll(model, seqs, row_length=max_len + 1, batch_rows=batch_rows)}
  if through_cache:
    from xecomla import cache_eval  # it builds its batches with right_padded, from this module
    out['through_cache'] = cache_eval.nll_through_cache(model, seqs, cache_dtype=through_cache,
                                                        batch_rows=batch_rows)
  return out


# ----------------------------------------------------------------------------------------------
# Multiple choice, scored the way lm-evaluation-harness scores acc / acc_norm
# ----------------------------------------------------------------------------------------------

def read_mc(path: str) -> list[dict[str, Any]]:
  """JSONL rows {"context": str, "choices": [str, ...], "label": int, "delimiter": " " (optional)}."""
  import json
  rows = []
  with fileio.open_text(path) as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{n} is not valid JSON ({e.msg})') from e
      ok = (isinstance(row, dict) and isinstance(row.get('context'), str) and isinstance(row.get('choices'), list)
            and row['choices'] and isinstance(row.get('label'), int)
            and 0 <= row['label'] < len(row['choices']))
      if not ok:
        raise ValueError(f'{path}:{n}: a multiple-choice row needs "context" (str), "choices" '
                         '(non-empty list of str) and "label" (index into choices).')
      rows.append(row)
  return rows


def continuation_requests(tokenizer, rows, bos_id: int, max_len: int):
  """Per (row, choice): BOS + tokens of context + delimiter + choice, and how many trailing tokens
  are the continuation (tokens of the whole string past the context's own tokens, as
  lm-evaluation-harness splits them); the left is cut to fit max_len + 1 tokens."""
  reqs = []
  for i, row in enumerate(rows):
    ctx = tokenizer.encode(row['context'])
    for j, choice in enumerate(row['choices']):
      whole = tokenizer.encode(row['context'] + row.get('delimiter', ' ') + choice)
      n_cont = max(len(whole) - len(ctx), 1)
      seq = ([bos_id] + whole)[-(max_len + 1):]
      reqs.append((i, j, seq, min(n_cont, len(seq) - 1)))
  return reqs


def right_padded(seqs: list[list[int]], rows: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
  """`seqs` (at most `rows`) one per row, right-padded to the longest rounded up to a multiple of
  `bucket`: tokens and segment ids [rows, width] (segment 1 on tokens, 0 on padding and on rows
  left empty)."""
  width = -(-max(len(s) for s in seqs) // bucket) * bucket
  tokens = np.zeros((rows, width), np.int32)
  seg = np.zeros((rows, width), np.int32)
  for r, s in enumerate(seqs):
    tokens[r, :len(s)] = s
    seg[r, :len(s)] = 1
  return tokens, seg


def loglikelihoods(model, seqs_and_lengths, batch_rows: int = 16, bucket: int = 64) -> list[float]:
  """Sum of log p over the last n tokens of each sequence (each predicted from what precedes it)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def token_logps(state, tokens, segment_ids):
    logits, _ = nnx.merge(graphdef, state)(tokens, None, segment_ids)
    targets, _ = next_token_targets(tokens, segment_ids)
    return token_log_probs(logits, targets)

  order = sorted(range(len(seqs_and_lengths)), key=lambda k: len(seqs_and_lengths[k][0]))
  out = [0.0] * len(seqs_and_lengths)
  for start in range(0, len(order), batch_rows):
    idx = order[start:start + batch_rows]
    tokens, seg = right_padded([seqs_and_lengths[k][0] for k in idx], batch_rows, bucket)
    lp = np.asarray(token_logps(state, jnp.asarray(tokens), jnp.asarray(seg)))
    for r, k in enumerate(idx):
      s, n = seqs_and_lengths[k]
      # target of position t is token t + 1: the last n tokens are targets of positions len-1-n..len-2
      out[k] = float(lp[r, len(s) - 1 - n:len(s) - 1].sum())
  return out


def multiple_choice(model, tokenizer, path: str, *, bos_id: int, batch_rows: int = 16,
                    max_len: int | None = None) -> dict[str, Any]:
  """acc: argmax of summed continuation log-likelihood; acc_norm: argmax of that divided by the
  choice's length in characters (lm-evaluation-harness `multiple_choice`). Each request is cut on
  the left to max_len + 1 tokens (max_len: at most the model's maximum length, its default)."""
  rows = read_mc(path)
  max_len = min(max_len or model.llama.max_seq_len, model.llama.max_seq_len)
  reqs = continuation_requests(tokenizer, rows, bos_id, max_len)
  lls = loglikelihoods(model, [(s, n) for _, _, s, n in reqs], batch_rows)
  per_row: dict[int, list[float]] = {}
  for (i, j, _, _), ll in zip(reqs, lls):
    per_row.setdefault(i, []).append(ll)
  acc = acc_norm = 0.0
  for i, row in enumerate(rows):
    ll = np.asarray(per_row[i])
    lengths = np.asarray([float(len(c)) for c in row['choices']])
    acc += float(np.argmax(ll) == row['label'])
    acc_norm += float(np.argmax(ll / lengths) == row['label'])
  n = len(rows)
  return {'acc': acc / n, 'acc_norm': acc_norm / n, 'n': n, 'path': path}
