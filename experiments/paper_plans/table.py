"""The README table of the paper's runs from experiments/paper_plans/results/*.json (run.sh).

  python -m experiments.paper_plans.table [--results=DIR]

One row per (step, teacher, topology): the mesh and micro-batch planned, the compiler's per-device
arguments / outputs / temporaries / total against the compiler's limit, whether it fits, and, where
it does not, the suggestion the planner confirmed with the compiler.
"""

from __future__ import annotations

import glob
import json
import os

from absl import app, flags

_RESULTS = flags.DEFINE_string('results', os.path.join(os.path.dirname(__file__), 'results'),
                               'Folder of the plans (JSON).')
TOPOLOGIES = {'v5e:4x4': 'v5e-16', 'v5e:8x8': 'v5e-64', 'v5p:2x2x1': 'v5p-8'}


def gib(x) -> str:
  return '-' if x is None else f'{x / 2 ** 30:.2f}'


def mesh(m: dict) -> str:
  return ' x '.join(f'{k} {v}' for k, v in m.items() if v > 1) or 'one device'


def row(name: str, plan: dict) -> str:
  kind, teacher = name.split('_')[:2]
  step = plan['steps'][kind]
  b, pd = step['batch'], step['per_device_bytes'] or {}
  fits = 'yes' if step['fits'] else 'no'
  note = ''
  if not step['fits'] and step.get('suggestion'):
    s = step['suggestion']
    confirmed = [t for t in s.get('tried', []) if t.get('fits')]
    how = 'compiled' if confirmed else 'predicted'
    total = confirmed[0]['total'] if confirmed else s.get('predicted_total')
    note = (f"fits with {mesh(s['mesh'])}, accum {s['accum']} ({s['rows_per_device']} rows per "
            f"device; {gib(total)} GiB {how})")
  elif not step['fits'] and step.get('error'):
    note = step['error'].split(':')[0]
  seconds = step.get('compile_seconds')
  return (f"| {kind} | {teacher} | {TOPOLOGIES.get(plan['topology'], plan['topology'])} | "
          f"{mesh(plan['mesh'])}, accum {b['accum']} | {b['rows_per_device']} | "
          f"{gib(pd.get('arguments'))} | {gib(pd.get('outputs'))} | {gib(pd.get('temporaries'))} | "
          f"{gib(pd.get('total'))} / {gib(step['limit_bytes'])} | {fits} | "
          f"{'-' if seconds is None else round(seconds)} | {note} |")


def main(argv):
  del argv
  print('| step | teacher | TPU | mesh, accum | rows / device / micro-step | arguments GiB | '
        'outputs GiB | temporaries GiB | total / limit GiB | fits | compile s | if not |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  order = {t: i for i, t in enumerate(TOPOLOGIES)}
  paths = sorted(glob.glob(os.path.join(_RESULTS.value, '*.json')))
  plans = [(os.path.basename(p)[:-5], json.load(open(p))) for p in paths]
  plans.sort(key=lambda x: (x[0].split('_')[0] != 'kd', order.get(x[1]['topology'], 9), x[0]))
  for name, plan in plans:
    print(row(name, plan))


if __name__ == '__main__':
  app.run(main)
