"""What the train loop shows and records: a progress line on stderr, metrics.jsonl and
TensorBoard scalars."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import logging

from xecomla import fileio


class Progress:
  """One status line: a live bar on a terminal, a plain line per log step otherwise."""

  def __init__(self, name: str, total: int, start: int):
    self.name, self.total, self.start = name, total, start
    self.t0 = time.perf_counter()
    self.tty = sys.stderr.isatty()

  def update(self, step: int, text: str) -> None:
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / max(done, 1) * (self.total - step)
    width = 24
    bar = '#' * int(width * step / max(self.total, 1))
    line = (f'[{self.name}] {step}/{self.total} [{bar:<{width}}] {text} | '
            f'ETA {int(eta // 60)}m{int(eta % 60):02d}s')
    if self.tty:
      sys.stderr.write('\r' + line[:200])
      if step >= self.total:
        sys.stderr.write('\n')
    else:
      sys.stderr.write(line + '\n')
    sys.stderr.flush()


def _summary_writer():
  """tensorboardX's SummaryWriter. tensorboardX imports torch if it can (3 s on 2 cores), only to
  recognise torch tensors, which are never logged here: import it with torch hidden."""
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules['torch']
  return SummaryWriter


class MetricsLog:
  """metrics.jsonl (rewritten up to the resumed step, so a resumed run has no duplicates) and
  TensorBoard scalars."""

  def __init__(self, stage_dir: str, resume_step: int):
    self.path = os.path.join(stage_dir, 'metrics.jsonl')
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            if json.loads(line).get('step', 0) <= resume_step:
              kept.append(line if line.endswith('\n') else line + '\n')
          except ValueError:  # blank, or cut short by a kill
            pass
    fileio.atomic_write_text(self.path, ''.join(kept))
    self._tb = None
    try:
      self._tb = _summary_writer()(os.path.join(stage_dir, 'tb'))
    except ImportError:  # TensorBoard logging is optional
      logging.warning('tensorboardX is not installed: no TensorBoard logs')

  def write(self, step: int, values: dict[str, float]) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **values}) + '\n')
    if self._tb is not None:
      for k, v in values.items():
        if np.isfinite(v):  # a skipped step's NaN loss stays in metrics.jsonl only
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
