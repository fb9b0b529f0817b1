"""Evaluation: the held-out NLL definition used everywhere, and the pieces around it.

The definition (README, "Evaluation"): a text file holds documents separated by `<|endoftext|>`;
each document is stripped, encoded with BOS prepended and no EOS, and truncated so that at most
`max_len` (the model's maximum length) tokens are predicted, each from a context of at most
`max_len` tokens (i.e. to max_len + 1 tokens); the figure is the mean negative log-likelihood per predicted token over all
documents (token-weighted), optionally over the first N documents only. A file that contains no
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

from xecomla.train.losses import next_token_targets, token_log_probs

SEPARATOR = '<|endoftext|>'


def read_documents(path: str, max_docs: int | None = None) -> list[str]:
  """The stripped, non-empty documents of a `<|endoftext|>`-separated text file (paragraphs, split
  at blank lines, when the file has no separator)."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
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


def evaluate_nll(model, seqs: list[list[int]], *, row_length: int, batch_rows: int = 16) -> dict[str, Any]:
  """Token-weighted mean NLL of `model` over the encoded documents `seqs`."""
  packed = pack(seqs, row_length)
  n_rows = packed['tokens'].shape[0]
  pad = (-n_rows) % batch_rows
  packed = {k: np.concatenate([v, np.zeros((pad, row_length), np.int32)]) for k, v in packed.items()}
  graphdef, state = nnx.split(model)
  f = nll_sums_fn(graphdef)
  total, count = 0.0, 0.0
  for i in range(0, n_rows + pad, batch_rows):
    s, c = f(state, *(jnp.asarray(packed[k][i:i + batch_rows])
                      for k in ('tokens', 'positions', 'segment_ids')))
    total += float(s)
    count += float(c)
  mean = total / count
  return {'nll': mean, 'ppl': math.exp(mean), 'tokens': int(count), 'docs': len(seqs)}


def evaluate_text(model, tokenizer, path: str, *, max_docs: int | None, bos_id: int,
                  max_len: int, batch_rows: int = 16) -> dict[str, Any]:
  """The README's evaluation definition, end to end, on one text file."""
  seqs = encode_documents(tokenizer, read_documents(path, max_docs), bos_id, max_len)
  return {'path': path, **evaluate_nll(model, seqs, row_length=max_len + 1, batch_rows=batch_rows)}
