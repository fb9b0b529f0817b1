"""Per-device memory of a train step from shapes alone: every platform, every mesh, no compiler.

Exact terms (from the parameter trees and the sharding rules of xecomla/sharding.py):
  student_params  the trained model, float32
  optimizer       AdamW's two moments (float32) of the trainable parameters
  gradients       the float32 accumulator of the trainable parameters, plus one micro-step's
                  gradient when accum > 1
  frozen          the KD teacher / DPO reference at the dtype it is stored in
  batch           the step's int32 inputs (the whole global batch, all micro-steps)
Estimated term:
  activations     what one micro-step keeps for its backward pass: under remat 'full' each
                  block's input [b, T, D] plus one block's intermediates (recomputed), under
                  'none' / 'dots_saveable' every block's intermediates; a dense attention
                  kernel adds float32 scores and probabilities [b, heads, T, T]; the KD loss keeps
                  five float32 [positions, vocab] tensors (teacher and student logits, both
                  log-probabilities, the logits' gradient) for `chunk` positions at a time (whole
                  rows without chunking), the DPO loss three over whole rows (the policy's
                  logits, log-probabilities and their gradient; the reference's log-probs are
                  computed before, once); the frozen model's forward keeps one block's worth.
It is meant to rank candidate meshes; the compiler's memory_analysis is the figure that counts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np

from xecomla import sharding
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig, MLAConfig
from xecomla.train import steps

FUSED = ('splash', 'cudnn')   # attention kernels that never hold [T, S] scores
LOSS_TENSORS = {'kd': 5, 'dpo': 3}  # float32 [positions, vocab] tensors alive in the loss
ADAM_MOMENTS = 2


@dataclasses.dataclass(frozen=True)
class StepShape:
  """What a step's memory depends on, per micro-step."""
  kind: str                    # 'kd' | 'dpo'
  student: MLAConfig
  frozen: LlamaConfig | MLAConfig
  frozen_itemsize: int         # bytes per frozen parameter
  compute_itemsize: int        # bytes per activation (the compute dtype)
  rows: int                    # global rows per step (all micro-steps; DPO: pairs)
  accum: int
  seq_len: int
  remat: str = 'full'
  attention: str = 'reference'
  chunk: int = 0               # loss positions at a time (0 = whole rows)
  trainable: str = 'all'


def abstract_mesh(mesh: dict[str, int]) -> jax.sharding.AbstractMesh:
  return jax.sharding.AbstractMesh(tuple(mesh[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


def tree_bytes(abstract: Any, axes: Any, mesh: dict[str, int], itemsize: int | None = None,
               predicate=None) -> int:
  """Per-device bytes of a parameter tree sharded by xecomla's rules over `mesh` (axis sizes);
  `itemsize` overrides the stored dtype; `predicate(path)` keeps only some parameters."""
  am = abstract_mesh(mesh)
  flat_x = jax.tree_util.tree_flatten_with_path(abstract)[0]
  flat_a = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  total = 0
  for (path, x), ax in zip(flat_x, flat_a):
    keys = tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in path)
    if predicate is not None and not predicate(keys):
      continue
    spec = sharding.spec_for(x.shape, ax, am)
    split = math.prod(am.shape[a] for s in spec if s is not None
                      for a in ((s,) if isinstance(s, str) else s))
    total += x.size * (itemsize or np.dtype(x.dtype).itemsize) // split
  return int(total)


@functools.lru_cache(maxsize=16)
def trees(c: LlamaConfig | MLAConfig) -> tuple[Any, Any]:
  """(abstract parameters, logical axes) of a model: built once per config (nnx.eval_shape of
  a whole model is slow at 1B+ parameters, and the search asks for many meshes)."""
  return transformer.abstract_params(c), transformer.param_axes(c)


def _widths(c: LlamaConfig | MLAConfig) -> tuple[int, int, int]:
  """(activation values per token in one block's attention projections, heads, head_dim)."""
  if isinstance(c, MLAConfig):
    l, n = c.llama, c.llama.n_heads
    r_q = c.r_q[0] or 0
    proj = (r_q + n * (c.d_qk + c.d_r) + c.r_kv[0] + c.d_r + n * c.d_qk + n * c.d_v
            + n * (c.d_qk + c.d_r) + n * c.d_v + l.dim)
    return proj, n, c.d_qk + c.d_r
  n, d_h = c.n_heads, c.head_dim
  return 2 * n * d_h + 2 * c.n_kv_heads * d_h + c.dim, n, d_h


def block_bytes(c: LlamaConfig | MLAConfig, b: int, t: int, tensor: int, itemsize: int,
                attention: str) -> int:
  """One block's forward intermediates for b rows of t tokens on one device."""
  llama = c.llama if isinstance(c, MLAConfig) else c
  proj, heads, _ = _widths(c)
  per_token = (proj + 3 * llama.hidden_dim / tensor + 2 * llama.dim) * itemsize
  scores = 0 if attention in FUSED else 2 * heads / tensor * t * 4  # f32 scores + probabilities
  return int(b * t * (per_token + scores))


def activation_bytes(s: StepShape, mesh: dict[str, int]) -> dict[str, int]:
  """The estimated activation terms of one micro-step on one device."""
  per_step = s.rows // s.accum
  b = per_step // (mesh['data'] * mesh['fsdp'])
  if s.kind == 'dpo':
    b *= 2  # chosen and rejected
  t, tp, c = s.seq_len, mesh['tensor'], s.compute_itemsize
  llama = s.student.llama
  one = block_bytes(s.student, b, t, tp, c, s.attention)
  if s.remat == 'full':
    saved = llama.n_layers * b * t * llama.dim * c + 2 * one  # one block and its gradient
  else:
    saved = llama.n_layers * one
  positions = min(s.chunk, t) if s.chunk and s.kind == 'kd' else t
  loss = LOSS_TENSORS[s.kind] * b * positions * math.ceil(llama.vocab_size / tp) * 4
  frozen_llama = s.frozen.llama if isinstance(s.frozen, MLAConfig) else s.frozen
  frozen = block_bytes(s.frozen, b, t, tp, c, s.attention) + b * t * frozen_llama.dim * c
  return {'student_activations': int(saved), 'loss': int(loss), 'frozen_activations': int(frozen)}


def breakdown(s: StepShape, mesh: dict[str, int]) -> dict[str, int]:
  """Every term in bytes per device, and their sum `total`."""
  predicate = steps.is_trainable(s.trainable)
  abstract, axes = trees(s.student)
  params = tree_bytes(abstract, axes, mesh)
  trainable = tree_bytes(abstract, axes, mesh, predicate=predicate)
  frozen = tree_bytes(*trees(s.frozen), mesh, itemsize=s.frozen_itemsize)
  fields = 4 if s.kind == 'kd' else 8
  out = {'student_params': params, 'optimizer': ADAM_MOMENTS * trainable,
         'gradients': trainable * (2 if s.accum > 1 else 1), 'frozen': frozen,
         'batch': s.rows * s.seq_len * 4 * fields // (mesh['data'] * mesh['fsdp'])}
  out.update(activation_bytes(s, mesh))
  out['total'] = int(sum(out.values()))
  return out


def static_bytes(terms: dict[str, int]) -> int:
  """The exact part of a breakdown (everything but the activation estimates)."""
  return sum(terms[k] for k in ('student_params', 'optimizer', 'gradients', 'frozen', 'batch'))
