"""grain input pipelines: packed plain text, chat SFT, preference pairs (the chat and preference
examples themselves are encoded in `xecomla.chat_data`).

Every batch is a dict of int32 numpy arrays [B, T]: `tokens`, `positions`, `segment_ids`
(0 = padding) and, for chat, `loss_mask` (1 where the *next* token is a training target, i.e.
assistant tokens). Preference batches hold the same fields prefixed `chosen_` and `rejected_`.

Text and chat examples are shuffled by seed, repeated without end and packed first-fit into rows
of `seq_len` with per-document positions and segment ids, so attention never crosses documents
(`models.attention.attention_mask`). Documents longer than a row are cut into row-sized chunks
first. Iterators are grain `DatasetIterator`s: `get_state()` is a small JSON dict checkpointed with
the model, `set_state()` resumes exactly.

Every process runs the same pipeline, so a global batch does not depend on the number of
processes (first-fit packing of split streams would pack other rows); `global_batch` hands the
devices only this process's rows; each process checkpoints its iterator (grain's orbax handler).
"""

from __future__ import annotations

from typing import Iterable

import grain
import grain.experimental as ge
import jax
import numpy as np
from etils import epath

from xecomla import eval as evaluation, sharding as sharding_lib
# Chat and preference examples live in chat_data; data_checks and callers still name them here.
from xecomla.chat_data import (ROLES, chat_examples, encode_pair, preference_examples,  # noqa: F401
                               preference_pair, read_jsonl)
from xecomla.cli import UsageError


# ----------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------

def chunk(ids: list[int], length: int) -> list[list[int]]:
  """Cuts a document into pieces of at most `length` tokens (pieces of one token are dropped:
  they predict nothing)."""
  return [ids[i:i + length] for i in range(0, len(ids), length) if len(ids[i:i + length]) > 1]


def text_examples(tokenizer, path: str, bos_id: int, seq_len: int) -> list[dict[str, np.ndarray]]:
  if not epath.Path(path).exists():  # also gs://
    raise UsageError(f'training text {path} does not exist: set data.train_path.')
  docs = evaluation.read_documents(path)
  examples = []
  for ids in tokenizer.encode_batch(docs):
    for piece in chunk([bos_id] + ids, seq_len):
      examples.append({'tokens': np.asarray(piece, np.int32)})
  return examples


# ----------------------------------------------------------------------------------------------
# Packed training pipeline
# ----------------------------------------------------------------------------------------------

def packed_dataset(examples: list[dict[str, np.ndarray]], *, seq_len: int, batch_size: int,
                   seed: int, mix: tuple[list[dict[str, np.ndarray]], float] | None = None
                   ) -> grain.IterDataset:
  """Shuffled, endlessly repeated, first-fit packed global batches (the same in every process).
  mix = (other examples, weight of `examples`): examples drawn from both streams at that ratio
  (each shuffled and repeated on its own) before packing."""
  if not examples or (mix is not None and not mix[0]):
    raise UsageError('the training data holds no usable example.')
  ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None)
  if mix is not None:
    other = grain.MapDataset.source(mix[0]).shuffle(seed=seed + 1).repeat(None)
    ds = grain.MapDataset.mix([ds, other], weights=[mix[1], 1.0 - mix[1]])
  fields = list(examples[0])
  packed = ge.FirstFitPackIterDataset(ds.to_iter_dataset(),
                                      length_struct={k: seq_len for k in fields},
                                      num_packing_bins=max(2 * batch_size, 8), seed=seed)

  def rename(ex):
    out = {'tokens': ex['tokens'], 'positions': ex['tokens_positions'],
           'segment_ids': ex['tokens_segment_ids']}
    if 'loss_mask' in ex:
      out['loss_mask'] = ex['loss_mask']
    return {k: np.asarray(v, np.int32) for k, v in out.items()}

  return packed.map(rename).batch(batch_size, drop_remainder=True)


def document_examples(docs: list[np.ndarray], seq_len: int) -> list[dict[str, np.ndarray]]:
  """Token-id documents (BOS first) -> row-sized examples, as text_examples cuts them."""
  return [{'tokens': np.asarray(piece, np.int32)} for ids in docs
          for piece in chunk(list(ids), seq_len)]


def train_dataset(config, tokenizer, bos_id: int, teacher_docs: list[np.ndarray] | None = None,
                  batch_size: int | None = None) -> grain.IterDataset:
  """The training batches of `config.data`; `teacher_docs` (teacher_data.stories) replace the
  text (data.teacher_fraction 1) or are mixed with it at that fraction of examples. batch_size
  defaults to train.batch_size (on-policy distillation reads fewer rows from the data)."""
  c = config
  batch_size = batch_size or c.train.batch_size
  if teacher_docs is not None:
    generated = document_examples(teacher_docs, c.train.seq_len)
    fraction = float(c.data.teacher_fraction)
    mix = None
    if fraction < 1.0:
      mix = (text_examples(tokenizer, c.data.train_path, bos_id, c.train.seq_len), fraction)
    return packed_dataset(generated, seq_len=c.train.seq_len, batch_size=batch_size,
                          seed=c.seed, mix=mix)
  if c.data.format == 'text':
    examples = text_examples(tokenizer, c.data.train_path, bos_id, c.train.seq_len)
  elif c.data.format == 'chat':
    examples = chat_examples(tokenizer, c.data.train_path, bos_id, c.train.seq_len)
  else:
    raise UsageError(f"data.format={c.data.format!r}: use 'text' or 'chat'.")
  return packed_dataset(examples, seq_len=c.train.seq_len, batch_size=batch_size, seed=c.seed)


def global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """A global batch (every process holds the same) -> global arrays sharded over the batch axis,
  each process passing only its own rows to its devices."""
  out = {}
  for k, v in batch.items():
    rows = sharding_lib.process_rows(sharding, v.shape)
    out[k] = jax.make_array_from_process_local_data(sharding, v[rows], v.shape)
  return out


# ----------------------------------------------------------------------------------------------
# Preference pairs
# ----------------------------------------------------------------------------------------------

def preference_dataset(examples: list[dict[str, np.ndarray]], *, batch_size: int,
                       seed: int) -> grain.IterDataset:
  """Shuffled, endlessly repeated global batches of pairs (the same in every process)."""
  ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None)
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)


def stack(examples: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  examples = list(examples)
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
