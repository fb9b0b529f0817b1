"""Faults of a training run: SIGTERM (`Preemption`), non-finite steps (`NonFiniteGuard`), and a
TEST-ONLY injection hook (`at`).

The hook kills this process at a named point of a training run, so that tests can hit a kill point
deterministically (timing-based kills are flaky on a loaded machine):

  XECOMLA_FAULT=<signal>:<point>:<step>[,<signal>:<point>:<step>...]

<signal> is sigkill or sigterm (sent to this process with os.kill, so a SIGTERM goes through the
real handler); <point> one of POINTS; <step> the step the point belongs to (the step just run, or
the checkpoint being saved). Unset, `at` does nothing. Never set it outside tests.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

ENV = 'XECOMLA_FAULT'
POINTS = (
    'inside_step',   # the step is dispatched and may still be computing; nothing logged or saved
    'after_step',    # the step is logged (if a log step); its checkpoint not yet started
    'during_save',   # every item of checkpoint <step> is written, not yet committed (orbax tmp dir)
)
SIGNALS = {'sigkill': signal.SIGKILL, 'sigterm': signal.SIGTERM}


def _parse(spec: str) -> list[tuple[int, str, int]]:
  out = []
  for item in filter(None, spec.split(',')):
    sig, point, step = item.split(':')
    if sig not in SIGNALS or point not in POINTS:
      raise ValueError(f'{ENV}={spec!r}: use <{"|".join(SIGNALS)}>:<{"|".join(POINTS)}>:<step>')
    out.append((SIGNALS[sig], point, int(step)))
  return out


def at(point: str, step: int) -> None:
  """Sends the configured signal to this process if XECOMLA_FAULT names (point, step)."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  for sig, p, s in _parse(spec):
    if p == point and s == step:
      os.kill(os.getpid(), sig)


# ----------------------------------------------------------------------------------------------
# What a training run does about faults (used by xecomla/train/loop.py)
# ----------------------------------------------------------------------------------------------

class Preemption:
  """SIGTERM sets a flag that the loop reads at step boundaries (`requested`). The handler is
  installed only inside `with` (and only from the main thread), the previous one restored after.
  With several processes, `requested` is true on all of them as soon as one was signalled (an
  allgather of the local flag at each step), so that every process stops at the same step."""

  def __init__(self):
    self.signalled = False
    self._previous = None
    self._installed = False

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.signalled = True

  def __enter__(self) -> 'Preemption':
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False

  def requested(self) -> bool:
    """Whether to stop after this step; a collective when jax.process_count() > 1 (every process
    must call it at the same steps)."""
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.asarray(self.signalled, np.int32))
      return bool(np.any(flags))
    return self.signalled


class NonFiniteGuard:
  """Counts consecutive skipped (non-finite) steps from each step's `skipped` metric. Flags are
  pushed as device arrays and read in step order by `settle(upto)`, the loop settling the
  previous step while the current one runs, so the host does not wait for every step."""

  def __init__(self, limit: int):
    self.limit = limit
    self.streak: list[int] = []   # the current run of skipped steps
    self._pending: list[tuple[int, Any]] = []

  def push(self, step: int, skipped) -> None:
    self._pending.append((step, skipped))

  def settle(self, upto: int) -> bool:
    """Reads the flags of steps <= upto; True once `limit` steps in a row were skipped."""
    while self._pending and self._pending[0][0] <= upto:
      step, flag = self._pending.pop(0)
      self.streak = self.streak + [step] if float(flag) > 0 else []
      if len(self.streak) >= self.limit:
        return True
    return False

  @property
  def last_skipped(self) -> bool:
    """Whether the latest settled step was skipped."""
    return bool(self.streak)
