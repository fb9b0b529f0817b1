"""Calibration statistics for activation-aware initialisation: per layer, the Gram matrix
C = X^T X / n of the teacher's attention inputs X (the normed hidden states entering W^Q, W^K,
W^V) over a small calibration text.

Like the rest of the conversion (svd.py), the statistics must not depend on the accelerator: the
teacher forward pass and the Gram products run at Precision.HIGHEST (full float32 on every
backend; the default is bfloat16 on TPU and TF32 on recent GPUs, which would perturb C by ~1e-3).
Per-batch Grams are summed on the host in float64. Moving every batch's activations to the host
to accumulate the products there in float64 would cost [rows, T, D] per layer in transfers; the
float32 accumulation inside one batch (at most batch_rows * row_length tokens) is what remains.

Rows are `row_length(mla.calib_len, max_seq_len)` tokens: a Llama-3 allows 131,072 positions, and
one row that long would need a [T, T] mask and [heads, T, T] float32 scores per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xecomla import eval as evaluation
from xecomla.convert import svd
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig


def attention_input_grams(llama: LlamaConfig, params: dict, seqs: list[list[int]],
                          row_length: int, batch_rows: int = 8) -> list[np.ndarray]:
  """Per layer C = X^T X / n over the real (non-padding) tokens of the packed `seqs`."""
  model = transformer.from_params(llama, params)
  graphdef, state = nnx.split(model)

  @jax.jit
  def grams(state, tokens, positions, segment_ids):
    with jax.default_matmul_precision('highest'):  # the teacher's own matmuls, traced here
      m = nnx.merge(graphdef, state)
      _, _, hidden = m(tokens, positions, segment_ids, return_hidden=True)
      inputs = [m.embed(tokens)] + hidden[:-1]
      w = (segment_ids > 0).astype(jnp.float32)[..., None]
      out = []
      for block, x in zip(m.layers, inputs):
        h = block.attn_norm(x) * w
        out.append(jnp.einsum('BTD,BTE->DE', h, h, preferred_element_type=jnp.float32,
                              precision=jax.lax.Precision.HIGHEST))
      return out, jnp.sum(w)

  packed = evaluation.pack(seqs, row_length)
  total = [np.zeros((llama.dim, llama.dim), np.float64) for _ in range(llama.n_layers)]
  count = 0.0
  for i in range(0, packed['tokens'].shape[0], batch_rows):
    g, n = grams(state, *(jnp.asarray(packed[k][i:i + batch_rows])
                          for k in ('tokens', 'positions', 'segment_ids')))
    total = [t + np.asarray(x, np.float64) for t, x in zip(total, g)]
    count += float(n)
  return [t / count for t in total]


def row_length(calib_len: int, max_seq_len: int) -> int:
  """Tokens per calibration row: mla.calib_len, at most the model's maximum length."""
  return min(calib_len, max_seq_len)


def calibration_seqs(tokenizer, path: str, bos_id: int, max_len: int, docs: int,
                     tokens: int) -> list[list[int]]:
  """Up to `docs` documents of `path`, encoded like evaluation text, each at most `max_len` tokens
  (BOS included; the row length), capped at `tokens` in all."""
  seqs, used = [], 0
  for s in evaluation.encode_documents(tokenizer, evaluation.read_documents(path, docs), bos_id,
                                       max_len - 1):
    if used >= tokens:
      break
    seqs.append(s[:tokens - used])
    used += len(seqs[-1])
  return seqs


def whiteners(grams: list[np.ndarray], damp: float = 1e-2) -> list[np.ndarray]:
  return [svd.cholesky_whitener(g, damp) for g in grams]
