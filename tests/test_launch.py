"""The TPU and SLURM launchers (launch/): their dry runs print the exact commands, and those
commands, run by bash against stand-ins for gcloud, sbatch, srun and scontrol (small scripts on
PATH that record their arguments), do what the dry run says: the TPU is reused when `describe`
succeeds, every SLURM task gets its own process id, the coordinator and its GPUs. Never the real
gcloud or sbatch."""

import json
import os
import socket
import stat

import pytest

from launch import slurm, tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry(module, argv, capsys):
  module.main(['launch', *argv, ] if '--dry_run' in argv else ['launch', '--dry_run', *argv])
  return capsys.readouterr().out


def test_tpu_dry_run(capsys):
  out = dry(tpu, ['--name=pod', '--zone=us-west4-a', '--env=XECOMLA_MODELS=/mnt/models', '--',
                  '--config=configs/r_kv_64.py:teacher=8b', '--workdir=runs/r64_8b'], capsys)
  gc, z = 'gcloud compute tpus tpu-vm', '--zone=us-west4-a'
  assert out.splitlines() == [
      f'{gc} describe pod {z} >/dev/null 2>&1 || {gc} create pod --accelerator-type=v5litepod-16 '
      f'--version=v2-alpha-tpuv5-lite {z}',
      f"tar czf /tmp/xecomla-pod.tgz -C {ROOT} --exclude=./.venv --exclude=./.git --exclude=./runs "
      f"--exclude=__pycache__ '--exclude=*.egg-info' .",
      f'{gc} scp /tmp/xecomla-pod.tgz pod:xecomla.tgz --worker=all {z}',
      f"{gc} ssh pod --worker=all {z} --command='mkdir -p xecomla && tar xzf xecomla.tgz -C "
      f"xecomla && cd xecomla && (test -x .venv/bin/python || python3 -m venv .venv) && "
      f".venv/bin/python -m pip install -q -e \".[gcs]\" \"{tpu.jax_pin()}\"'",
      f"{gc} ssh pod --worker=all {z} --command='cd xecomla && mkdir -p runs/r64_8b/logs && "
      f"XECOMLA_MODELS=/mnt/models .venv/bin/python -m xecomla.main "
      f"--config=configs/r_kv_64.py:teacher=8b --workdir=runs/r64_8b > "
      f"runs/r64_8b/logs/$(hostname).log 2>&1'"]
  assert tpu.jax_pin() == 'jax[tpu]==0.10.2'  # setup.cfg's jax pin


def test_tpu_queued_resource_whole_sweep_to_gcs(capsys):
  out = dry(tpu, ['--name=q', '--zone=z', '--project=p', '--queued', '--spot', '--skip_setup',
                  '--accelerator_type=v5litepod-64', '--module=xecomla.sweep', '--',
                  '--config=configs/paper_sweep.py', '--root=gs://b/paper'], capsys)
  qr, w = 'gcloud compute tpus queued-resources', '--zone=z --project=p'
  assert out.splitlines() == [
      f'{qr} describe q {w} >/dev/null 2>&1 || {qr} create q --node-id=q '
      f'--accelerator-type=v5litepod-64 --runtime-version=v2-alpha-tpuv5-lite --spot {w}',
      f'while true; do s=$({qr} describe q {w} --format="value(state.state)"); '
      '[ "$s" = ACTIVE ] && break; case "$s" in FAILED|SUSPENDED) echo "queued resource q is $s" '
      '>&2; exit 1;; esac; sleep 60; done',
      f"gcloud compute tpus tpu-vm ssh q --worker=all {w} --command='cd xecomla && mkdir -p "
      "logs/paper && .venv/bin/python -m xecomla.sweep --config=configs/paper_sweep.py "
      "--root=gs://b/paper > logs/paper/$(hostname).log 2>&1; rc=$?; gcloud storage cp "
      "logs/paper/$(hostname).log gs://b/paper/logs/; exit $rc'"]


def stand_ins(tmp_path, monkeypatch, scripts):
  """Executable scripts on PATH in place of the cluster tools."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, body in scripts.items():
    (bin_dir / name).write_text(body)
    (bin_dir / name).chmod(stat.S_IRWXU)
  monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
  return bin_dir


FAKE_GCLOUD = '''#!/usr/bin/env python3
import json, os, subprocess, sys
with open(os.environ['GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
if 'describe' in sys.argv:
  sys.exit(int(os.environ['DESCRIBE_RC']))
remote = [a[len('--command='):] for a in sys.argv if a.startswith('--command=')]
if remote and os.environ.get('WORKER_HOME'):  # one worker: its shell runs the command at home
  subprocess.run(['bash', '-c', remote[0]], cwd=os.environ['WORKER_HOME'], check=True)
sys.exit(int(os.environ['SSH_RC']))
'''


@pytest.mark.parametrize('exists', [True, False])
def test_tpu_reuses_or_creates_then_starts_on_every_worker(tmp_path, monkeypatch, exists):
  stand_ins(tmp_path, monkeypatch, {'gcloud': FAKE_GCLOUD})
  log = tmp_path / 'gcloud.jsonl'
  monkeypatch.setenv('GCLOUD_LOG', str(log))
  monkeypatch.setenv('DESCRIBE_RC', '0' if exists else '1')
  monkeypatch.setenv('SSH_RC', '0')
  # A worker's home with the code and a 'python' that prints its arguments.
  home = tmp_path / 'home'
  (home / 'xecomla' / '.venv' / 'bin').mkdir(parents=True)
  py = home / 'xecomla' / '.venv' / 'bin' / 'python'
  py.write_text('#!/bin/bash\necho "$XECOMLA_MODELS|$*"\n')
  py.chmod(stat.S_IRWXU)
  monkeypatch.setenv('WORKER_HOME', str(home))
  w = 'runs/my run'  # a space: the remote command is quoted for the worker's shell
  tpu.main(['launch', '--name=t', '--zone=z', '--skip_setup', '--env=XECOMLA_MODELS=/m m', '--',
            '--config=c', f'--workdir={w}'])
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  remote = ("cd xecomla && mkdir -p 'runs/my run/logs' && XECOMLA_MODELS='/m m' .venv/bin/python "
            "-m xecomla.main --config=c '--workdir=runs/my run' > 'runs/my run/logs'/$(hostname)"
            ".log 2>&1")
  create = ['compute', 'tpus', 'tpu-vm', 'create', 't', '--accelerator-type=v5litepod-16',
            '--version=v2-alpha-tpuv5-lite', '--zone=z']
  assert calls == ([['compute', 'tpus', 'tpu-vm', 'describe', 't', '--zone=z']] +
                   ([] if exists else [create]) +
                   [['compute', 'tpus', 'tpu-vm', 'ssh', 't', '--worker=all', '--zone=z',
                     f'--command={remote}']])
  # the worker's log, named after its host, holds what the job printed
  log = home / 'xecomla' / 'runs' / 'my run' / 'logs' / f'{socket.gethostname()}.log'
  assert log.read_text() == '/m m|-m xecomla.main --config=c --workdir=runs/my run\n'


def test_tpu_failed_command_ends_with_its_status(tmp_path, monkeypatch, capsys):
  stand_ins(tmp_path, monkeypatch, {'gcloud': FAKE_GCLOUD})
  monkeypatch.setenv('GCLOUD_LOG', str(tmp_path / 'gcloud.jsonl'))
  monkeypatch.setenv('DESCRIBE_RC', '0')
  monkeypatch.setenv('SSH_RC', '3')
  with pytest.raises(SystemExit) as e:
    tpu.main(['launch', '--name=t', '--zone=z', '--skip_setup', '--', '--workdir=w'])
  assert e.value.code == 3
  assert capsys.readouterr().err.splitlines()[-1].startswith(
      'command failed with exit status 3: gcloud compute tpus tpu-vm ssh t')


def sbatch_script(w, tasks, devices, extra=()):
  return '\n'.join([
      '#!/bin/bash', f'#SBATCH --job-name=xecomla-{os.path.basename(w)}', '#SBATCH --nodes=2',
      f'#SBATCH --ntasks-per-node={tasks}', '#SBATCH --gpus-per-node=2',
      f'#SBATCH --output={w}/logs/slurm-%j.out', *extra, 'set -euo pipefail', f'cd {ROOT}',
      'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
      'export XECOMLA_COORDINATOR="$head:$((SLURM_JOB_ID % 4096 + 61440))"',
      f"srun --kill-on-bad-exit=1 --output={w}/logs/%j-%t.log bash -c 'JAX_LOCAL_DEVICE_IDS="
      f"{devices} exec {{py}} -m xecomla.main --config=configs/r_kv_64.py --workdir={w} "
      "--coordinator_address=$XECOMLA_COORDINATOR --num_processes=$SLURM_NTASKS "
      "--process_id=$SLURM_PROCID'"]) + '\n'


@pytest.mark.parametrize('per_node', [False, True])
def test_slurm_dry_run(tmp_path, capsys, per_node):
  w = str(tmp_path / 'r64')
  out = dry(slurm, ['--nodes=2', '--gpus_per_node=2', '--partition=gpu', '--time=1:00:00'] +
            (['--per_node'] if per_node else []) +
            ['--', '--config=configs/r_kv_64.py', f'--workdir={w}'], capsys)
  script = sbatch_script(w, 1 if per_node else 2, '0,1' if per_node else '$SLURM_LOCALID',
                         ['#SBATCH --partition=gpu', '#SBATCH --time=1:00:00'])
  assert out == (f'mkdir -p {w}/logs\ncat > {w}/slurm.sbatch <<\'EOF\'\n'
                 f'{script.format(py=".venv/bin/python")}EOF\nsbatch {w}/slurm.sbatch\n')
  assert not os.path.exists(w)  # a dry run writes nothing


def test_slurm_tasks_get_their_ids_coordinator_and_gpus(tmp_path, monkeypatch):
  """The real sbatch script, run by bash: sbatch runs it with a job's environment, srun starts
  its 4 tasks (2 nodes x 2 GPUs) and the 'python' records what each task was given."""
  out = tmp_path / 'tasks.txt'
  bin_dir = stand_ins(tmp_path, monkeypatch, {
      'sbatch': '#!/bin/bash\nSLURM_JOB_ID=1234 SLURM_JOB_NODELIST="gpu[007-008]" '
                'SLURM_NTASKS=4 exec bash "$1"\n',
      'scontrol': '#!/bin/bash\n[ "$*" = "show hostnames gpu[007-008]" ] && printf '
                  '"gpu007\\ngpu008\\n"\n',
      'srun': '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
              'for t in 0 1 2 3; do SLURM_PROCID=$t SLURM_LOCALID=$((t % 2)) "$@"; done\n',
      'fakepy': f'#!/bin/bash\necho "$JAX_LOCAL_DEVICE_IDS $*" >> {out}\n'})
  w = str(tmp_path / 'r64')
  slurm.main(['launch', '--nodes=2', '--gpus_per_node=2', f'--python={bin_dir}/fakepy', '--',
              '--config=configs/r_kv_64.py', f'--workdir={w}'])
  port = 1234 % 4096 + 61440  # jax's own choice of port under SLURM
  assert out.read_text().splitlines() == [
      f'{t % 2} -m xecomla.main --config=configs/r_kv_64.py --workdir={w} '
      f'--coordinator_address=gpu007:{port} --num_processes=4 --process_id={t}' for t in range(4)]
  assert (tmp_path / 'r64' / 'slurm.sbatch').read_text() == sbatch_script(w, 2, '$SLURM_LOCALID') \
      .format(py=f'{bin_dir}/fakepy')
  assert os.path.isdir(tmp_path / 'r64' / 'logs')


@pytest.mark.parametrize('module, argv, message', [
    (tpu, ['--zone=z', '--', '--workdir=w'], 'required: --name'),
    (tpu, ['--name=t', '--zone=z'], 'no xecomla command'),
    (tpu, ['--name=t', '--zone=z', '--'], 'nothing after "--"'),
    (tpu, ['--name=t', '--zone=z', '--', '--config=c'], 'has no --workdir=DIR'),
    (tpu, ['--name=t', '--zone=z', '--module=xecomla.sweep', '--', '--workdir=w'],
     'has no --root=DIR'),
    (tpu, ['--name=t', '--zone=z', '--env=1X=2', '--', '--workdir=w'], '--env=1X=2: give'),
    (slurm, ['--', '--workdir=gs://b/w'], 'a SLURM job needs a directory on a filesystem'),
    (slurm, ['--nodes=0', '--', '--workdir=w'], 'give at least 1 node'),
    (slurm, ['--nodes=two', '--', '--workdir=w'], "invalid int value: 'two'"),
])
def test_bad_input_is_one_line(capsys, module, argv, message):
  with pytest.raises(SystemExit) as e:
    module.main(['launch', '--dry_run', *argv])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1, err
  assert message in err


@pytest.mark.slow
def test_slurm_job_runs_across_two_processes(tmp_path, monkeypatch):
  """The sbatch script with the real xecomla.main (about a minute on 2 cores; -m slow): srun's
  stand-in starts its 2 tasks at once on this machine, 2 CPU devices each, and they run one job
  through the coordinator the script names; process 0 writes results.json once."""
  from tests.conftest import require_shared_data
  require_shared_data()
  stand_ins(tmp_path, monkeypatch, {
      'sbatch': '#!/bin/bash\nSLURM_JOB_ID=1234 SLURM_JOB_NODELIST=localhost SLURM_NTASKS=2 '
                'exec bash "$1"\n',
      'scontrol': '#!/bin/bash\n[ "$*" = "show hostnames localhost" ] && echo localhost\n',
      'srun': '#!/bin/bash\nout=""\nwhile [[ "$1" == --* ]]; do case "$1" in --output=*) '
              'out="${1#--output=}";; esac; shift; done\nfor t in 0 1; do log="${out//%j/1234}"; '
              'SLURM_STEP_NODELIST=localhost SLURM_PROCID=$t SLURM_LOCALID=$t "$@" > '
              '"${log//%t/$t}" 2>&1 & done\nrc=0; for j in $(jobs -p); do wait $j || rc=$?; done; '
              'exit $rc\n'})
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  w = tmp_path / 'w'
  slurm.main(['launch', '--nodes=1', '--gpus_per_node=2', '--',
              '--config=configs/stories260k.py:steps=4', f'--workdir={w}',
              '--config.stages=init,distill,eval', '--config.train.batch_size=8',
              '--config.train.seq_len=64', '--config.eval.max_docs=4', '--config.eval.story_mc=0',
              '--config.eval.extra_paths=', '--config.eval.sample_tokens=0'])
  results = json.loads((w / 'results.json').read_text())
  assert results['student']['kv_values_per_token'] == 50  # the config's r_kv + d_r = 10, 5 layers
  for t in (0, 1):  # each task's output (srun --output): rank t of a 2-process CPU job
    assert f'[Gloo] Rank {t} is connected to 1 peer' in (w / 'logs' / f'1234-{t}.log').read_text()
  full = ''.join(p.read_text() for p in (w / 'logs').glob('2*.log'))  # xecomla's own run logs
  assert full.count('Connecting to JAX distributed service on localhost:62674') == 2
