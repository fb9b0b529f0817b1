"""llama2.c checkpoints (legacy version-0 .bin) -> a standard Hugging Face Llama directory.

Layout of the .bin: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
a negative vocab_size means an untied output layer), then float32 tok_emb, rms_att, wq, wk, wv, wo,
rms_ffn, w1, w2, w3, rms_final, freq_cis_real, freq_cis_imag, [wcls if untied]; matrices [out, in].

llama2.c applies RoPE to interleaved pairs (0,1), (2,3), ...; Hugging Face Llama to rotate-half
pairs (j, j + d/2). Each head's q/k rows are therefore reordered to [even rows, odd rows], as
transformers' own Meta-to-HF conversion does.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from etils import epath

from xecomla import fileio
from xecomla.convert import hf
from xecomla.convert.safetensors_io import CheckpointError
from xecomla.convert.tokenizer import LlamaC2Tokenizer
from xecomla.models.config import LlamaConfig

HEADER = 7
MAGIC = 0x616b3432  # 'ak42': llama2.c's versioned export formats


def interleaved_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Reorders the rows of a q/k weight [n_heads * d_h, in] from interleaved RoPE pairs to the
  rotate-half layout: per head, rows [0, 2, 4, ..., 1, 3, 5, ...]."""
  out_dim, in_dim = w.shape
  d_h = out_dim // n_heads
  return w.reshape(n_heads, d_h // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def _layout(path: str, head: bytes, size: int, norm_eps: float, rope_theta: float, bos_id: int,
            eos_id: int) -> tuple[LlamaConfig, list[tuple[str, tuple[int, ...]]]]:
  """The config and tensor layout a llama2.c header implies, checked against the file size."""
  if len(head) >= 4 and struct.unpack_from('<I', head)[0] == MAGIC:
    raise CheckpointError(f'{path} is a versioned llama2.c export (magic ak42): export it with '
                          'version=0 (legacy) to import it.')
  if len(head) < 4 * HEADER:
    raise CheckpointError(f'{path} is too short to be a llama2.c checkpoint: give a legacy '
                          'llama2.c .bin.')
  dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack_from('<7i', head)
  shared = vocab > 0
  vocab = abs(vocab)
  if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads:
    header = (dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len)
    raise CheckpointError(f'{path}: implausible llama2.c header {header}: is it a llama2.c .bin?')
  d_h = dim // n_heads
  kv_dim = n_kv_heads * d_h
  shapes = [('tok_emb', (vocab, dim)), ('rms_att', (n_layers, dim)),
            ('wq', (n_layers, dim, dim)), ('wk', (n_layers, kv_dim, dim)),
            ('wv', (n_layers, kv_dim, dim)), ('wo', (n_layers, dim, dim)),
            ('rms_ffn', (n_layers, dim)), ('w1', (n_layers, hidden, dim)),
            ('w2', (n_layers, dim, hidden)), ('w3', (n_layers, hidden, dim)),
            ('rms_final', (dim,)), ('freq_real', (seq_len, d_h // 2)),
            ('freq_imag', (seq_len, d_h // 2))]
  if not shared:
    shapes.append(('wcls', (vocab, dim)))
  expected = 4 * HEADER + 4 * sum(int(np.prod(s)) for _, s in shapes)
  if size != expected:
    raise CheckpointError(f'{path} has {size} bytes but its header implies {expected}: the file '
                          'is truncated or not a legacy llama2.c checkpoint; re-download it.')
  config = LlamaConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=d_h, hidden_dim=hidden, norm_eps=norm_eps,
                       rope_theta=rope_theta, max_seq_len=seq_len, tie_embeddings=shared,
                       bos_id=bos_id, eos_id=eos_id)
  return config, shapes


def read_config(path: str, norm_eps: float = 1e-5, rope_theta: float = 10000.0, bos_id: int = 1,
                eos_id: int = 2) -> LlamaConfig:
  """The config of a llama2.c checkpoint from its header and size alone (no weights read)."""
  if not epath.Path(path).is_file():
    raise CheckpointError(f'llama2.c checkpoint {path} does not exist: fix teacher.path.')
  with epath.Path(path).open('rb') as f:
    head = f.read(4 * HEADER)
    f.seek(0, 2)
    size = f.tell()
  return _layout(path, head, size, norm_eps, rope_theta, bos_id, eos_id)[0]


def read_llama2c(path: str, norm_eps: float = 1e-5, rope_theta: float = 10000.0,
                 bos_id: int = 1, eos_id: int = 2) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
  """Reads a legacy llama2.c checkpoint into a config and Hugging Face-named tensors."""
  if not epath.Path(path).exists():
    raise CheckpointError(f'llama2.c checkpoint {path} does not exist.')
  data = epath.Path(path).read_bytes()
  config, shapes = _layout(path, data[:4 * HEADER], len(data), norm_eps, rope_theta, bos_id, eos_id)
  n_layers, n_heads, n_kv_heads, shared = (config.n_layers, config.n_heads, config.n_kv_heads,
                                           config.tie_embeddings)
  floats = np.frombuffer(data, dtype='<f4', offset=4 * HEADER)
  w, off = {}, 0
  for name, shape in shapes:
    n = int(np.prod(shape))
    w[name] = floats[off:off + n].reshape(shape)
    off += n
  t = {'model.embed_tokens.weight': w['tok_emb'], 'model.norm.weight': w['rms_final']}
  if not shared:
    t['lm_head.weight'] = w['wcls']
  for l in range(n_layers):
    p = f'model.layers.{l}.'
    t[p + 'input_layernorm.weight'] = w['rms_att'][l]
    t[p + 'post_attention_layernorm.weight'] = w['rms_ffn'][l]
    t[p + 'self_attn.q_proj.weight'] = interleaved_to_rotate_half(w['wq'][l], n_heads)
    t[p + 'self_attn.k_proj.weight'] = interleaved_to_rotate_half(w['wk'][l], n_kv_heads)
    t[p + 'self_attn.v_proj.weight'] = w['wv'][l]
    t[p + 'self_attn.o_proj.weight'] = w['wo'][l]
    t[p + 'mlp.gate_proj.weight'] = w['w1'][l]
    t[p + 'mlp.down_proj.weight'] = w['w2'][l]
    t[p + 'mlp.up_proj.weight'] = w['w3'][l]
  return config, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}


def convert(checkpoint: str, tokenizer: str, out: str) -> LlamaConfig:
  """Writes a Hugging Face Llama directory (config, weights, tokenizer) for a llama2.c model.

  Everything is written into a temporary sibling directory first and renamed at the end, so a
  failed conversion leaves nothing half-written; an existing non-empty `out` is never overwritten.
  """
  if fileio.is_nonempty_dir(out):
    raise CheckpointError(f'output directory {out} exists and is not empty: choose a new --out.')
  config, tensors = read_llama2c(checkpoint)
  tok = LlamaC2Tokenizer.load(tokenizer)
  if tok.vocab_size != config.vocab_size:
    raise CheckpointError(f'tokenizer {tokenizer} has {tok.vocab_size} pieces, the checkpoint '
                          f'{config.vocab_size}: they do not belong together.')
  tmp = os.fspath(out).rstrip('/') + '.tmp'
  epath.Path(tmp).rmtree(missing_ok=True)
  hf.save_llama(tmp, config, hf.hf_to_params(config, tensors))
  tok.save_hf(tmp, model_max_length=config.max_seq_len)
  fileio.commit_dir(tmp, out)
  return config
