"""Fused attention kernels behind the reference signature, and the choice among them
(`model.attention`, models.attention.IMPLEMENTATIONS).

Each kernel computes what attention.attend computes: q [B, T, N, H], k [B, S, K, H],
v [B, S, K, Hv] (query head n uses KV head n // (N / K)), mask [B, T, S] -> [B, T, N, Hv].
  xla / cudnn: jax.nn.dot_product_attention with our mask as a [B, 1, T, S] boolean mask, so any
    mask works (packed rows, padding, a cache); cuDNN is its flash kernel on NVIDIA GPUs.
  splash: the Pallas TPU splash-attention kernel with segment ids and a causal mask by row
    index; on CPU it runs in Pallas interpret mode (correct and slow: for tests).
The choice is made at trace time for the platform being compiled for (`target_platform`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from xecomla import sharding
from xecomla.cli import UsageError

# CPU's `auto`: self-attention in causal blocks (models.attention.causal_blocks), else the faster
# of reference and xla. Forward + backward on 2 CPU cores (float32, interleaved medians): GQA
# attention alone at the Llama-3.2-1B shape (T 512) reference 619 -> xla 486 ms, MLA's explicit
# attention 899 -> 561 ms (whole stories260K-shaped models at T 256: Llama 1016 -> 984 ms, MLA
# student 1080 -> 996 ms); at the stories260K teacher's (B 16, T 256, 8 / 4 heads of 8; an Intel
# Xeon, 9 rounds) xla 131 -> blocked 69 ms (benchmarks/BENCHMARKS.md has the whole models).
CPU_AUTO = 'blocked'
CPU_CROSS = 'xla'   # queries against other keys (T != S): a prefill into a cache
HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the (padded) sequence is used
LANES = 128                      # splash's sequence blocks are multiples of 128


def target_platform() -> str:
  """'cpu', 'gpu' or 'tpu': the context mesh's platform (jax.set_mesh; this is also how an
  ahead-of-time compile for a TPU topology on a CPU host is told), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  platform = jax.default_backend()
  if not mesh.empty and mesh.abstract_device is not None:
    platform = mesh.abstract_device.platform
  return {'cuda': 'gpu', 'rocm': 'gpu'}.get(platform, platform)


def cudnn_supports(dtype, head_dim: int, t: int, s: int) -> bool:
  """cuDNN flash attention's limits (jax 0.10.2): half precision, a head dim that is a multiple
  of 8 up to 128 (256 from Hopper on; 128 is safe everywhere), even lengths with a mask."""
  return (jnp.dtype(dtype) in HALF and head_dim % 8 == 0 and head_dim <= 128 and t % 2 == 0
          and s % 2 == 0)


def resolve(name: str, dtype, head_dim: int, t: int, s: int, platform: str | None = None) -> str:
  """The implementation that `name` means on `platform` (default: target_platform()), for a
  compute dtype, head dim (the wider of query/key and value) and T queries against S keys.

  auto: TPU -> splash (xla where there is no mesh to run it per device on), GPU -> cudnn where
  its limits allow (half precision) else xla, CPU -> CPU_AUTO for self-attention (T == S) else
  CPU_CROSS. UsageError where `name` cannot run.
  """
  platform = platform or target_platform()
  if name == 'auto':
    if platform == 'tpu':
      return 'splash' if _partitionable() else 'xla'
    if platform == 'gpu':
      return 'cudnn' if cudnn_supports(dtype, head_dim, t, s) else 'xla'
    return CPU_AUTO if t == s else CPU_CROSS
  if name == 'cudnn':
    if platform != 'gpu':
      raise UsageError(f"model.attention='cudnn' needs an NVIDIA GPU, but this runs on {platform}: "
                       "set model.attention=auto or xla.")
    if not cudnn_supports(dtype, head_dim, t, s):
      raise UsageError(f"model.attention='cudnn' needs bfloat16/float16 compute and a head dim "
                       f"that is a multiple of 8 up to 128 (got {jnp.dtype(dtype).name}, head dim "
                       f"{head_dim}, lengths {t}/{s}): set dtype=bfloat16 or model.attention=xla.")
  if name == 'blocked' and t != s:
    raise UsageError(f"model.attention='blocked' is self-attention, but {t} queries attend to {s} "
                     'keys here: set model.attention=auto, reference or xla.')
  if name == 'splash' and platform == 'gpu':
    raise UsageError("model.attention='splash' is a TPU kernel and cannot run on a GPU: set "
                     'model.attention=auto, cudnn or xla.')
  if name == 'splash' and platform == 'tpu' and not _partitionable():
    raise UsageError(f"model.attention='splash' on {jax.device_count()} TPU devices needs the "
                     'step traced under jax.set_mesh(mesh) (XLA does not partition a Pallas '
                     'kernel): set model.attention=auto or xla.')
  return name


def _partitionable() -> bool:
  """Whether a Pallas kernel can run here: one device, or a context mesh to shard_map over."""
  return not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1


def _pad_last(x: jax.Array, width: int) -> jax.Array:
  if x.shape[-1] >= width:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def fused(q, k, v, mask, scale: float, implementation: str) -> jax.Array:
  """jax.nn.dot_product_attention ('xla' or 'cudnn'). It wants one head dim for q, k and v: the
  narrower side is zero-padded (zero query/key dims add nothing to a score, zero value dims
  give outputs that are cut off), e.g. MLA with d_v != d_qk + d_r."""
  h, hv = q.shape[-1], v.shape[-1]
  width = max(h, hv)
  out = jax.nn.dot_product_attention(_pad_last(q, width), _pad_last(k, width), _pad_last(v, width),
                                     mask=mask[:, None], scale=scale, implementation=implementation)
  return out[..., :hv]


def segment_ids(mask: jax.Array) -> jax.Array:
  """Self-attention mask [B, T, T] -> segment ids [B, T] for splash: 1 + the index of the first key
  each query attends to (its document's first token), 0 for queries that attend to nothing
  (padding). Tokens of one document share its first token, other documents have another."""
  first = jnp.argmax(mask, axis=-1).astype(jnp.int32)
  return jnp.where(mask.any(axis=-1), first + 1, 0)


def _splash_kernel(n_heads: int, t: int, interpret: bool):
  """Made in each trace (its block tables become the trace's constants); the numpy work behind
  them is cached by splash itself (mask_info._process_mask)."""
  block = next(b for b in SPLASH_BLOCKS if t % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * n_heads)
  return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q, k, v, ids, scale, interpret):
  """One device's rows: [B, T, N, H] layouts, the kernel per row (vmap) in [N, T, H] layout. The
  kernel does not scale, so the query is scaled first; GQA is native (KV head n // (N / K))."""
  kernel = _splash_kernel(q.shape[2], q.shape[1], interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.vmap(lambda q, k, v, i: kernel(q, k, v, splash.SegmentIds(i, i)))(
      heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), ids)
  return heads_first(out)


def splash_attention(q, k, v, mask, scale: float, interpret: bool) -> jax.Array:
  """Splash attention for self-attention over packed rows (T == S, no cache).

  It masks by segment id and by row index (causal), which is our position mask when, within each
  document, positions increase along the row — true of packed training and evaluation rows
  (positions restart per document and grow by one). The segment ids come from the mask
  (`segment_ids`). Rows are zero-padded to a multiple of 128 with segment 0 (cut off after).
  Under a context mesh (jax.set_mesh) the kernel runs per device in a shard_map over the batch
  axes (and heads over 'tensor' where they divide): a Pallas call is not partitioned by XLA.
  """
  b, t, n, _ = q.shape
  if k.shape[1] != t:
    raise ValueError(f'splash attention is self-attention: {t} queries against {k.shape[1]} keys')
  ids = segment_ids(mask)
  pad = -t % LANES
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    ids = jnp.pad(ids, ((0, 0), (0, pad)))
  run = functools.partial(_splash_local, scale=scale, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    rows = tuple(a for a in sharding.BATCH_AXES if mesh.shape.get(a, 1) > 1)
    rows = rows if b % math.prod(mesh.shape[a] for a in rows) == 0 else ()
    tp = mesh.shape.get('tensor', 1)
    heads = 'tensor' if tp > 1 and n % tp == 0 and k.shape[2] % tp == 0 else None
    spec = P(rows or None, None, heads, None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P(rows or None, None)),
                        out_specs=spec, check_vma=False)
  return run(q, k, v, ids)[:, :t]
