"""Command-line conventions: bad input ends in one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
import sys

from xecomla.convert.safetensors_io import CheckpointError


class UsageError(ValueError):
  """Bad input from the user: the message names the problem and the fix."""


def fail_cleanly(main):
  """Wraps an absl `main`: UsageError / CheckpointError / FileNotFoundError become
  'error: <message>' on stderr and exit status 2, without a traceback."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except (UsageError, CheckpointError, FileNotFoundError) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  return wrapped
