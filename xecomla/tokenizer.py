"""The tokenizer of a Hugging Face model directory (tokenizer.json), used without transformers."""

from __future__ import annotations

import os

from tokenizers import Tokenizer as _HFTokenizer

from xecomla.convert.safetensors_io import CheckpointError


class Tokenizer:
  """Encodes text to ids without special tokens (callers add BOS themselves) and decodes ids."""

  def __init__(self, directory: str):
    path = os.path.join(directory, 'tokenizer.json')
    if not os.path.exists(path):
      raise CheckpointError(f'{path} is missing: the model directory needs a fast tokenizer '
                            '(tokenizer.json).')
    self._tok = _HFTokenizer.from_file(path)
    self._tok.no_truncation()
    self._tok.no_padding()

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=True)
