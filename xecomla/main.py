"""The one entry point.

  python -m xecomla.main --config=configs/stories260k.py --workdir=runs/stories260k \
      [--config.train.steps=500 ...]

Runs `config.stages` (comma-separated, from init, distill, dpo, eval, export) in order; each
stage resumes from its own checkpoints in the work directory. Bad input ends with one line on
stderr naming the problem and the fix, and exit status 2. The console shows progress, stage
summaries, warnings and results; the libraries' INFO logs go to W/logs/ (xecomla/console.py;
--verbosity=0 shows them too).

Several processes, one job (xecomla/distributed.py): add --coordinator_address=HOST:PORT
--num_processes=N --process_id=I to each (nothing on Cloud TPU VMs or under SLURM: jax detects
them); process 0 writes the reports, metrics, results and exports, all write checkpoints.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from xecomla import console, distributed, pipeline
from xecomla.cli import EXIT_USAGE, UsageError, fail_cleanly

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config (configs/*.py[:arg]).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory (default runs/<config name>).')
_SHOW = flags.DEFINE_bool('show_config', False, 'Print every config field (dotted name = value) '
                          'and exit.')
# Several processes (xecomla/distributed.py): all three flags, or none (jax detects Cloud TPU VMs
# and SLURM by itself).
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0, for a job of several processes.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
_HEARTBEAT = flags.DEFINE_integer('heartbeat_timeout', 60, 'Seconds without a heartbeat after '
                                  'which a process counts as dead and the others stop.')
_INIT_TIMEOUT = flags.DEFINE_integer('initialization_timeout', 300, 'Seconds for every process '
                                     'to join the job.')


def one_line(e: Exception) -> str:
  """An exception's message on one line: the last line of a multi-line one (a config file's own
  traceback ends with the error it raised)."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[-1] if lines else type(e).__name__


def _flag_error(argv: list[str], e: Exception) -> str:
  """One line for a flag that could not be parsed; an unknown config field is named with the
  override that asked for it."""
  inner = e.args[0] if e.args else e
  text = str(inner.args[0] if isinstance(inner, Exception) and inner.args else inner)
  key = text.splitlines()[0].strip('\'"\\') if text.strip() else text  # ml_collections adds
  hint = ' '.join(line.strip() for line in text.splitlines()[1:] if line.strip())  # 'Did you mean'
  hint = f' ({hint})' if hint else ''
  if isinstance(e, (AttributeError, KeyError)):
    for arg in argv[1:]:
      name = arg.lstrip('-').split('=', 1)[0]
      if name.startswith('config.') and key in name.split('.'):
        field = name[len('config.'):]
        return (f'unknown config field {field!r} (from {arg}): fix its name{hint}; '
                f'--show_config lists every field')
    return f'unknown config field {key!r}: fix its name{hint}; --show_config lists every field'
  return f'{one_line(e)}: fix the flag (--helpfull lists them; --show_config lists the config fields)'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a bad flag or config override ends like any bad input: one
  'error:' line on stderr and exit status 2, no traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - flag parsing errors of every kind are bad input
    print(f'error: {_flag_error(argv, e)}', file=sys.stderr)
    sys.exit(EXIT_USAGE)


def load_config():
  """The --config file's config; one that does not load (missing file, a bad argument after the
  colon) is bad input."""
  if not flags.FLAGS['config'].present:
    raise UsageError('--config is missing: give one, e.g. --config=configs/stories260k.py')
  try:
    config = _CONFIG.value
    config.keys()  # a config file that failed to load raises on first use
    return config
  except Exception as e:  # noqa: BLE001 - whatever the config file raised
    raise UsageError(f'--config={flags.FLAGS["config"].config_filename} cannot be loaded '
                     f'({one_line(e)}): fix the file name or its arguments.') from e


def config_lines(config, prefix: str = '') -> list[str]:
  lines = []
  for key, value in sorted(config.items()):
    if hasattr(value, 'items'):
      lines += config_lines(value, f'{prefix}{key}.')
    else:
      lines.append(f'{prefix}{key} = {value!r}')
  return lines


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
    raise UsageError(f'unexpected arguments {argv[1:]}: give every setting as --flag=value')
  config = load_config()
  if _SHOW.value:
    print('\n'.join(config_lines(config)))
    return
  console.setup()  # what reaches the console and what only the log file: xecomla/console.py
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS['config'].config_filename)
  distributed.initialize(distributed.Options(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
      initialization_timeout=_INIT_TIMEOUT.value, heartbeat_timeout=_HEARTBEAT.value))
  console.say('work directory %s', workdir)
  out = pipeline.run(config, workdir)
  if distributed.is_writer():
    print_summary(out.get('eval', {}))
    log = console.log_path()
    print(f'results in {workdir}' + (f' (full log: {log})' if log else ''))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
