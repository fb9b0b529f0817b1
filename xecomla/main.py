"""The one entry point.

  python -m xecomla.main --config=configs/stories260k.py --workdir=runs/stories260k \
      [--config.train.steps=500 ...]

Runs `config.stages` (comma-separated, from init, distill, dpo, eval, export) in order; each
stage resumes from its own checkpoints in the work directory. Bad input ends with one line on
stderr naming the problem and the fix, and exit status 2.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from xecomla import pipeline
from xecomla.cli import fail_cleanly

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config (configs/*.py[:arg]).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory (default runs/<config name>).')


def default_workdir(config_arg: str) -> str:
  name = os.path.splitext(os.path.basename(config_arg.split(':')[0]))[0]
  return os.path.join('runs', name)


def print_summary(results: dict) -> None:
  if not results:
    return
  from xecomla.stages.evaluate import results_markdown
  print(results_markdown(results), end="")
  t, s = results.get('teacher'), results.get('student')
  if s and t:
    print(f"KV cache: student {s['kv_values_per_token']} vs teacher {t['kv_values_per_token']} "
          f"values per token ({s['kv_values_per_token'] / t['kv_values_per_token']:.1%}, "
          f"{t['kv_values_per_token'] / s['kv_values_per_token']:.1f}x smaller)")
  for name, r in (('teacher', t), ('student', s)):
    if r and 'sample' in r:
      print(f'{name} greedy sample: {r["sample"]!r}')


@fail_cleanly
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/stories260k.py')
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS['config'].config_filename)
  logging.info('workdir %s', workdir)
  out = pipeline.run(_CONFIG.value, workdir)
  print_summary(out.get('eval', {}))
  print(f'results in {workdir}')


if __name__ == '__main__':
  app.run(main)
