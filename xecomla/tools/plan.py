"""Plan a run ahead of time: per-device memory of the real KD and DPO steps for an accelerator
topology, from the compiler (TPU, via libtpu on this CPU host; no TPU and no weights needed) and
from an analytic breakdown (every platform), whether it fits, and a mesh that does when not.

  python -m xecomla.tools.plan --config=configs/r_kv_64.py:teacher=8b --topology=v5e:8x8 \
      [--config.mesh.fsdp=16 ...] [--json=plan.json] [--steps=kd,dpo] [--confirm=2]

Takes the same --config=... and --config.a.b=v overrides as xecomla.main. Topologies: v5e:AxB,
v6e:AxB, v5p:AxBxC, v4:AxBxC, h100:N, h200:N (GPUs: analytic only). Bad input (an unknown
topology, a mesh that does not divide the devices, ...) ends with one 'error:' line, exit 2; a
step that does not fit is a result (fits false), not an error.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile for TPUs from the CPU host; no TPU start-up

import sys  # noqa: E402

from absl import app, flags  # noqa: E402

from xecomla import fileio, main as xmain  # noqa: E402
from xecomla.cli import UsageError, fail_cleanly  # noqa: E402

_TOPOLOGY = flags.DEFINE_string('topology', None, 'Accelerator topology, e.g. v5e:4x4, v5p:2x2x1, '
                                'h100:8.')
_JSON = flags.DEFINE_string('json', None, 'Also write the plan to this JSON file.')
_STEPS = flags.DEFINE_list('steps', ['kd', 'dpo'], 'Step kinds to plan: kd, dpo.')
_CONFIRM = flags.DEFINE_integer('confirm', 2, 'When the mesh does not fit: compile at most this '
                                'many suggested meshes to confirm one (0: analytic only).')


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


@fail_cleanly
def main(argv):
  if len(argv) > 1:
    raise UsageError(f'unexpected arguments {argv[1:]}: give every setting as --flag=value')
  if not _TOPOLOGY.value:
    raise UsageError('--topology is missing: give one, e.g. --topology=v5e:4x4')
  config = xmain.load_config()
  if flags.FLAGS.show_config:
    print('\n'.join(xmain.config_lines(config)))
    return
  if _CONFIRM.value < 0:
    raise UsageError(f'--confirm={_CONFIRM.value} must be >= 0.')
  from xecomla.planner import plan, report
  out = plan.plan(config, _TOPOLOGY.value, kinds=tuple(_STEPS.value), confirm=_CONFIRM.value,
                  log=log)
  print(report.report(out), end='')
  if _JSON.value:
    fileio.atomic_write_json(_JSON.value, out)
    print(f'plan written to {_JSON.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=xmain.parse_flags)
