"""Where a KD step's time goes, for `benchmarks.train_throughput --parts`: the parts of xecomla's
jitted step timed alone, XLA's cost analysis of the whole step and a profiler trace of it grouped
by what the ops compute; and the parts of the PyTorch step (benchmarks/torch_kd.py).

Trace groups (by each op's output shape, T the sequence length, V the vocabulary):
  vocab      [B, T, V] (rank 3 at most): the heads' logits, log-softmax, KL and cross-entropy;
  attention  score-shaped tensors of rank 4 or more, [..., k T, m T] (the masks, softmax and its
             backward), and the score / weighted-sum contractions (einsums over BNTS);
  matmul     every other dot: projections and the MLP;
  other      norms, RoPE, SwiGLU's product, the optimizer, copies.
Op times are summed over the threads that ran them, so they add up to more than the wall time.
"""

from __future__ import annotations

import collections
import functools
import re
import statistics
import time

import jax
import numpy as np
import torch

from benchmarks import roofline
from benchmarks.common import timed
from benchmarks.torch_kd import TorchKD, kd_loss


def group(op: dict, seq_len: int, vocab: int) -> str:
  dims = [int(d) for d in re.findall(r'\d+', op['shape'].split('{')[0].split('[', 1)[-1])]
  if len(dims) <= 3 and dims and dims[-1] == vocab:
    return 'vocab'
  if 'BNTS' in op['what'] or (len(dims) >= 4 and dims[-1] % seq_len == 0 and
                              dims[-2] % seq_len == 0):
    return 'attention'
  return 'matmul' if 'dot_general' in op['what'] else 'other'


def xecomla_parts(trainer, state, frozen, batch, n: int, vocab: int) -> tuple[dict, dict]:
  """Median seconds of the step's parts, each jitted alone on the same inputs (the teacher's
  forward; the student's forward and loss; its forward and backward); the compiled whole step's
  FLOPs and bytes accessed (XLA's cost analysis); and the share of op time per trace group over n
  more steps. Returns (figures, the state after those steps: the step donates it)."""
  fn, params = trainer.loss_fn, state['params']
  prep = jax.jit(fn.prepare)
  t_out = prep(frozen, batch)
  fns = {'teacher_forward': lambda: prep(frozen, batch),
         'student_forward_loss': functools.partial(jax.jit(lambda p, t: fn.loss(p, t, batch)[0]),
                                                   params, t_out),
         'student_forward_backward': functools.partial(
             jax.jit(jax.grad(lambda p, t: fn.loss(p, t, batch)[0])), params, t_out)}
  out = {}
  for k, f in fns.items():
    jax.block_until_ready(f())
    out[k] = round(statistics.median(timed(lambda: jax.block_until_ready(f()), n)), 4)
  compiled = trainer.step.lower(state, frozen, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out.update(hlo_flops=cost.get('flops'), hlo_bytes_accessed=cost.get('bytes accessed'))
  box = {'state': state}

  def run():
    for _ in range(n):
      box['state'], m = trainer.step(box['state'], frozen, batch)
    jax.block_until_ready(m)

  ops = roofline.op_profile(run, compiled.as_text(), n, top=100000)
  seq_len = batch['tokens'].shape[1]
  ms = collections.Counter()
  for op in ops:
    ms[group(op, seq_len, vocab)] += op['ms_per_step']
  total = sum(ms.values())
  out['op_ms_per_step'] = round(total, 1)
  out['op_share'] = {k: round(v / total, 3) for k, v in ms.most_common()}
  out['top_ops'] = [{k: (round(v, 2) if k == 'ms_per_step' else v) for k, v in op.items()}
                    for op in ops[:8]]
  return out, box['state']


def torch_parts(kd: TorchKD, batch, n: int) -> dict[str, float]:
  """Median seconds of the parts of n KD steps, run in order as `TorchKD.step` runs them: the
  teacher's forward, the student's forward and loss, its backward, clipping and the AdamW update."""
  tokens = torch.from_numpy(np.asarray(batch['tokens'], np.int64))
  positions = torch.from_numpy(np.asarray(batch['positions'], np.int64))
  seg = torch.from_numpy(np.asarray(batch['segment_ids'], np.int64))
  times: dict[str, list[float]] = {}
  for _ in range(n):
    marks = [time.perf_counter()]
    with torch.no_grad():
      t_logits = kd.teacher(input_ids=tokens, position_ids=positions).logits
    marks.append(time.perf_counter())
    loss, _ = kd_loss(kd.student(input_ids=tokens, position_ids=positions).logits, t_logits,
                      tokens, seg, kl_weight=kd.d.kl_weight, ce_weight=kd.d.ce_weight,
                      temperature=kd.d.temperature)
    marks.append(time.perf_counter())
    kd.opt.zero_grad(set_to_none=True)
    loss.backward()
    marks.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_(kd.student.parameters(), kd.clip)
    kd.opt.step()
    marks.append(time.perf_counter())
    for k, a, b in zip(('teacher_forward', 'student_forward_loss', 'student_backward',
                        'clip_adamw'), marks, marks[1:]):
      times.setdefault(k, []).append(b - a)
  return {k: round(float(np.median(v)), 4) for k, v in times.items()}
