"""The tokenizer of a Hugging Face model directory (tokenizer.json), used without transformers,
with the directory's chat template when it has one (`xecomla.chat`)."""

from __future__ import annotations

import os

from etils import epath
from tokenizers import Tokenizer as _HFTokenizer

from xecomla import chat, fileio
from xecomla.convert.safetensors_io import CheckpointError


class Tokenizer:
  """Encodes text to ids without special tokens (callers add BOS themselves; added tokens in the
  text, such as a chat template's <|eot_id|>, are still recognised) and decodes ids.
  `chat_template`: the directory's chat.ChatTemplate, or None."""

  def __init__(self, directory: str):
    path = os.fspath(epath.Path(directory) / 'tokenizer.json')
    if not epath.Path(path).exists():
      raise CheckpointError(f'{path} is missing: the model directory needs a fast tokenizer '
                            '(tokenizer.json).')
    self._tok = _HFTokenizer.from_str(fileio.read_text(path))  # from_file reads local files only
    self._tok.no_truncation()
    self._tok.no_padding()
    self.chat_template = chat.load_template(directory)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each token's [start, end) characters in `text`."""
    e = self._tok.encode(text, add_special_tokens=False)
    return e.ids, e.offsets

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=True)
