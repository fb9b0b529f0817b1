"""What a cache format costs in quality: the held-out NLL of a real distilled student measured
through its decode cache (teacher-forced decoding token by token, `xecomla.cache_eval`), for each
cache dtype, beside the bytes one token takes.

  python -m benchmarks.latent_cache --workdir=runs/demo [--max_docs=0] [--json=FILE]

--workdir is a finished run (its latest student; `bash launch/local.sh demo` makes runs/demo);
the documents are the run's eval.path, by the README's evaluation definition (max_docs 0 = all).
The float32 cache is the reference: it equals the full-sequence NLL up to float32 rounding.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from benchmarks.common import print_machine
from xecomla import cache_eval, eval as evaluation, workdir as wd
from xecomla.models import transformer
from xecomla.tokenizer import Tokenizer

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'A finished run.')
_MAX_DOCS = flags.DEFINE_integer('max_docs', 0, 'Held-out documents (0 = all).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16', 'int8', 'float8_e4m3fn'],
                            'Cache dtypes, the first the reference.')
_BATCH = flags.DEFINE_integer('batch_rows', 64, 'Documents decoded together.')
_JSON = flags.DEFINE_string('json', 'benchmarks/results/latent_cache.jsonl', 'Append results here.')


def main(argv):
  del argv
  machine = print_machine()
  with open(os.path.join(_WORKDIR.value, 'config.json')) as f:
    run_config = json.load(f)
  stage, cfg, params, _ = wd.latest_student(_WORKDIR.value)
  model = transformer.from_params(cfg, params)
  tokenizer = Tokenizer(os.path.join(_WORKDIR.value, 'teacher_hf'))
  path = run_config['eval']['path']
  max_len = min(run_config['eval']['max_len'], cfg.llama.max_seq_len)
  seqs = evaluation.encode_documents(tokenizer, evaluation.read_documents(path, _MAX_DOCS.value or None),
                                     cfg.llama.bos_id, max_len)
  full = evaluation.evaluate_nll(model, seqs, row_length=max_len + 1)
  print(f'{_WORKDIR.value} ({stage} student, r_kv {cfg.r_kv[0]}, d_r {cfg.d_r}): {len(seqs)} documents, '
        f'{full["tokens"]} predicted tokens; full-sequence NLL {full["nll"]:.5f}')
  rows, ref = [], None
  for name in _DTYPES.value:
    t0 = time.perf_counter()
    r = cache_eval.nll_through_cache(model, seqs, cache_dtype=name, batch_rows=_BATCH.value)
    ref = ref or r
    row = {'cache_dtype': name, 'nll': r['nll'], 'tokens': r['tokens'],
           'bytes_per_token': r['cache_bytes_per_token'],
           'bytes_vs_first': r['cache_bytes_per_token'] / ref['cache_bytes_per_token'],
           'nll_cost': r['nll'] / ref['nll'] - 1, 'seconds': round(time.perf_counter() - t0, 1)}
    rows.append(row)
    print(f"  {name:>14}: NLL {row['nll']:.5f} ({row['nll_cost']:+.3%} vs {_DTYPES.value[0]}), "
          f"{row['bytes_per_token']} bytes/token ({row['bytes_vs_first']:.2f}x), {row['seconds']} s")
  record = {'benchmark': 'latent_cache', 'workdir': _WORKDIR.value, 'stage': stage,
            'docs': len(seqs), 'full_sequence_nll': full['nll'], 'rows': rows, 'machine': machine,
            'loadavg': os.getloadavg()}
  if _JSON.value:
    os.makedirs(os.path.dirname(_JSON.value) or '.', exist_ok=True)
    with open(_JSON.value, 'a') as f:
      f.write(json.dumps(record) + '\n')


if __name__ == '__main__':
  app.run(main)
