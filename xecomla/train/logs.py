"""What the train loop shows and records: a progress line on the console (xecomla.console),
metrics.jsonl and TensorBoard scalars.

On a gs:// work directory: metrics.jsonl cannot be appended to (cloud objects are written whole),
so it is rewritten whole (atomically, fileio) at each log step from the lines kept in memory
(small: one line per log step); locally it is appended to, as before. TensorBoard: tensorboardX
2.6.5 writes gs:// event files itself only with `google-cloud-storage` installed (its
GCSRecordWriter), which this project does not pin; without it, and for other URIs (s3:// would
need boto3, others tensorboardX takes for a local path), the run logs a warning naming the fix
and writes no TensorBoard events (metrics.jsonl holds the same scalars)."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import logging
from etils import epath

from xecomla import console, distributed, fileio


class Progress:
  """A train loop's status line (console.status: a live bar on a terminal, a plain line per log
  step otherwise; each one also in the log file)."""

  def __init__(self, name: str, total: int, start: int):
    self.name, self.total, self.start = name, total, start
    self.t0 = time.perf_counter()

  def update(self, step: int, text: str) -> None:
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / max(done, 1) * (self.total - step)
    width = 24
    bar = '#' * int(width * step / max(self.total, 1))
    console.status(f'[{self.name}] {step}/{self.total} [{bar:<{width}}] {text} | '
                   f'ETA {int(eta // 60)}m{int(eta % 60):02d}s', last=step >= self.total)


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


def _has_gcs() -> bool:
  try:
    from google.cloud import storage  # noqa: F401 - tensorboardX's GCSRecordWriter needs it
  except ImportError:
    return False
  return True


class MetricsLog:
  """metrics.jsonl (rewritten up to the resumed step, so a resumed run has no duplicates) and
  TensorBoard scalars; written by process 0 only (the others hold the same values)."""

  def __init__(self, stage_dir: str, resume_step: int):
    self.path = os.path.join(stage_dir, 'metrics.jsonl')
    self._tb = None
    self.writer = distributed.is_writer()
    if not self.writer:
      return
    kept = []
    if epath.Path(self.path).exists():
      with fileio.open_text(self.path) as f:
        for line in f:
          try:
            if json.loads(line).get('step', 0) <= resume_step:
              kept.append(line if line.endswith('\n') else line + '\n')
          except ValueError:  # blank, or cut short by a kill
            pass
    fileio.atomic_write_text(self.path, ''.join(kept))
    self._lines = None if fileio.is_local(self.path) else kept  # rewritten whole on a URI
    tb = os.path.join(stage_dir, 'tb')
    if not (fileio.is_local(tb) or tb.startswith('gs://') and _has_gcs()):
      logging.warning('no TensorBoard logs in %s: tensorboardX writes gs:// only with '
                      'google-cloud-storage installed (pip install google-cloud-storage)', tb)
      return
    try:
      self._tb = _summary_writer()(tb)
    except ImportError as e:  # TensorBoard logging is optional
      logging.warning('no TensorBoard logs in %s (%s)', tb, e)  # no tensorboardX, or no gs:// backend

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.writer:
      return
    line = json.dumps({'step': step, **values}) + '\n'
    if self._lines is None:
      with epath.Path(self.path).open('a') as f:
        f.write(line)
    else:
      self._lines.append(line)
      fileio.atomic_write_text(self.path, ''.join(self._lines))
    if self._tb is not None:
      for k, v in values.items():
        if np.isfinite(v):  # a skipped step's NaN loss stays in metrics.jsonl only
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
