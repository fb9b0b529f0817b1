"""What `python -m xecomla.main` shows on the console, and what only its log file holds
(xecomla/console.py): progress lines, stage summaries, warnings and results on the console; the
libraries' INFO logs (orbax's checkpointing ...) in W/logs/; --verbosity brings them back."""

import os
import re
import subprocess
import sys

from tests.conftest import require_shared_data
from xecomla.ckpt import TMP

# configs/stories260k.py on the smallest shapes: one distillation step, two evaluation documents.
TINY = ['--config=configs/stories260k.py', '--config.train.steps=1', '--config.align.steps=1',
        '--config.train.seq_len=32',
        '--config.train.batch_size=8', '--config.train.log_every=1', '--config.train.ckpt_every=1',
        '--config.eval.max_docs=2', '--config.eval.max_len=32', '--config.eval.extra_paths=',
        '--config.eval.sample_tokens=0', '--config.eval.story_mc=0', '--config.eval.cache_dtype=']
# absl's prefix: level, date, time, thread id, file:line
ABSL = re.compile(r'^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ ([^:\s]+):\d+\] ')


def run_main(workdir, *flags):
  r = subprocess.run([sys.executable, '-m', 'xecomla.main', *TINY, f'--workdir={workdir}', *flags],
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout.splitlines(), r.stderr.splitlines()


def logged(lines, level):
  """The file names of absl-prefixed lines of `level` ('I', 'W' ...)."""
  return [m.group(2) for m in map(ABSL.match, lines) if m and m.group(1) == level]


def log_files(workdir):
  return sorted(os.listdir(os.path.join(workdir, 'logs')))


def test_console_holds_progress_warnings_and_results_the_log_file_the_rest(tmp_path):
  require_shared_data()
  w = str(tmp_path / 'w')
  out, err = run_main(w, '--config.stages=init,distill,eval')
  assert not logged(out + err, 'I'), err  # no INFO line of any library
  assert f'work directory {w}' in err
  for line in ('stage init', 'stage distill', 'stage eval'):
    assert line in err, err
  assert any(l.startswith('[distill] 1/1 ') and 'loss' in l and 'tok/s' in l for l in err), err
  assert any(l.startswith('stage distill done in ') and ': 1 steps, loss ' in l for l in err), err
  assert any(l.startswith('| student | ') for l in out) and 'KV cache: student 50' in out[-2]
  (name,) = log_files(w)
  assert out[-1] == f'results in {w} (full log: {os.path.join(w, "logs", name)})'
  log = open(os.path.join(w, 'logs', name)).read().splitlines()
  info = logged(log, 'I')
  assert 'checkpoint_manager.py' in info and 'pipeline.py' in info and 'logs.py' in info
  for line in err:  # every console line is in the log file too, absl-prefixed
    assert line in log or any(x.endswith('] ' + line) and ABSL.match(x) for x in log), line

  # A save that never finished: its warning (from xecomla.ckpt) reaches the console.
  os.mkdir(os.path.join(w, 'distill', 'ckpt', f'2{TMP}-1'))
  out, err = run_main(w, '--config.stages=distill')
  assert not logged(out + err, 'I'), err
  assert 'ckpt.py' in logged(err, 'W') and any('was never completed' in l for l in err), err
  assert 'distill: already finished (step 1)' in err

  # --verbosity=0 (INFO): every logged line on the console too, each of xecomla's once.
  out, err = run_main(w, '--config.stages=init', '--verbosity=0')
  assert 'checkpoint_manager.py' in logged(err, 'I')
  done = [l for l in err if 'init: already done' in l]
  assert len(done) == 1 and logged(done, 'I') == ['init.py'], done  # absl-prefixed, not twice
  assert len(log_files(w)) == 3  # one file per run
