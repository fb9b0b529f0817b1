"""What the launchers share: flags whose errors are one line, the xecomla command after `--`,
and running (or, under --dry_run, printing) a list of shell commands."""

from __future__ import annotations

import argparse
import subprocess
import sys

from xecomla.cli import RunStopped, UsageError

MODULES = ('xecomla.main', 'xecomla.sweep')


class Parser(argparse.ArgumentParser):
  """argparse whose errors are one-line UsageErrors (xecomla.cli.fail_cleanly prints them)."""

  def error(self, message):
    raise UsageError(f'{message}: fix the flags (--help lists them)')


class CommandFailed(RunStopped):
  """A launcher command ended with a non-zero exit status; its exit status is the launcher's."""


def split(argv: list[str], parser: Parser) -> tuple[argparse.Namespace, list[str]]:
  """(the launcher's parsed flags, the flags of the xecomla command after `--`)."""
  if '--' not in argv:
    parser.parse_args(argv)  # --help, or a missing launcher flag, first
    raise UsageError('no xecomla command: give its flags after "--", e.g. -- '
                     '--config=configs/r_kv_64.py --workdir=runs/r64')
  i = argv.index('--')
  if not argv[i + 1:]:
    raise UsageError('nothing after "--": give the flags of the xecomla command')
  return parser.parse_args(argv[:i]), argv[i + 1:]


def flag(args: list[str], name: str) -> str | None:
  """The value of --name=value (or --name value) in args (the last one), or None."""
  values = [a.split('=', 1)[1] if '=' in a else (args[i + 1:] or [''])[0]
            for i, a in enumerate(args) if a.startswith(f'--{name}=') or a == f'--{name}']
  return values[-1] if values else None


def job_dir(module: str, args: list[str]) -> str:
  """The directory the job writes to (--workdir of xecomla.main, --root of xecomla.sweep); its
  logs go under it."""
  name = 'workdir' if module == 'xecomla.main' else 'root'
  value = flag(args, name)
  if not value:
    raise UsageError(f'the {module} command has no --{name}=DIR: give one after "--" (the job '
                     'and its logs go there)')
  return value.rstrip('/')


def env_pairs(env: list[str]) -> list[tuple[str, str]]:
  out = []
  for item in env:
    key, eq, value = item.partition('=')
    if not eq or not key.replace('_', 'a').isalnum() or key[0].isdigit():
      raise UsageError(f'--env={item}: give NAME=VALUE (e.g. --env=XECOMLA_MODELS=/data/models)')
    out.append((key, value))
  return out


def execute(commands: list[str], dry_run: bool) -> None:
  """Prints the commands (dry run), or runs each with bash, stopping at the first that fails."""
  for cmd in commands:
    if dry_run:
      print(cmd)
      continue
    print(f'+ {cmd}', file=sys.stderr, flush=True)
    rc = subprocess.run(['bash', '-c', cmd], check=False).returncode
    if rc:
      e = CommandFailed(f'command failed with exit status {rc}: {cmd.splitlines()[0][:160]}')
      e.exit_code = rc
      raise e
