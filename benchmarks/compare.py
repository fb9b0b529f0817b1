"""Distillation throughput of this tree against an earlier commit, in one run on one machine.

  python -m benchmarks.compare --base=f266ab5 --rounds=2 -- --model=stories260k --steps=10

The base commit is checked out into a temporary git worktree; `benchmarks.train_throughput` runs in
it and in this tree alternately (`--rounds` times each, interleaved so that drift of the machine hits
both alike), each in a fresh process on one CPU device. The base's figures are converted to MFU with
this tree's FLOP count and matmul peak (same model, same batch). Prints one table row per side:
median tokens/s over rounds, MFU, and the ratio this / base.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from benchmarks.common import print_machine

_BASE = flags.DEFINE_string('base', 'f266ab5', 'The earlier commit to compare against.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Runs of each side, interleaved.')
_OUT = flags.DEFINE_string('out', '', 'Append both sides\' JSON lines here.')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORIES = os.path.abspath(os.path.join(ROOT, os.environ.get('XECOMLA_DATA', '../shared/data'),
                                       'stories260K'))


def run_side(tree: str, args: list[str]) -> dict:
  with tempfile.NamedTemporaryFile('r', suffix='.jsonl') as out:
    env = {**os.environ, 'PYTHONPATH': tree, 'JAX_PLATFORMS': 'cpu'}
    env.pop('XLA_FLAGS', None)
    cmd = [sys.executable, '-m', 'benchmarks.train_throughput', f'--stories={STORIES}',
           f'--out={out.name}', *args]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read().strip().splitlines()[-1])


def main(argv):
  args = list(argv[1:])
  machine = print_machine()
  with tempfile.TemporaryDirectory() as tmp:
    base_tree = os.path.join(tmp, 'base')
    subprocess.run(['git', 'worktree', 'add', '--detach', base_tree, _BASE.value], cwd=ROOT,
                   check=True, capture_output=True)
    try:
      runs = {'base': [], 'this': []}
      for _ in range(_ROUNDS.value):
        runs['base'].append(run_side(base_tree, args))
        runs['this'].append(run_side(ROOT, args))
    finally:
      subprocess.run(['git', 'worktree', 'remove', '--force', base_tree], cwd=ROOT, check=False,
                     capture_output=True)
  this = runs['this'][-1]
  flops, peak = this['model_flops_per_step'], this['matmul_peak_flops']
  tokens = this['batch'] * this['seq_len']
  rows = {}
  for side, results in runs.items():
    tps = statistics.median(r['tokens_per_s'] for r in results)
    rows[side] = {'side': side, 'commit': _BASE.value if side == 'base' else 'HEAD+tree',
                  'tokens_per_s': tps, 'mfu': round(flops / (tokens / tps) / peak, 4),
                  'first_step_s': round(statistics.median(r['first_step_s'] for r in results), 2),
                  'peak_rss_gib': max(r['peak_rss_gib'] for r in results),
                  'runs': [r['tokens_per_s'] for r in results]}
  print(f"model={this['model']} layers={this['layers']} batch={this['batch']} "
        f"seq_len={this['seq_len']} model_flops/step={flops:.3e} matmul_peak={peak / 1e9:.1f} GFLOP/s")
  print('| side | tokens/s (median) | runs | MFU | first step (s) | peak RSS (GiB) |')
  print('|---|---|---|---|---|---|')
  for r in rows.values():
    print(f"| {r['side']} ({r['commit']}) | {r['tokens_per_s']:.1f} | {r['runs']} | "
          f"{100 * r['mfu']:.2f}% | {r['first_step_s']} | {r['peak_rss_gib']} |")
  ratio = rows['this']['tokens_per_s'] / rows['base']['tokens_per_s']
  print(f'this / base: {ratio:.2f}x tokens/s')
  if _OUT.value:
    with open(_OUT.value, 'a') as f:
      f.write(json.dumps({'args': args, 'rows': rows, 'ratio': ratio, 'machine': machine,
                          'model_flops_per_step': flops, 'matmul_peak_flops': peak}) + '\n')


if __name__ == '__main__':
  app.run(main)
