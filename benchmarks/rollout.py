"""Whole-document sampling (`xecomla/rollout.py`: teacher stories, on-policy rows): the cache
grown a window at a time against one cache of the whole length, in one run.

  python -m benchmarks.rollout --rows=256 --length=512 --rounds=2

stories260K's real teacher and its SVD-initialised 15.6% student (configs/stories260k.py's
default shape), temperature 1, BOS-started rows of up to `length` tokens on one device; each
variant compiled first (not timed), then `rounds` calls of each, interleaved, over the same keys.
Reports decoded positions/s (rows x (length - 1) / s: what the decode loop ran, stopped rows
included), real tokens/s, the speed-up, and how many rows the two variants drew alike (they differ
only where a draw falls within float rounding of a tie: the attention sums over more masked slots).
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import print_machine, timed
from xecomla import rollout
from xecomla.generate import Sampling
from xecomla.models import transformer

_ROWS = flags.DEFINE_integer('rows', 256, 'Rows per call.')
_LENGTH = flags.DEFINE_integer('length', 512, 'Tokens per row (the model\'s length: 512).')
_WINDOW = flags.DEFINE_integer('window', rollout.WINDOW, 'Slots the cache grows by.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Timed calls of each variant.')
_DATA = flags.DEFINE_string('stories', '../shared/data/stories260K', 'stories260K folder.')
_OUT = flags.DEFINE_string('out', 'benchmarks/results/rollout.jsonl', 'Results appended here.')


def models(workdir: str) -> dict:
  from configs import stories260k
  from xecomla.convert import hf, llama2c, upcycle
  from xecomla.stages.init import init_options
  d = os.path.join(workdir, 'stories_hf')
  llama2c.convert(f'{_DATA.value}/stories260K.bin', f'{_DATA.value}/tok512.bin', d)
  t, tp = hf.load_llama(d)
  s, sp, _ = upcycle.upcycle(t, tp, init_options(stories260k.get_config(), t.head_dim))
  return {'teacher': (t, tp), 'student': (s, sp)}


def main(argv):
  del argv
  m = print_machine()
  run = jax.jit(rollout.sample_rows, static_argnums=(0, 2, 3, 4, 5, 6))
  keys = rollout.row_keys(jax.random.key(0), np.arange(_ROWS.value))
  length, sampling = _LENGTH.value, Sampling(temperature=1.0)
  with tempfile.TemporaryDirectory() as tmp:
    loaded = models(tmp)
  for name, (cfg, params) in loaded.items():
    model = transformer.from_params(cfg, params)
    llama = getattr(cfg, 'llama', cfg)
    variants = {'whole': length, 'grown': _WINDOW.value}
    call = {k: (lambda w=w: jax.block_until_ready(run(model, keys, length, sampling, llama.bos_id,
                                                      tuple(llama.eos_ids), w)))
            for k, w in variants.items()}
    out = {k: f() for k, f in call.items()}  # compiles
    times = {k: [] for k in variants}
    for _ in range(_ROUNDS.value):
      for k, f in call.items():
        times[k] += timed(f, 1)
    real = int(np.asarray(out['whole']['segment_ids']).sum())
    same = int(sum(np.array_equal(a, b) for a, b in zip(np.asarray(out['whole']['tokens']),
                                                         np.asarray(out['grown']['tokens']))))
    best = {k: min(v) for k, v in times.items()}
    rec = {'model': name, 'rows': _ROWS.value, 'length': length, 'window': _WINDOW.value,
           'seconds': times, 'real_tokens': real, 'rows_alike': same,
           'positions_per_s': {k: _ROWS.value * (length - 1) / v for k, v in best.items()},
           'tokens_per_s': {k: real / v for k, v in best.items()},
           'speedup': best['whole'] / best['grown'],
           'load_average': os.getloadavg(), 'machine': m}
    print(f"{name}: whole {best['whole']:.2f} s, grown {best['grown']:.2f} s per call "
          f"({rec['speedup']:.2f}x); {real} real tokens of {_ROWS.value * length}; rows alike "
          f"{same}/{_ROWS.value}")
    with open(_OUT.value, 'a') as f:
      f.write(json.dumps(rec) + '\n')


if __name__ == '__main__':
  app.run(main)
