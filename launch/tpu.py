"""Cloud TPU launcher: one job on every worker of a TPU VM or pod slice.

  python -m launch.tpu --name=xecomla-v5e16 --zone=us-west4-a [--accelerator_type=v5litepod-16]
      [--version=v2-alpha-tpuv5-lite] [--queued [--spot]] [--project=P] [--env=NAME=VALUE ...]
      [--module=xecomla.main|xecomla.sweep] [--pip=REQ ...] [--skip_setup] [--dry_run] --
      XECOMLA_FLAGS

runs, with bash, in order (printed one per line under --dry_run, a script that runs as it is):
  1. reuse or create: `gcloud compute tpus tpu-vm describe NAME || gcloud compute tpus tpu-vm
     create NAME ...` (one line: the describe branch skips the create when the VM exists); with
     --queued a queued resource instead (`queued-resources describe || queued-resources create
     --node-id=NAME`), then a wait until it is ACTIVE (FAILED or SUSPENDED stops the launch);
  2. copy the code: a tarball of the project (no .venv, .git, runs/) sent with `tpu-vm scp
     --worker=all` to every worker (smaller than `scp --recurse` of the tree with its venv);
  3. the pinned environment on every worker, as launch/local.sh makes it: a venv and
     `pip install -e ".[gcs]" jax[tpu]==<the jax pin of setup.cfg>` (the gcs extra: gcsfs and
     google-cloud-storage, which gs:// work directories need) and each --pip requirement (pip
     leaves what is installed);
  4. the command on every worker (`tpu-vm ssh --worker=all`): `python -m xecomla.main
     XECOMLA_FLAGS` (one run; jax.distributed finds the other workers itself on a TPU VM, so no
     multi-host flags) or, with --module=xecomla.sweep, the whole sweep, its points in sequence
     (its --root must be one that every worker reads, gs:// or a shared disk: each worker's
     sweep decides by itself which points are finished);
     Each worker logs to DIR/logs/<worker hostname>.log, DIR the --workdir (--root for a sweep)
     after "--"; a gs:// DIR gets the logs copied there when the command ends.
--skip_setup leaves out steps 2-3 (code and environment already there).
"""

from __future__ import annotations

import configparser
import os
import shlex
import sys

from launch import shell
from xecomla.cli import UsageError, fail_cleanly

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE = 'xecomla'  # the code's directory on each worker, under the home directory
EXCLUDE = ('./.venv', './.git', './runs', '__pycache__', '*.egg-info')


def jax_pin(setup_cfg: str = os.path.join(ROOT, 'setup.cfg')) -> str:
  """'jax[tpu]==X' for the jax version pinned in setup.cfg (so the workers match this tree)."""
  cfg = configparser.ConfigParser()
  cfg.read(setup_cfg)
  for line in cfg['options']['install_requires'].split('\n'):
    if line.strip().startswith('jax=='):
      return f'jax[tpu]=={line.strip()[len("jax=="):]}'
  raise UsageError(f'{setup_cfg} pins no jax==X: pin it (install_requires)')


def parser() -> shell.Parser:
  p = shell.Parser(prog='python -m launch.tpu', description=__doc__.split('\n\n')[0])
  p.add_argument('--name', required=True, help='TPU VM (and queued resource) name')
  p.add_argument('--zone', required=True)
  p.add_argument('--project', default='')
  p.add_argument('--accelerator_type', default='v5litepod-16')
  p.add_argument('--version', default='v2-alpha-tpuv5-lite', help='TPU software version')
  p.add_argument('--queued', action='store_true', help='create it as a queued resource')
  p.add_argument('--spot', action='store_true', help='spot capacity (preemptible)')
  p.add_argument('--module', default='xecomla.main', choices=shell.MODULES)
  p.add_argument('--python', default='python3', help="workers' Python (>= 3.11) for the venv")
  p.add_argument('--env', action='append', default=[], help='NAME=VALUE for the command')
  p.add_argument('--pip', action='append', default=[], help='a further pinned requirement for '
                 'the workers (NAME==VERSION)')
  p.add_argument('--skip_setup', action='store_true', help='code and venv are already there')
  p.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  return p


def gcloud(a, *words: str) -> str:
  """`gcloud compute tpus WORDS... --zone=Z [--project=P]`, quoted."""
  where = [f'--zone={a.zone}'] + ([f'--project={a.project}'] if a.project else [])
  return shlex.join(['gcloud', 'compute', 'tpus', *words, *where])


def acquire(a) -> list[str]:
  """Reuse the TPU when it exists, else create it (and wait for a queued resource)."""
  spot = ['--spot'] if a.spot else []
  if not a.queued:
    create = gcloud(a, 'tpu-vm', 'create', a.name, f'--accelerator-type={a.accelerator_type}',
                    f'--version={a.version}', *spot)
    return [f'{gcloud(a, "tpu-vm", "describe", a.name)} >/dev/null 2>&1 || {create}']
  describe = gcloud(a, 'queued-resources', 'describe', a.name)
  create = gcloud(a, 'queued-resources', 'create', a.name, f'--node-id={a.name}',
                  f'--accelerator-type={a.accelerator_type}',
                  f'--runtime-version={a.version}', *spot)
  wait = (f'while true; do s=$({describe} --format="value(state.state)"); '
          f'[ "$s" = ACTIVE ] && break; case "$s" in FAILED|SUSPENDED) '
          f'echo "queued resource {a.name} is $s" >&2; exit 1;; esac; sleep 60; done')
  return [f'{describe} >/dev/null 2>&1 || {create}', wait]


def ssh(a, remote: str) -> str:
  """The same command on every worker."""
  return f'{gcloud(a, "tpu-vm", "ssh", a.name, "--worker=all")} --command={shlex.quote(remote)}'


def setup(a) -> list[str]:
  tarball = f'/tmp/xecomla-{a.name}.tgz'
  excludes = ' '.join(shlex.quote(f'--exclude={e}') for e in EXCLUDE)
  venv = (f'(test -x .venv/bin/python || {shlex.quote(a.python)} -m venv .venv) && '
          f'.venv/bin/python -m pip install -q -e ".[gcs]" "{jax_pin()}"' +
          ''.join(f' {shlex.quote(r)}' for r in a.pip))
  return [f'tar czf {tarball} -C {shlex.quote(ROOT)} {excludes} .',
          f'{gcloud(a, "tpu-vm", "scp", tarball, f"{a.name}:{REMOTE}.tgz", "--worker=all")}',
          ssh(a, f'mkdir -p {REMOTE} && tar xzf {REMOTE}.tgz -C {REMOTE} && cd {REMOTE} && {venv}')]


def start(a, args: list[str]) -> str:
  """The job on every worker, each logging to DIR/logs/<its hostname>.log."""
  out = shell.job_dir(a.module, args)
  remote_dir = '://' in out
  logs = f'logs/{out.rsplit("/", 1)[-1]}' if remote_dir else f'{out}/logs'
  env = ' '.join(f'{k}={shlex.quote(v)}' for k, v in shell.env_pairs(a.env))
  cmd = ' '.join(filter(None, [env, '.venv/bin/python', '-m', a.module, shlex.join(args)]))
  log = f'{shlex.quote(logs)}/$(hostname).log'
  remote = f'cd {REMOTE} && mkdir -p {shlex.quote(logs)} && {cmd} > {log} 2>&1'
  if remote_dir:
    remote = (f'{remote}; rc=$?; gcloud storage cp {log} {shlex.quote(out + "/logs/")}; '
              'exit $rc')
  return ssh(a, remote)


def commands(argv: list[str]) -> tuple[list[str], bool]:
  """(the launch's shell commands, whether this is a dry run)."""
  a, args = shell.split(argv, parser())
  return acquire(a) + ([] if a.skip_setup else setup(a)) + [start(a, args)], a.dry_run


@fail_cleanly
def main(argv: list[str]) -> None:
  shell.execute(*commands(argv[1:]))


if __name__ == '__main__':
  main(sys.argv)
