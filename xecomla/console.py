"""Where every line a run shows comes from, and where the rest goes (set up by xecomla.main).

  stdout  the results: the results table, the KV-cache line, greedy samples, 'results in W'
          (main.print_summary).
  stderr  say(): xecomla's own progress and summary lines (the work directory and log file, stage
          start and end with a summary, init's ranks, resumes, the train loop's step lines from
          train.logs.Progress, where the export went); WARNING and above from any library (absl's
          --stderrthreshold, set to warning); 'error: ...' for bad input (xecomla.cli).
  W/logs/<YYYYmmdd-HHMMSS>-<host>-<pid>.log
          everything logged at INFO and above, absl-prefixed (level, time, file:line): the
          libraries' INFO logs (orbax's checkpointing, jax, grain ...), the warnings and the say()
          lines. One new file per run (a resumed run adds a file); until the work directory
          exists (it is created only after the config was checked) the log is held in memory.

absl's own flags still apply: --verbosity=0 (INFO), -v 1 (DEBUG) or higher puts every logged
line on the console as well (say() lines then show once, absl-prefixed); --logtostderr logs to
stderr only and writes no file; --stderrthreshold=LEVEL sets what else reaches the console;
--log_dir=DIR puts the log file in DIR instead of W/logs.

A gs:// work directory (or --log_dir): a cloud object cannot be appended to, so the log file is
written locally, under $TMPDIR/xecomla-logs/ (the run says where), and copied whole to
W/logs/<same name> when the process exits (atexit: after a normal end, an error or Ctrl-C; a
process that is killed leaves only the local file). Pass a local --log_dir to keep it elsewhere.

C++ logs of XLA: jax sets TF_CPP_MIN_LOG_LEVEL=1 (warnings and above) unless it is set already.
"""

from __future__ import annotations

import atexit
import io
import logging as std_logging
import os
import socket
import sys
import tempfile
import time

from absl import flags, logging
from absl.logging import converter
from etils import epath

from xecomla import fileio

FLAGS = flags.FLAGS
_state = {'buffer': None, 'path': None}  # the log in memory until log_to(); the log file's path


def _python_handler():
  return logging.get_absl_handler().python_handler


def setup() -> None:
  """After flag parsing: the absl handler logs into memory (then the log file), and only warnings
  and above of logged lines also reach stderr; --verbosity given shows every logged line too."""
  if FLAGS['logtostderr'].value:
    return  # absl logs everything to stderr, and nothing to a file
  if FLAGS['verbosity'].present:
    FLAGS.alsologtostderr = True
  elif not FLAGS['stderrthreshold'].present:
    logging.set_stderrthreshold('warning')
  _state['buffer'] = io.StringIO()
  _python_handler().setStream(_state['buffer'])


def log_to(workdir: str) -> str | None:
  """Moves the log from memory into a new file under W/logs (or --log_dir) and says where it is;
  returns its path (None when setup() was not called: a test or another entry point)."""
  buffer = _state['buffer']
  if buffer is None:
    return _state['path']
  target = FLAGS['log_dir'].value if FLAGS['log_dir'].present else os.path.join(workdir, 'logs')
  remote = not fileio.is_local(target)  # then a local file, copied up at exit
  directory = os.path.join(tempfile.gettempdir(), 'xecomla-logs') if remote else target
  os.makedirs(directory, exist_ok=True)
  name = f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{os.getpid()}.log"
  path = os.path.join(directory, name)
  f = open(path, 'a', encoding='utf-8')  # closed by absl's handler at exit
  if remote:
    atexit.register(_copy_up, f, path, os.path.join(target, name))  # runs before logging's
  handler = _python_handler()
  handler.acquire()  # library threads (orbax's async saves) log too
  try:
    f.write(buffer.getvalue())
    f.flush()
    handler.stream = f
  finally:
    handler.release()
  _state['buffer'], _state['path'] = None, path
  say('full log: %s', path + (f' (copied to {target}/{name} at exit)' if remote else ''))
  return path


def _copy_up(f, path: str, dst: str) -> None:
  """Copies the local log file to its gs:// place (at exit; a failure is only printed)."""
  try:
    if not f.closed:
      f.flush()
    epath.Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'rb') as local:
      epath.Path(dst).write_bytes(local.read())
  except Exception as e:  # noqa: BLE001 - never fail a finished run over its log copy
    sys.stderr.write(f'warning: the log {path} was not copied to {dst} ({e})\n')


def log_path() -> str | None:
  return _state['path']


def _absl_shows_info() -> bool:
  """Whether absl's handler already puts INFO lines on stderr: no setup() in an absl program, or
  --verbosity / --logtostderr / --alsologtostderr / --stderrthreshold=info given."""
  if logging.get_absl_handler() not in std_logging.root.handlers or not logging.level_info():
    return False
  if not FLAGS.is_parsed() or FLAGS['logtostderr'].value or FLAGS['alsologtostderr'].value:
    return True
  threshold = converter.string_to_standard(FLAGS['stderrthreshold'].value)
  return _python_handler().stream in (sys.stderr, sys.__stderr__) or threshold <= std_logging.INFO


def say(msg: str, *args) -> None:
  """A line a person needs (progress, a summary, where results are): on stderr as it is, and in
  the log file as an INFO line."""
  if not _absl_shows_info():
    sys.stderr.write((msg % args if args else msg) + '\n')
    sys.stderr.flush()
  logging.info(msg, *args)


def status(line: str, last: bool) -> None:
  """A train loop's status line: redrawn in place on a terminal (in the log file every time),
  else one line per call."""
  if sys.stderr.isatty() and not _absl_shows_info():
    sys.stderr.write('\r' + line[:200] + ('\n' if last else ''))
    sys.stderr.flush()
    logging.info(line)
  else:
    say(line)


def _k(x: float) -> str:
  return f'{x / 1e3:.1f}k'


def stage_summary(stage: str, seconds: float, out) -> str:
  """'stage distill done in 59.9 s: 60 steps, loss 1.411, 4.4k tokens/s', from what the stage
  returned (a train summary, DPO's held-out rewards, the eval results)."""
  parts = []
  if isinstance(out, dict):
    last = out.get('last') or {}
    if 'steps' in out and 'last' in out:
      parts.append(f"{out['steps']} steps")
    if 'loss' in last:
      parts.append(f"loss {last['loss']:.4g}")
    if out.get('tokens_per_s'):
      parts.append(f"{_k(out['tokens_per_s'])} tokens/s")
    before, after = out.get('heldout_before') or {}, out.get('heldout_after') or {}
    if 'reward_accuracy' in after:
      parts.append(f"held-out reward accuracy {before.get('reward_accuracy', float('nan')):.3f}"
                   f" -> {after['reward_accuracy']:.3f}")
    nll = {name: out[name]['nll'] for name in ('student', 'teacher')
           if isinstance(out.get(name), dict) and 'nll' in out[name]}
    if nll:
      parts.append('held-out NLL ' + ', '.join(f'{k} {v:.4f}' for k, v in nll.items()))
  return f'stage {stage} done in {seconds:.1f} s' + (': ' + ', '.join(parts) if parts else '')


logging.ABSLLogger.register_frame_to_skip(__file__, 'say')  # logged lines name say()'s caller
logging.ABSLLogger.register_frame_to_skip(__file__, 'status')
