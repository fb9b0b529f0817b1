"""Tables (Markdown), plots (PNG, drawn by plots.py) and one JSON of everything, from the study's
saved runs."""

from __future__ import annotations

import json
import os
from typing import Any

from experiments.stories260k import plan
from experiments.stories260k.plots import VALID, plot_budget, plot_curves, plot_grid
from experiments.stories260k.story_columns import STORY_HEADER, story, story_note, with_story

SHAKESPEARE = 'tinyshakespeare.txt'


def nll(r: dict | None, text: str = VALID) -> str:
  if not r:
    return ''
  t = r.get('texts', {}).get(text)
  return f"{t['nll']:.4f}" if t else ''


def gap(r: dict | None, teacher: float) -> str:
  if not r or VALID not in r.get('texts', {}):
    return ''
  return f"{100 * (r['texts'][VALID]['nll'] / teacher - 1):+.1f}%"


def frac(run: dict) -> str:
  return f"{100 * run['kv_fraction']:.1f}% ({run['kv_values_per_token']})"


def table(header: list[str], rows: list[list[Any]]) -> str:
  out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  out += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(out) + '\n'


def teacher_line(teacher: dict, cols: int, label: str = 'teacher (stories260K, GQA)') -> list[Any]:
  row = [label, f"100% ({teacher['kv_values_per_token']})"]
  return row + [''] * (cols - 4) + [nll(teacher), nll(teacher, SHAKESPEARE)]


def init_table(teacher: dict, runs: dict) -> str:
  rows = []
  for frac_name in plan.INIT_FRACTIONS:
    for method in ('svd', 'activation'):
      row = [frac_name, method]
      for rope in ('paper',) + plan.CONSISTENT:
        for key in ('mean', 'fit'):
          r = runs.get(plan.init_name(frac_name, method, rope, key))
          row.append(f"{r['before']['nll']:.3f}" if r else '')
      rows.append(row)
  header = ['KV', 'factors'] + [f'{rope}/{key}' for rope in ('paper',) + plan.CONSISTENT
                                for key in ('mean', 'fit')]
  t200 = teacher.get('first200_nll')
  note = (f"Teacher: {t200:.4f} on the same 200 stories." if t200 else '')
  note += ' With d_r = 2 (one pair) `uniform` keeps pair 0, the same as `high_freq`.'
  if rope_pairs(runs, 'norm') and rope_pairs(runs, 'norm') == rope_pairs(runs, 'low_freq'):
    note += (' `norm` picks pair 3, the slowest, in every layer at every fraction: the same as '
             '`low_freq`.')
  return table(header, rows) + '\n' + note + '\n'


def rope_pairs(runs: dict, rope: str) -> list:
  """The RoPE pairs each layer kept, for every weight-SVD init run of one choice."""
  return [[layer.get('rope_pairs') for layer in r['init_report']['layers']]
          for _, r in sorted(runs.items())
          if r['part'] == 'init' and r['rope'] == rope and r['method'] == 'svd']


def grid_table(teacher: dict, runs: dict) -> str:
  t = teacher['texts'][VALID]['nll']
  header = ['KV kept', 'init', 'NLL before', 'NLL after', 'vs teacher', 'shakespeare after']
  rows = [['100% (320)', 'teacher', nll(teacher), nll(teacher), '', nll(teacher, SHAKESPEARE)]]
  order = ('random', 'svd_paper', 'svd_consistent', 'activation')   # as the plan names them
  grid = sorted([r for r in runs.values() if r['part'] == 'grid'], key=lambda r: (
      -r['kv_fraction'], [k for k, o in enumerate(order) if r['name'].endswith(o)]))
  for run in grid:
    rows.append([frac(run), run['init'], nll(run['before']), nll(run.get('after')),
                 gap(run.get('after'), t), nll(run.get('after'), SHAKESPEARE)])
  with_story(header, rows, [teacher] + [run.get('after') for run in grid])
  return table(header, rows)


def first200(run: dict) -> str:
  """The learning curve's last point: held-out NLL on the first 200 stories after training."""
  pts = [p['eval_nll'] for p in run.get('curve', []) if 'eval_nll' in p]
  return f'{pts[-1]:.4f}' if pts else ''


def simple_table(teacher: dict, runs: list[dict], label, curve: bool = False) -> str:
  t = teacher['texts'][VALID]['nll']
  header = ['run', 'KV kept', 'r_kv per layer', 'NLL before', 'NLL after', 'vs teacher',
            'shakespeare after']
  rows = [[label(r), frac(r), r['ranks']['r_kv'], nll(r['before']), nll(r.get('after')),
           gap(r.get('after'), t), nll(r.get('after'), SHAKESPEARE)] for r in runs]
  if curve:  # comparable with the PyTorch reference's figures (first 200 stories)
    t200 = teacher.get('first200_nll')
    header += ['first 200 after', 'vs teacher (200)', 'train tokens/s']
    for row, r in zip(rows, runs):
      f = first200(r)
      row += [f, f'{100 * (float(f) / t200 - 1):+.1f}%' if f and t200 else '',
              f"{r['distill']['tokens_per_s']:,.0f}" if r.get('distill') else '']
  with_story(header, rows, [r.get('after') for r in runs])
  return table(header, rows)


def write(out: str, teacher: dict, runs: dict[str, dict], wall_s: float,
          teacher_data: list[dict] = ()) -> None:
  from experiments.stories260k import demo_budget, gap_report  # they read this module's helpers
  os.makedirs(out, exist_ok=True)
  parts = {p: [r for r in runs.values() if r['part'] == p] for p in plan.PARTS}
  md = ['# stories260K study: tables\n',
        'Generated by `python -m experiments.stories260k.study` (see README.md here for the '
        'setup and what the numbers show). NLL: mean nats per predicted token, all 1000 '
        'held-out stories unless noted; shakespeare: first 1000 paragraphs of tiny-shakespeare.'
        + (f' {STORY_HEADER}: {story_note(teacher)}' if story(teacher) else '') + '\n']
  if parts['init']:
    md += ['## Before training: initialisation (first 200 held-out stories)\n', init_table(teacher, runs)]
  if parts['recipe']:
    md += ['## The recipe (1000 steps x 16 x 256 tokens, lr 3e-3, KL only, 15.6% KV)\n',
           simple_table(teacher, parts['recipe'], lambda r: r['init'], curve=True)]
  if parts['grid']:
    md += [f'## Compression x initialisation ({plan.GRID_STEPS} steps x 16 x 256 tokens)\n',
           grid_table(teacher, runs)]
  if parts['dynamic']:
    fixed = [{**runs[n], 'delta': None, 'fixed': True} for n in
             ('grid_50_svd_paper', 'grid_25_svd_paper', 'grid_15p6_svd_paper') if n in runs]
    rows = sorted(parts['dynamic'], key=lambda r: -(r['delta'] or 0)) + fixed
    md += ['## Dynamic rank (energy threshold; first and last layer at r_kv 8), budget mode, and '
           f'fixed ranks for reference (SVD paper init, {plan.GRID_STEPS} steps)\n',
           simple_table(teacher, rows, lambda r: (
               f"fixed r_kv {r['ranks']['r_kv'][0]}" if r.get('fixed')
               else f"delta {r['delta']}" if r['delta'] else 'budget 15.6%'))]
  if parts['loss']:
    base = runs.get('grid_15p6_svd_paper')
    rows = ([{**base, 'kl': 1.0, 'ce': 0.0}] if base else []) + sorted(
        parts['loss'], key=lambda r: (-r['kl'], r['ce']))
    md += ['## Loss mix at 15.6% (SVD paper init)\n',
           simple_table(teacher, rows, lambda r: f"kl {r['kl']}, ce {r['ce']}")]
  if parts['norm']:
    base = runs.get('grid_15p6_svd_paper')
    rows = ([{**base, 'norm': 'off'}] if base else []) + [{**r, 'norm': 'on'} for r in parts['norm']]
    md += ['## Latent norm at 15.6%\n', simple_table(teacher, rows, lambda r: f"latent norm {r['norm']}")]
  if parts['dpo']:
    for r in parts['dpo']:
      d = r['dpo']
      base = runs.get('grid_15p6_svd_paper')
      rows = [[k, f"{d['heldout_before'][k]:.3f}", f"{d['heldout_after'][k]:.3f}"]
              for k in ('reward_accuracy', 'margin', 'chosen_reward', 'rejected_reward',
                        'logp_accuracy', 'loss')]
      rows.append(['held-out NLL (stories)', nll(base.get('after')) if base else '', nll(r['after'])])
      if story(r['after']):
        rows.append([f'{STORY_HEADER} (stories)', story(base.get('after')) if base else '',
                     story(r['after'])])
      md += ['## DPO on the 15.6% distilled student (out-of-domain preference pairs)\n',
             f"{d['pairs']['train']} training pairs, {d['pairs']['heldout']} held out; "
             f"{d['steps']} steps, beta {r['over']['dpo.beta']}, lr {r['over']['dpo.lr']}, batch "
             f"{r['over']['dpo.batch_size']}. The pairs are OpenOrca chat, out of domain for a "
             "512-token story vocabulary: they exercise DPO, not answer quality. A reward tie "
             "(policy = reference, before DPO) counts as wrong.\n",
             table(['held-out metric', 'before DPO', 'after DPO'], rows)]
  if parts['goal']:
    recipe = [{**r, 'label': 'the recipe as it is (SVD paper, mean key)'} for r in parts['recipe']
              if r['name'] == 'recipe_svd']
    goal = recipe + sorted(parts['goal'], key=lambda r: (r['steps'], r['name']))
    md += ['## Toward 2% of the teacher at 15.6% KV (each step: one change against the recipe)\n',
           simple_table(teacher, goal, lambda r: r.get('label', r['name']), curve=True)]
  if parts['gap'] or any(n in runs for n in gap_report.gap.SAME_RUN.values()):
    md += gap_report.section(teacher, runs, list(teacher_data))
  md += demo_budget.section(teacher, runs)
  plots = []
  gap_curves = gap_report.curves(runs)
  if len(gap_curves) > 1:
    plots.append(plot_curves(out, teacher, gap_curves, 'curves_gap.png',
                             'Levers at 15.6% KV (seed 0)', ylim=(1.2, 2.4)))
  budget = gap_report.budget_series(runs)
  if budget:
    plots.append(plot_budget(out, teacher['texts'][VALID]['nll'], budget))
  if parts['grid']:
    plots.append(plot_grid(out, teacher, runs))
  curves = {r['init']: r['curve'] for r in parts['recipe']}
  if curves:
    plots.append(plot_curves(out, teacher, curves, 'curves_recipe.png',
                             'SVD vs random init, 15.6% KV (recipe)'))
  curves = {r['init']: r['curve'] for r in parts['grid'] if r['frac'] == '9.4%' and r['curve']
            and any('eval_nll' in p for p in r['curve'])}
  if curves:
    plots.append(plot_curves(out, teacher, curves, 'curves_9p4.png', 'Learning curves at 9.4% KV'))
  md += ['## Plots\n'] + [f'![{os.path.basename(p)}]({os.path.basename(p)})\n' for p in plots]
  total = sum(r.get('wall_s', 0) for r in runs.values())
  md.append(f'\nWall time: the {len(runs)} runs took {total / 3600:.2f} h in all on the machines '
            f'they ran on (README.md here says which; the sum of their measured wall times, '
            f'study.json; the teacher row not counted); '
            f'this report run took {wall_s / 60:.1f} min.\n')
  with open(os.path.join(out, 'tables.md'), 'w') as f:
    f.write('\n'.join(md))
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump({'teacher': teacher, 'runs': runs, 'teacher_data': list(teacher_data)}, f, indent=1)
