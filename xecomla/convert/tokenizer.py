"""llama2.c tokenizers (tok*.bin) -> a Hugging Face fast tokenizer with identical encoding.

llama2.c encodes (run.c `encode`) by: prepending a space (the sentencepiece dummy prefix) to
non-empty text; looking each UTF-8 character up in the vocabulary, with byte fallback (<0xNN>,
id byte + 3) for characters it lacks; then repeatedly merging the adjacent pair whose concatenation
is a vocabulary piece of the highest score. The Hugging Face BPE model merges by rank, so the
merges list holds, for every piece, each split of it into two vocabulary pieces, ranked by the
piece's score (highest first). `LlamaC2Tokenizer.encode` is a direct port of run.c, kept as the
reference the fast tokenizer is tested against.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from etils import epath

from xecomla import fileio
from xecomla.convert.safetensors_io import CheckpointError

SPECIAL = {0: '<unk>', 1: '<s>', 2: '</s>'}  # llama2.c prints them as '<unk>', '\n<s>\n', '\n</s>\n'
N_BYTES = 256
BYTE_OFFSET = 3


@dataclass
class LlamaC2Tokenizer:
  pieces: list[str]
  scores: list[float]
  max_token_length: int

  @classmethod
  def load(cls, path: str) -> 'LlamaC2Tokenizer':
    if not epath.Path(path).exists():
      raise CheckpointError(f'tokenizer {path} does not exist: pass the llama2.c tok*.bin file.')
    data = epath.Path(path).read_bytes()
    (max_len,), off = struct.unpack_from('<i', data, 0), 4
    pieces, scores = [], []
    try:
      while off < len(data):
        score, n = struct.unpack_from('<fi', data, off)
        off += 8
        pieces.append(data[off:off + n].decode('utf-8'))
        scores.append(score)
        off += n
    except (struct.error, UnicodeDecodeError) as e:
      raise CheckpointError(f'{path} is not a llama2.c tokenizer file ({e}).') from e
    if len(pieces) < BYTE_OFFSET + N_BYTES or pieces[BYTE_OFFSET] != '<0x00>':
      raise CheckpointError(f'{path}: expected <unk>, BOS, EOS and 256 byte pieces <0x00>..<0xFF> '
                            'first, as llama2.c tokenizers have.')
    return cls(pieces, scores, max_len)

  @property
  def vocab_size(self) -> int:
    return len(self.pieces)

  def _lookup(self) -> dict[str, int]:
    if not hasattr(self, '_index'):
      self._index = {p: i for i, p in enumerate(self.pieces) if i >= BYTE_OFFSET + N_BYTES}
    return self._index

  def encode(self, text: str, bos: bool = False) -> list[int]:
    """run.c's encode, quadratic merge loop included (reference implementation)."""
    index = self._lookup()
    ids = [1] if bos else []
    if not text:
      return ids
    tokens: list[int] = [index[' ']]
    for ch in text:
      if ch in index:
        tokens.append(index[ch])
      else:
        tokens.extend(b + BYTE_OFFSET for b in ch.encode('utf-8'))
    while True:
      best, best_id, best_i = -1e10, -1, -1
      for i in range(len(tokens) - 1):
        merged = index.get(self.pieces[tokens[i]] + self.pieces[tokens[i + 1]], -1)
        if merged != -1 and self.scores[merged] > best:
          best, best_id, best_i = self.scores[merged], merged, i
      if best_i == -1:
        break
      tokens[best_i:best_i + 2] = [best_id]
    return ids + tokens

  def decode(self, ids: list[int]) -> str:
    """run.c's decode: byte pieces become raw bytes; the leading space after BOS is dropped."""
    out = bytearray()
    prev = None
    for t in ids:
      if t in SPECIAL:
        prev = t
        continue
      piece = self.pieces[t]
      if BYTE_OFFSET <= t < BYTE_OFFSET + N_BYTES:
        out.append(t - BYTE_OFFSET)
      else:
        if prev in (1, None) and not out and piece.startswith(' '):
          piece = piece[1:]
        out.extend(piece.encode('utf-8'))
      prev = t
    return out.decode('utf-8', errors='replace')

  def merges(self) -> list[tuple[str, str]]:
    """Every split of every piece into two pieces, ranked by the piece's score, highest first."""
    index = self._lookup()
    pieces = sorted(index, key=lambda p: -self.scores[index[p]])
    return [(p[:k], p[k:]) for p in pieces for k in range(1, len(p))
            if p[:k] in index and p[k:] in index]

  def hf_tokenizer_json(self) -> dict:
    """The tokenizer.json of an equivalent Hugging Face fast tokenizer."""
    vocab = {SPECIAL.get(i, p): i for i, p in enumerate(self.pieces)}
    added = [{'id': i, 'content': s, 'single_word': False, 'lstrip': False, 'rstrip': False,
              'normalized': False, 'special': True} for i, s in SPECIAL.items()]
    return {
        'version': '1.0', 'truncation': None, 'padding': None, 'added_tokens': added,
        'normalizer': {'type': 'Prepend', 'prepend': ' '},
        'pre_tokenizer': None,
        'post_processor': {
            'type': 'TemplateProcessing',
            'single': [{'SpecialToken': {'id': '<s>', 'type_id': 0}},
                       {'Sequence': {'id': 'A', 'type_id': 0}}],
            'pair': [{'SpecialToken': {'id': '<s>', 'type_id': 0}},
                     {'Sequence': {'id': 'A', 'type_id': 0}},
                     {'SpecialToken': {'id': '<s>', 'type_id': 1}},
                     {'Sequence': {'id': 'B', 'type_id': 1}}],
            'special_tokens': {'<s>': {'id': '<s>', 'ids': [1], 'tokens': ['<s>']}}},
        'decoder': {'type': 'Sequence', 'decoders': [
            {'type': 'ByteFallback'}, {'type': 'Fuse'},
            {'type': 'Strip', 'content': ' ', 'start': 1, 'stop': 0}]},
        'model': {'type': 'BPE', 'dropout': None, 'unk_token': '<unk>',
                  'continuing_subword_prefix': None, 'end_of_word_suffix': None,
                  'fuse_unk': True, 'byte_fallback': True, 'ignore_merges': False,
                  'vocab': vocab, 'merges': [list(m) for m in self.merges()]},
    }

  def save_hf(self, directory: str, model_max_length: int) -> None:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    d = epath.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fileio.write_text(d / 'tokenizer.json', json.dumps(self.hf_tokenizer_json(), ensure_ascii=False))
    special = {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>'}
    fileio.write_text(d / 'tokenizer_config.json', json.dumps(
        {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': model_max_length,
         'clean_up_tokenization_spaces': False, **special}, indent=2))
    fileio.write_text(d / 'special_tokens_map.json', json.dumps(special, indent=2))
