"""Sweeps defined in config files (big_vision style), run point by point.

  python -m xecomla.sweep --config=configs/stories260k_sweep.py[:ARG] [--dry_run] [--only=a,b]
      [--root=runs/stories260k_sweep] [--launcher=local|tpu|slurm] [--launcher_args='...']
      [--report_only]

A config file may define, beside `get_config(arg)`, `get_sweep(arg)`: the list of sweep points,
each a dict `{'name': str, 'arg': str, 'overrides': {field: value}}`: `arg` is the config argument
after the colon of that same file (`''`: none), `overrides` become `--config.field=value`; ARG
after the colon of --config here is passed to get_sweep. Point P runs in its own work directory
ROOT/P (ROOT defaults to runs/<config name>) as

  python -m xecomla.main --config=FILE:ARG --workdir=ROOT/P --config.field=value ...

in a subprocess: absl flags, jax's devices and jax.distributed belong to a process, so no point
inherits another's state, a point that fails ends only itself, and it is the very command a
launcher starts on a pod or cluster. A point is finished when ROOT/P/results.json exists and
ROOT/P/config.json holds the point's config (every field equal; records a run adds beside them,
such as `resolved`, aside): it is skipped. The local launcher runs the points in sequence, then
writes ROOT/sweep.md, sweep.json and sweep.png (xecomla/sweep_report.py; the points are read
and checked by xecomla/sweep_points.py); with `--launcher=tpu|slurm` each point becomes one
`python -m launch.tpu|launch.slurm LAUNCHER_ARGS -- MAIN_ARGS` job, and `--report_only` builds
the report once they are done. `--dry_run` prints each point's name, status and work directory
(a `#` line) and the exact command, and runs nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from xecomla import sweep_report
from xecomla.cli import EXIT_PREEMPTED, Preempted, RunStopped, UsageError, fail_cleanly
from xecomla.sweep_points import load_sweep, main_args, point_config, select, status

LAUNCHERS = ('local', 'tpu', 'slurm')


class SweepFailed(RunStopped):
  """Some points ended with a non-zero exit status (the others ran)."""
  exit_code = 1


def command(launcher: str, launcher_args: list[str], args: list[str]) -> list[str]:
  """The command that runs one point: xecomla.main here, or one launcher job."""
  if launcher == 'local':
    return [sys.executable, '-m', 'xecomla.main', *args]
  return [sys.executable, '-m', f'launch.{launcher}', *launcher_args, '--', *args]


def default_root(path: str) -> str:
  return os.path.join('runs', os.path.splitext(os.path.basename(path))[0])


def join(root: str, name: str) -> str:
  return f'{root.rstrip("/")}/{name}'


class Parser(argparse.ArgumentParser):
  """argparse whose errors are one-line UsageErrors."""

  def error(self, message):
    raise UsageError(f'{message}: fix the flags (--help lists them)')


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = Parser(prog='python -m xecomla.sweep', description=__doc__.split('\n\n')[0])
  p.add_argument('--config', required=True, help='config file with get_sweep, FILE[:ARG]')
  p.add_argument('--root', default=None, help='sweep directory (default runs/<config name>)')
  p.add_argument('--only', default=None, help='comma-separated point names')
  p.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  p.add_argument('--launcher', default='local', choices=LAUNCHERS)
  p.add_argument('--launcher_args', default='', help="flags for launch.tpu / launch.slurm")
  p.add_argument('--report_only', action='store_true', help='only (re)build ROOT/sweep.*')
  a = p.parse_args(argv)
  if a.launcher == 'local' and a.launcher_args:
    raise UsageError('--launcher_args is for --launcher=tpu|slurm: drop it or pick a launcher')
  try:
    a.launcher_args = shlex.split(a.launcher_args)
  except ValueError as e:
    raise UsageError(f'--launcher_args={a.launcher_args}: {e}: balance its quotes') from e
  return a


def run(argv: list[str]) -> int:
  a = parse_args(argv)
  path, points = load_sweep(a.config)
  chosen = select(points, a.only)
  root = a.root or default_root(path)
  plan = []
  for point in chosen:
    workdir = join(root, point.name)
    config = point_config(path, point)
    cmd = command(a.launcher, a.launcher_args, main_args(path, point, workdir))
    plan.append((point, workdir, status(workdir, config), cmd))
  if a.report_only:
    print(sweep_report.write(root, path, [(p, w, c) for p, w, _, c in plan]))
    return 0
  failed = []
  for point, workdir, state, cmd in plan:
    if state == 'done':
      print(f'# {point.name} (done: skipped) {workdir}', flush=True)
      continue
    print(f'# {point.name} ({state}) {workdir}\n{shlex.join(cmd)}', flush=True)
    if a.dry_run:
      continue
    rc = subprocess.run(cmd, check=False).returncode
    if rc == EXIT_PREEMPTED:
      raise Preempted(f'sweep point {point.name} was preempted; rerun the same command to resume')
    if rc:
      failed.append(f'{point.name} (exit {rc})')
  if a.dry_run:
    return 0
  if a.launcher == 'local':
    print(sweep_report.write(root, path, [(p, w, c) for p, w, _, c in plan]))
  else:
    print(f'when the jobs are done: python -m xecomla.sweep --config={a.config} --root={root} '
          '--report_only')
  if failed:
    raise SweepFailed(f'sweep points failed: {", ".join(failed)}; their logs say why')
  return 0


@fail_cleanly
def main(argv: list[str]) -> int:
  return run(argv[1:])


if __name__ == '__main__':
  sys.exit(main(sys.argv))
