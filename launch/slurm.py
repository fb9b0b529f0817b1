"""SLURM launcher (GPU clusters): one sbatch job running `python -m xecomla.main` as one process
per GPU (or, with --per_node, per node) across the allocation.

  python -m launch.slurm [--nodes=2] [--gpus_per_node=8] [--per_node] [--partition=P]
      [--account=A] [--time=24:00:00] [--job_name=N] [--port=0] [--python=.venv/bin/python]
      [--env=NAME=VALUE ...] [--dry_run] -- --config=... --workdir=W [--config.a.b=v ...]

runs, with bash (printed under --dry_run, a script that runs as it is):
  mkdir -p W/logs;  cat > W/slurm.sbatch <<'EOF' ... EOF;  sbatch W/slurm.sbatch

The sbatch script `srun`s one task per process; each task runs xecomla.main with the multi-host
flags given explicitly: `--coordinator_address=` the first host of the allocation (`scontrol show
hostnames`, which expands every SLURM host-list form; jax's own parser reads only some) and a
port (--port, else SLURM_JOB_ID % 4096 + 61440, jax's own choice), `--num_processes=$SLURM_NTASKS`,
`--process_id=$SLURM_PROCID`: the same values jax's SLURM detection would find, visible in the
logs, and the same command whatever the detection does. Each process's GPUs are set with
JAX_LOCAL_DEVICE_IDS: $SLURM_LOCALID per GPU, all the node's GPUs per node (jax's detection
alone would give a per-node process only GPU 0). `srun --kill-on-bad-exit=1` ends the job when a
process dies. Logs: W/logs/slurm-<job>.out (the batch script), W/logs/<job>-<task>.log (each
process). W must be on a filesystem every node sees (the code and its .venv too: the script
runs in this project directory).
"""

from __future__ import annotations

import os
import shlex
import sys

from launch import shell
from xecomla.cli import UsageError, fail_cleanly

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = '$((SLURM_JOB_ID % 4096 + 61440))'


def parser() -> shell.Parser:
  p = shell.Parser(prog='python -m launch.slurm', description=__doc__.split('\n\n')[0])
  p.add_argument('--nodes', type=int, default=1)
  p.add_argument('--gpus_per_node', type=int, default=8)
  p.add_argument('--per_node', action='store_true', help='one process per node, not per GPU')
  p.add_argument('--partition', default='')
  p.add_argument('--account', default='')
  p.add_argument('--time', default='', help='time limit, e.g. 24:00:00')
  p.add_argument('--job_name', default='', help='default xecomla-<work directory name>')
  p.add_argument('--port', type=int, default=0, help='coordinator port (0: from the job id)')
  p.add_argument('--python', default='.venv/bin/python', help='the venv python (relative to the '
                 'project, or absolute)')
  p.add_argument('--env', action='append', default=[], help='NAME=VALUE exported for the job')
  p.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  return p


def script(a, args: list[str], workdir: str) -> str:
  """The sbatch script for one run."""
  if a.nodes < 1 or a.gpus_per_node < 1 or not 0 <= a.port < 65536:
    raise UsageError(f'--nodes={a.nodes} --gpus_per_node={a.gpus_per_node} --port={a.port}: '
                     'give at least 1 node and 1 GPU per node, and a port below 65536')
  logs = os.path.join(workdir, 'logs')
  name = a.job_name or f'xecomla-{os.path.basename(workdir)}'
  tasks = 1 if a.per_node else a.gpus_per_node
  devices = ','.join(map(str, range(a.gpus_per_node))) if a.per_node else '$SLURM_LOCALID'
  options = [f'--job-name={name}', f'--nodes={a.nodes}', f'--ntasks-per-node={tasks}',
             f'--gpus-per-node={a.gpus_per_node}', f'--output={logs}/slurm-%j.out']
  options += [f'--{k}={v}' for k, v in (('partition', a.partition), ('account', a.account),
                                        ('time', a.time)) if v]
  task = ' '.join([f'JAX_LOCAL_DEVICE_IDS={devices}', 'exec', shlex.quote(a.python), '-m',
                   'xecomla.main', shlex.join(args), '--coordinator_address=$XECOMLA_COORDINATOR',
                   '--num_processes=$SLURM_NTASKS', '--process_id=$SLURM_PROCID'])
  lines = ['#!/bin/bash'] + [f'#SBATCH {o}' for o in options] + [
      'set -euo pipefail',
      f'cd {shlex.quote(ROOT)}',
      # sed reads every host (head -n 1 would close the pipe early: SIGPIPE under pipefail)
      'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
      f'export XECOMLA_COORDINATOR="$head:{a.port or PORT}"']
  lines += [f'export {k}={shlex.quote(v)}' for k, v in shell.env_pairs(a.env)]
  lines += [f'srun --kill-on-bad-exit=1 --output={logs}/%j-%t.log bash -c {shlex.quote(task)}']
  return '\n'.join(lines) + '\n'


def commands(argv: list[str]) -> tuple[list[str], bool]:
  """(the launch's shell commands, whether this is a dry run)."""
  a, args = shell.split(argv, parser())
  workdir = shell.job_dir('xecomla.main', args)
  if '://' in workdir:
    raise UsageError(f'--workdir={workdir}: a SLURM job needs a directory on a filesystem the '
                     'nodes share (its logs and sbatch script go there)')
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, 'slurm.sbatch')
  return [f'mkdir -p {shlex.quote(os.path.join(workdir, "logs"))}',
          f"cat > {shlex.quote(path)} <<'EOF'\n{script(a, args, workdir)}EOF",
          f'sbatch {shlex.quote(path)}'], a.dry_run


@fail_cleanly
def main(argv: list[str]) -> None:
  shell.execute(*commands(argv[1:]))


if __name__ == '__main__':
  main(sys.argv)
