"""The roofline of a decode step on this machine: measured memory bandwidth and matmul peak, the
bytes a step must read and its FLOPs, and the bound max(bytes / bandwidth, FLOPs / peak).

Bandwidth is measured on one large float32 array (1 GiB by default), jitted, best of N:
  copy: y = x + 1 in place (the argument donated, each call fed the last output) reads every
    byte once and writes as many; `copy_read_gbps` counts the bytes read only (nbytes / time),
    `copy_traffic_gbps` read + write (2 nbytes / time);
  read: a sum over x reads every byte once and writes nothing (`sum_read_gbps`).
A decode step reads its weights and its cache and writes almost nothing, so the roofline uses the
fastest read rate seen, `bandwidth_gbps` = max(copy_read_gbps, sum_read_gbps): reads only (the
copy's writes, as many bytes again, are not counted in it).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.flops import matmul_peak
from xecomla.models import kvcache


def _best(f, x, *, repeats: int, chain: bool = False) -> float:
  """Best wall time of f(x) over `repeats` calls after a warm-up; with `chain` each call gets the
  previous output (f donates its argument, so it runs in place, with no fresh pages to fault in)."""
  y = jax.block_until_ready(f(x))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    y = jax.block_until_ready(f(y if chain else x))
    best = min(best, time.perf_counter() - t0)
  return best


def memory_bandwidth(nbytes: int = 2 ** 30, repeats: int = 5) -> dict:
  """Copy and read rates of a `nbytes` float32 array (bytes per second; see the module doc)."""
  x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
  sum_s = _best(jax.jit(jnp.sum), x, repeats=repeats)
  copy_s = _best(jax.jit(lambda a: a + 1.0, donate_argnums=0), x, repeats=repeats, chain=True)
  out = {'bytes': nbytes, 'repeats': repeats, 'copy_s': copy_s, 'sum_s': sum_s,
         'copy_read_gbps': nbytes / copy_s / 1e9, 'copy_traffic_gbps': 2 * nbytes / copy_s / 1e9,
         'sum_read_gbps': nbytes / sum_s / 1e9}
  out['bandwidth_gbps'] = max(out['copy_read_gbps'], out['sum_read_gbps'])
  return out


def machine_roofline(dtype, *, nbytes: int = 2 ** 30, repeats: int = 5) -> dict:
  """Bandwidth and the matmul peak of `dtype` (benchmarks.flops.matmul_peak), measured now."""
  out = memory_bandwidth(nbytes, repeats)
  out['dtype'] = jnp.dtype(dtype).name
  out['matmul_peak_gflops'] = matmul_peak(dtype=dtype) / 1e9
  return out


def weight_bytes_read(params: dict, tie_embeddings: bool, batch: int) -> int:
  """Weight bytes a decode step reads: every layer's weights and norms, the final norm and the
  output head; of an untied embedding only the `batch` gathered rows (a tied one is the head and
  is read whole)."""
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  if not tie_embeddings:
    emb = params['embed']['embedding']
    total += batch * emb.shape[1] * emb.dtype.itemsize - emb.size * emb.dtype.itemsize
  return int(total)


def cache_read_bytes(cache: kvcache.Cache, context: int) -> int:
  """Bytes of the cache's filled slots (`context` of its `length`): what a step must read."""
  return kvcache.cache_bytes(cache) * context // cache.length


def bound(bytes_per_step: float, flops_per_step: float, roofline: dict) -> dict:
  """The roofline bound of one step in ms and which term sets it."""
  memory_ms = bytes_per_step / (roofline['bandwidth_gbps'] * 1e9) * 1e3
  compute_ms = flops_per_step / (roofline['matmul_peak_gflops'] * 1e9) * 1e3
  return {'memory_ms': memory_ms, 'compute_ms': compute_ms,
          'roofline_ms': max(memory_ms, compute_ms),
          'regime': 'memory' if memory_ms >= compute_ms else 'compute'}


def xla_step(graphdef, state, cache: kvcache.Cache) -> dict:
  """One cached decode step (one token per row) compiled by XLA: its FLOPs by the compiler's cost
  analysis (every op, elementwise ones included, over all of the cache's slots) and `hlo_dtypes`
  of its optimised HLO."""
  b = cache.positions.shape[0]

  def step(state, cache):
    tokens = jnp.zeros((b, 1), jnp.int32)
    positions = jnp.broadcast_to(cache.index, (b, 1)).astype(jnp.int32)
    return nnx.merge(graphdef, state)(tokens, positions, jnp.ones((b, 1), jnp.int32), cache)

  compiled = jax.jit(step).lower(state, cache).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {'flops': float(cost['flops']), **hlo_dtypes(compiled.as_text())}


def cast(params: dict, dtype) -> dict:
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def row(model: str, config, params, *, dtype, batch: int, context: int, times: list[float],
        steps: int, cache_bytes: int, roof: dict, cache_read: int, flops: float) -> dict:
  """One result row: timing, bytes and FLOPs of a step, the roofline bound and fraction."""
  llama = getattr(config, 'llama', config)
  best = min(times)
  weights = weight_bytes_read(params, llama.tie_embeddings, batch)
  out = {'model': model, 'context': context, 'batch': batch, 'dtype': jnp.dtype(dtype).name,
         'layers': llama.n_layers, 'steps': steps, 'ms_per_token': best / steps * 1e3,
         'median_ms_per_token': statistics.median(times) / steps * 1e3,
         'tokens_per_s': batch * steps / best, 'cache_bytes': int(cache_bytes),
         'weight_bytes': weights, 'cache_read_bytes': int(cache_read),
         'bytes_per_step': weights + int(cache_read), 'flops_per_step': flops}
  out.update(bound(out['bytes_per_step'], flops, roof))
  out['roofline_fraction'] = out['roofline_ms'] / out['ms_per_token']
  out['loadavg'] = os.getloadavg()
  return out


_DEF = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\(([^)]*)\)', re.M)


def hlo_dtypes(hlo_text: str) -> dict:
  """What the compiler made of a step's dtypes, from its optimised HLO: the dtypes of every dot
  ('lhs x rhs -> out') and the float32 elements converted from bfloat16 (e.g. weights or a cache
  widened before an f32 dot) per call."""
  defs = {}
  for m in _DEF.finditer(hlo_text):
    defs[m.group(1)] = m.groups()[1:]
  def dtype(name):
    return defs.get(name.strip().lstrip('%'), ('?',))[0]
  dots, widened = {}, 0
  for out, shape, op, args in defs.values():
    operands = [dtype(a) for a in args.split(',') if a.strip().startswith('%')]
    if op == 'dot':
      key = f"{' x '.join(operands)} -> {out}"
      dots[key] = dots.get(key, 0) + 1
    if op == 'convert' and out == 'f32' and operands == ['bf16']:
      widened += math.prod(int(d) for d in shape.split(',') if d)
  return {'dots': dots, 'bf16_to_f32_elements': widened}


_META = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?op_name="([^"]+)"', re.M)


def op_profile(run, hlo_text: str, steps: int, top: int = 8) -> list[dict]:
  """The XLA ops that took longest in `run()` (one call of a decode loop of `steps` steps), from a
  profiler trace (XLA:CPU records every op it executes by its HLO name): per op the ms it took per
  step (summed over layers and threads), its output shape and the jax op it came from (op_name
  metadata in the optimised HLO `hlo_text`). The loop itself ('while') is left out."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      run()
    (path,) = glob.glob(os.path.join(d, '**', '*perfetto_trace.json.gz'), recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  total = collections.Counter()
  for e in events:
    op = e.get('args', {}).get('hlo_op')
    if e.get('ph') == 'X' and op and not op.startswith('while'):
      total[op] += e['dur']
  meta = {m.group(1): (m.group(2), m.group(3)) for m in _META.finditer(hlo_text)}
  return [{'op': op, 'ms_per_step': us / 1e3 / steps, 'shape': meta.get(op, ('?', ''))[0],
           'what': '/'.join(meta.get(op, ('', '?'))[1].split('/')[-2:])}
          for op, us in total.most_common(top)]
