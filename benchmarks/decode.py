"""Decode speed of the GQA teacher, naive MLA (K and V re-expanded from the latent at every step),
absorbed MLA and transformers (PyTorch, benchmarks/decode_hf.py) on the same weights, against this
machine's roofline (benchmarks/roofline.py).

  python -m benchmarks.decode --shape=llama1b --layers=2 --contexts=2048,16384 --batch=1,8 \
      --dtype=float32 --models=teacher,naive,absorbed,hf --json=benchmarks/results/decode.json
  python -m benchmarks.decode --models=teacher,absorbed --contexts= --budget_gib=4

The cache is filled to the context without a prefill of that length (benchmarks/decode_cache.py:
random values at the spread a real prefill leaves). `generate.decode` (the jitted decode loop; it
donates its cache) then runs --steps greedy steps, once to compile and --repeats times timed, each
from slot `context` again. ms_per_token = best call time / steps (a batch's rows advance
together), tokens_per_s = batch * steps / time; bytes, FLOPs and the bound at keys = context.
Each row also has `xla`: the compiled step's FLOPs by XLA's cost analysis (over all context + steps
slots), their ratio to the analytic count there, and the dtypes of its dots (roofline.hlo_dtypes).

Shapes: `llama1b`, Llama-3.2-1B's width and attention (dim 2048, 32 / 8 heads of 64, MLP 8192,
tied embeddings, llama3 RoPE) with --vocab tokens and --layers layers, random teacher weights and
random MLA weights of the paper's 9.4% shapes (r_kv 64, d_r 32, d_qk 32, d_v 64, r_q 1424);
`stories260k`, the real llama2.c teacher and its SVD-initialised (not distilled) student by
configs/stories260k.py's recipe (r_kv 6, d_r 4, r_q 64: 15.6% of the teacher's cache).

--budget_gib (llama1b): per --budget_contexts, the most sequences whose cache of the 16-layer 1B
model fits the budget, decoded at that batch with --layers layers (budget scaled by layers / 16).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import roofline
from benchmarks.common import print_machine
from benchmarks.decode_cache import filled_cache
from benchmarks.flops import decode_step_flops
from xecomla import generate
from xecomla.models import kvcache, transformer
from xecomla.models.config import LlamaConfig, MLAConfig

_LAYERS = flags.DEFINE_integer('layers', 2, 'Layers of the llama1b shape.')
_CONTEXTS = flags.DEFINE_list('contexts', ['2048', '16384'], 'Filled cache slots per row.')
_BATCH = flags.DEFINE_list('batch', ['1', '8'], 'Rows decoded together.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Weights and compute.')
_CACHE = flags.DEFINE_enum('cache_dtype', 'auto', list(kvcache.CACHE_DTYPES), "'auto' = --dtype.")
_MODELS = flags.DEFINE_list('models', ['teacher', 'naive', 'absorbed', 'hf'], 'What to time.')
_SHAPE = flags.DEFINE_enum('shape', 'llama1b', ['llama1b', 'stories260k'], 'Model shapes.')
_VOCAB = flags.DEFINE_integer('vocab', 512, 'Vocabulary of the llama1b shape.')
_STEPS = flags.DEFINE_integer('steps', 8, 'Decode steps per timed call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls after the compiling one.')
_BUDGET = flags.DEFINE_float('budget_gib', 0.0, 'Cache budget of the 16-layer model (0: none).')
_BUDGET_CTX = flags.DEFINE_list('budget_contexts', ['8192', '32768'], 'Contexts of the budget.')
_PROFILE = flags.DEFINE_bool('profile', True, 'Trace one more call: its slowest XLA ops per row.')
_JSON = flags.DEFINE_string('json', '', 'Write the run (machine, roofline, rows) to this file.')
_DATA = flags.DEFINE_string('stories', '../shared/data/stories260K', 'stories260K folder.')

MODES = {'naive': 'expand', 'absorbed': 'absorb'}  # benchmark row -> Transformer(mla_mode=)


def llama1b(layers: int, vocab: int) -> tuple[LlamaConfig, MLAConfig]:
  rope = {'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 8192}
  teacher = LlamaConfig(vocab_size=vocab, dim=2048, n_layers=layers, n_heads=32, n_kv_heads=8,
                        head_dim=64, hidden_dim=8192, rope_theta=500000.0, max_seq_len=131072,
                        tie_embeddings=True, rope_scaling=rope)
  student = MLAConfig(llama=teacher, r_kv=(64,) * layers, r_q=(1424,) * layers, d_r=32, d_qk=32,
                      d_v=64, rope_pairs=(None,) * layers)
  return teacher, student


def build(shape: str, layers: int, vocab: int, workdir: str) -> dict:
  """{'teacher': (config, params), 'student': (config, params), 'hf_dir': teacher HF directory
  or None, 'note': how the student was made}."""
  if shape == 'llama1b':
    t, s = llama1b(layers, vocab)
    return {'teacher': (t, transformer.init_params(t, 0)),
            'student': (s, transformer.init_params(s, 1)), 'hf_dir': None,
            'note': 'random teacher and random MLA weights (r_kv 64, d_r 32, r_q 1424)'}
  from configs import stories260k
  from xecomla.convert import hf, llama2c, upcycle
  from xecomla.stages.init import init_options
  d = os.path.join(workdir, 'stories_hf')
  llama2c.convert(f'{_DATA.value}/stories260K.bin', f'{_DATA.value}/tok512.bin', d)
  t, tp = hf.load_llama(d)
  # the shape these results were measured with (the demo's until issue 13)
  opts = init_options(stories260k.get_config('r_kv=6,d_r=4,rope_dims=high_freq'), t.head_dim)
  s, sp, _ = upcycle.upcycle(t, tp, opts)
  return {'teacher': (t, tp), 'student': (s, sp), 'hf_dir': d,
          'note': f'SVD init, configs/stories260k.py recipe: r_kv {s.r_kv[0]}, d_r {s.d_r}, '
                  f'r_q {s.r_q[0]}, rope_dims {opts.rope_dims}, rope_key {opts.rope_key}'}


def time_decode(graphdef, state, cache, *, context: int, steps: int, repeats: int, vocab: int,
                profile: bool = False):
  """(seconds of each call after the compiling one, greedy tokens [B, steps] of the last call,
  with `profile` the slowest ops of one more call: roofline.op_profile). Every call starts from
  slot `context` again (index reset)."""
  b = cache.positions.shape[0]
  args = (jax.random.normal(jax.random.key(3), (b, vocab), jnp.float32),
          jnp.full((b,), context, jnp.int32))

  def call(cache):
    cache = cache.replace(index=jnp.asarray(context, jnp.int32))
    tokens, cache = generate.decode(graphdef, steps, generate.Sampling(), state, *args, cache,
                                    jax.random.key(0))
    return np.asarray(tokens), cache

  times = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    tokens, cache = call(cache)
    times.append(time.perf_counter() - t0)
  if not profile:
    return times[1:], tokens, None
  jitted = getattr(generate, '_decode', None)  # the jitted loop, for its HLO's op names
  hlo = jitted.lower(graphdef, steps, generate.Sampling(), state, *args, cache,
                     jax.random.key(0)).compile().as_text() if jitted else ''
  box = [cache]
  return times[1:], tokens, roofline.op_profile(lambda: box.append(call(box.pop())[1]), hlo, steps)


def measure(model: str, config, params, *, dtype, batch: int, context: int, steps: int,
            repeats: int, roof: dict, cache_dtype='auto', profile: bool = False):
  """Times `model` ('teacher', 'naive' or 'absorbed') with the project's decode: (row, tokens)."""
  p = roofline.cast(params, dtype)
  kwargs = {'mla_mode': MODES[model]} if model in MODES else {}
  graphdef, state = nnx.split(transformer.from_params(config, p, dtype=dtype, **kwargs))
  cache = filled_cache(config, p, batch, context, context + steps, dtype, cache_dtype)
  held, read = kvcache.cache_bytes(cache), roofline.cache_read_bytes(cache, context)
  xla = roofline.xla_step(graphdef, state, cache)  # at all context + steps slots
  xla['flops_ratio'] = xla['flops'] / decode_step_flops(config, batch, context + steps,
                                                        absorbed=model != 'naive')
  vocab = getattr(config, 'llama', config).vocab_size
  times, tokens, ops = time_decode(graphdef, state, cache, context=context, steps=steps,
                                   repeats=repeats, vocab=vocab, profile=profile)
  flops = decode_step_flops(config, batch, context, absorbed=model != 'naive')
  r = roofline.row(model, config, p, dtype=dtype, batch=batch, context=context, times=times,
                   steps=steps, cache_bytes=held, roof=roof, cache_read=read, flops=flops)
  return {**r, 'cache_dtype': kvcache.storage_dtype(config, cache_dtype, dtype).name,
          'xla': xla, 'profile': ops}, tokens


def budget_batch(config, context: int, budget_bytes: float, dtype, cache_dtype) -> dict:
  """Sequences of `context` tokens whose 16-layer cache fits the budget."""
  full = dataclasses.replace(getattr(config, 'llama', config), n_layers=16)
  if isinstance(config, MLAConfig):
    full = dataclasses.replace(config, llama=full, r_kv=(config.r_kv[0],) * 16,
                               r_q=(config.r_q[0],) * 16, rope_pairs=(config.rope_pairs[0],) * 16)
  per_token = kvcache.cache_bytes(jax.eval_shape(
      lambda: kvcache.init_cache(full, 1, 1, cache_dtype, dtype)))
  return {'bytes_per_token_16_layers': per_token,
          'sequences': int(budget_bytes // (per_token * context))}


def versions() -> dict:
  import flax
  import torch
  import transformers
  git = lambda *a: subprocess.run(('git',) + a, capture_output=True, text=True).stdout.strip()
  return {'python': platform.python_version(), 'jax': jax.__version__, 'flax': flax.__version__,
          'numpy': np.__version__, 'torch': torch.__version__,
          'transformers': transformers.__version__, 'commit': git('rev-parse', '--short', 'HEAD'),
          'modified': git('status', '--short', 'xecomla')}


def main(argv):
  del argv
  import tempfile
  from benchmarks import decode_hf
  if _BUDGET.value and _SHAPE.value != 'llama1b':
    raise app.UsageError('--budget_gib is for the 16-layer 1B model: use it with --shape=llama1b.')
  names = ('shape', 'layers', 'vocab', 'dtype', 'cache_dtype', 'steps', 'repeats', 'models')
  run = {'machine': print_machine(), 'versions': versions(),
         'flags': {f: flags.FLAGS[f].value for f in names + ('budget_gib', 'budget_contexts')}}
  print('versions:', run['versions'])
  dtype = jnp.dtype(_DTYPE.value)
  roof = run['roofline'] = roofline.machine_roofline(dtype)
  print('roofline:', json.dumps(roof))
  work = tempfile.mkdtemp()
  models = build(_SHAPE.value, _LAYERS.value, _VOCAB.value, work)
  run['student_note'], run['rows'], run['budget'] = models['note'], [], []
  opts = dict(dtype=dtype, steps=_STEPS.value, repeats=_REPEATS.value, roof=roof)
  # A quantised cache is the student's; the teacher keeps a float cache in the compute dtype.
  cache_dtype = {'teacher': 'auto' if _CACHE.value in kvcache.QUANTISED else _CACHE.value}

  def emit(r, into):
    into.append(r)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))

  def one(name, batch, context):
    config, params = models['teacher' if name == 'teacher' else 'student']
    return measure(name, config, params, batch=batch, context=context,
                   cache_dtype=cache_dtype.get(name, _CACHE.value), profile=_PROFILE.value,
                   **opts)[0]

  for context in (int(c) for c in _CONTEXTS.value if c):
    for batch in (int(b) for b in _BATCH.value):
      for name in _MODELS.value:
        if name == 'hf':
          for r in decode_hf.rows(models, work, batch=batch, context=context, **opts):
            emit(r, run['rows'])
        else:
          emit(one(name, batch, context), run['rows'])
  budget = _BUDGET.value * 2 ** 30
  for context in (int(c) for c in _BUDGET_CTX.value if budget):
    for name in ('teacher', 'absorbed'):
      config = models['teacher' if name == 'teacher' else 'student'][0]
      fit = budget_batch(config, context, budget, dtype, cache_dtype.get(name, _CACHE.value))
      emit({**one(name, fit['sequences'], context), **fit, 'budget_gib': _BUDGET.value,
            'measured_budget_gib': _BUDGET.value * _LAYERS.value / 16}, run['budget'])
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(run, f, indent=1)


if __name__ == '__main__':
  app.run(main)
