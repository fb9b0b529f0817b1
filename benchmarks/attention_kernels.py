"""Attention alone, forward + backward: reference (einsums), blocked (the same in causal blocks,
CPU's `auto`) and xla (jax.nn.dot_product_attention):
GQA at the Llama-3.2-1B shape (32 query / 8 KV heads of 64) and the MLA explicit path of its r_kv-64
student (d_qk 32 + d_r 32, d_v 64), called as the models call them, on two packed documents.

  python -m benchmarks.attention_kernels --seq_len=512 --repeats=20

Each repeat times every case once (interleaved, so drift of a shared machine hits all alike); the
median and minimum per case are printed. This is how `model.attention=auto` was chosen for CPU.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import print_machine
from xecomla.models import attention

_SEQ = flags.DEFINE_integer('seq_len', 512, 'Tokens per row (two documents of half each).')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed repeats of every case.')
B, N, K, H = 1, 32, 8, 64


def cases(t: int) -> dict:
  rng = np.random.default_rng(0)
  arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  seg = jnp.asarray(np.repeat([1, 2], t // 2)[None], jnp.int32)
  pos = jnp.asarray(np.tile(np.arange(t // 2), 2)[None], jnp.int32)
  mask = attention.attention_mask(pos, seg, pos, seg)
  gqa = (arr(B, t, N, H), arr(B, t, K, H), arr(B, t, K, H))
  mla = (arr(B, t, N, 32), arr(B, t, N, 32), arr(B, t, N, 32), arr(B, t, 32), arr(B, t, N, 64))

  def mla_attn(q_c, k_c, q_r, k_r, v, impl):
    if impl == 'reference':
      return attention.attend_shared_rope(q_c, k_c, q_r, k_r, v, mask, 0.125)
    if impl == 'blocked':  # as models.mla calls it
      shared = lambda qs, ks, m: attention.attend_shared_rope(qs[0], ks[0], qs[1], ks[1], ks[2], m,
                                                              0.125)
      return attention.causal_blocks(shared, (q_c, q_r), (k_c, k_r, v), mask)
    k = jnp.concatenate([k_c, jnp.broadcast_to(k_r[:, :, None, :], (B, t, N, 32))], -1)
    return attention.dot_product(jnp.concatenate([q_c, q_r], -1), k, v, mask, 0.125, impl)

  out = {}
  for impl in ('reference', 'blocked', 'xla'):
    gqa_loss = lambda *a, impl=impl: jnp.sum(attention.dot_product(*a, mask, 0.125, impl) ** 2)
    mla_loss = lambda *a, impl=impl: jnp.sum(mla_attn(*a, impl) ** 2)
    out[('gqa', impl)] = (jax.jit(jax.grad(gqa_loss, (0, 1, 2))), gqa)
    out[('mla', impl)] = (jax.jit(jax.grad(mla_loss, tuple(range(5)))), mla)
  return out


def main(argv):
  del argv
  print_machine()
  todo = cases(_SEQ.value)
  for f, a in todo.values():
    jax.block_until_ready(f(*a))
  times = {c: [] for c in todo}
  for _ in range(_REPEATS.value):
    for c, (f, a) in todo.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      times[c].append(time.perf_counter() - t0)
  for (model, impl), t in times.items():
    print(f'{model} T={_SEQ.value} {impl:9s} median {np.median(t) * 1e3:7.1f} ms  '
          f'min {np.min(t) * 1e3:7.1f} ms')


if __name__ == '__main__':
  app.run(main)
