"""Command-line conventions: how a run ends, in one clear line on stderr and a documented exit
status.

  0   done
  2   bad input (UsageError, CheckpointError, FileNotFoundError): the line names the problem and
      the fix; nothing was written or overwritten
  3   training diverged (NonFiniteLoss): consecutive non-finite steps; the last good checkpoint
      stays the latest
  75  preempted (SIGTERM): the current step finished and was checkpointed; rerun the same
      command to resume (75 is EX_TEMPFAIL: a temporary failure, to be retried)
"""

from __future__ import annotations

import functools
import sys

from xecomla.convert.safetensors_io import CheckpointError

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75


class UsageError(ValueError):
  """Bad input from the user: the message names the problem and the fix."""


class RunStopped(Exception):
  """A run that ended early on purpose; `exit_code` is its documented exit status."""
  exit_code = 1


class Preempted(RunStopped):
  """SIGTERM: the current step finished and a checkpoint was written."""
  exit_code = EXIT_PREEMPTED


class NonFiniteLoss(RunStopped):
  """Too many consecutive non-finite steps: none of them was applied to the parameters."""
  exit_code = EXIT_DIVERGED


def fail_cleanly(main):
  """Wraps an absl `main`: bad input becomes 'error: <message>' on stderr and exit status 2,
  a RunStopped its own message and exit status; neither prints a traceback."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except (UsageError, CheckpointError, FileNotFoundError) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(EXIT_USAGE)
    except RunStopped as e:
      print(str(e), file=sys.stderr)
      sys.exit(e.exit_code)

  return wrapped
