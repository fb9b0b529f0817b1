"""The gap part's table and curves (experiments/stories260k/gap.py): one row per lever and budget,
the held-out NLL as the mean over the seeds run ± half their range, each seed's value,
and the out-of-domain NLL; rows not run yet are listed as such, never filled in."""

from __future__ import annotations

import statistics

from experiments.stories260k import gap, report

VALID, SHAKESPEARE = report.VALID, report.SHAKESPEARE


def seeds_of(runs: dict, lever: str, steps: int) -> dict[int, dict]:
  out = {}
  for seed in gap.SEEDS:
    key = (lever, steps, seed)
    name = gap.SAME_RUN.get(key, gap.name(*key))
    if name in runs and runs[name].get('after'):
      out[seed] = runs[name]
  return out


def text_nll(run: dict, text: str) -> float | None:
  t = run['after'].get('texts', {}).get(text)
  return t['nll'] if t else None


def cell(values: list[float]) -> str:
  if not values:
    return ''
  if len(values) == 1:
    return f'{values[0]:.4f}'
  return f'{statistics.mean(values):.4f} ± {(max(values) - min(values)) / 2:.4f}'


def rows(runs: dict, teacher_nll: float) -> list[list]:
  out = []
  for lever, (label, _) in gap.levers('').items():
    for steps in (gap.RECIPE_STEPS, gap.DOUBLE_STEPS, gap.LONG_STEPS):
      found = seeds_of(runs, lever, steps)
      if not found:
        continue
      valid = [text_nll(r, VALID) for r in found.values()]
      ood = [v for v in (text_nll(r, SHAKESPEARE) for r in found.values()) if v is not None]
      mean = statistics.mean(valid)
      wall = [r.get('train_wall_s') for r in found.values() if r.get('train_wall_s')]
      out.append([label, f'{steps} ({steps * 16 * 256 / 1e6:.1f}M)', len(found), cell(valid),
                  f'{100 * (mean / teacher_nll - 1):+.1f}%',
                  ', '.join(f's{s} {text_nll(r, VALID):.4f}' for s, r in found.items()), cell(ood),
                  f'{statistics.mean(wall) / 60:.1f}' if wall else ''])
  return out


def missing(runs: dict) -> list[str]:
  return [s['name'] for s in gap.specs({}, '') if s['name'] not in runs]


def section(teacher: dict, runs: dict, teacher_data: list[dict]) -> list[str]:
  t = teacher['texts'][VALID]['nll']
  header = ['change (from slowest pair 3 + fitted key, 15.6% KV)', 'steps (tokens)', 'seeds',
            'held-out NLL (mean ± half spread)', 'vs teacher', 'per seed', 'shakespeare',
            'train min (2 cores, shared)']
  md = ['## Closing the gap at 15.6% KV: one lever at a time (part `gap`)\n',
        f'Teacher: {t:.4f} held-out, {teacher["texts"][SHAKESPEARE]["nll"]:.4f} shakespeare; the '
        f'goal is {1.02 * t:.4f} (within 2%), on the way {1.10 * t:.4f} (+10%) at 1000 steps. '
        'Seeds change the data order (shuffle and packing); "± x" is half the range of the '
        'seeds run. The base row at seed 0 is goal_5_low_freq_fit (1000 steps) and goal_long '
        '(2000 steps), same settings.\n',
        report.table(header, rows(runs, t) or [['(no run yet)'] + [''] * 7])]
  for s in teacher_data:
    md.append(f"Teacher stories: {s['stories']:,} sampled at temperature 1 (BOS to EOS/BOS or 512 "
              f"tokens), {s.get('mean_tokens', 0):.0f} tokens each on average, generated at "
              f"{s['stories_per_s']:.1f} stories/s = {s['tokens_per_s']:,.0f} tokens/s "
              f"({s['decoded_positions_per_s']:,.0f} decoded positions/s, batch {s['batch']}, "
              f"compilation excluded) on the machine that generated them, while a study run "
              f"shared its 2 cores.\n")
  aligned = [f"{n} {r['before']['nll']:.3f} -> {r['after_align']['nll']:.3f}"
             for n, r in sorted(runs.items()) if n.startswith('gap_') and r.get('after_align')]
  if aligned:
    md.append('The align stage alone (held-out NLL at the SVD start -> after align, before '
              'distillation): ' + '; '.join(aligned) + '.\n')
  md += budget_lines(budget_series(runs), t)
  left = missing(runs)
  if left:
    md.append(f'Not run yet ({len(left)}): ' + ', '.join(left) + '.\n')
  return md


def budget_series(runs: dict) -> dict[str, list[tuple]]:
  """Per lever run at two budgets or more: (steps, mean held-out NLL over the seeds, half their
  spread, seeds)."""
  out = {}
  for lever, (label, _) in gap.levers('').items():
    pts = []
    for steps in (gap.RECIPE_STEPS, gap.DOUBLE_STEPS, gap.LONG_STEPS):
      same = gap.SAME_LEVER_AT_RECIPE.get(lever) if steps == gap.RECIPE_STEPS else None
      valid = [text_nll(r, VALID) for r in seeds_of(runs, same or lever, steps).values()]
      if valid:
        pts.append((steps, statistics.mean(valid), (max(valid) - min(valid)) / 2, len(valid)))
    if len(pts) > 1:
      out[label] = pts
  return out


def flattens_at(pts: list[tuple]) -> float | None:
  """Where a curve measured at 1000, 2000 and 4000 steps goes if every further doubling of the
  budget gains the same fraction of the previous doubling's gain as 4000 did of 2000 (a geometric
  series through the three points, exact, so untested by them): L4 - d2^2 / (d1 - d2). None
  unless the three budgets are there and the gains shrink (d1 > d2 > 0)."""
  by_steps = {p[0]: p[1] for p in pts}
  if not all(s in by_steps for s in (gap.RECIPE_STEPS, gap.DOUBLE_STEPS, gap.LONG_STEPS)):
    return None
  l1, l2, l4 = (by_steps[s] for s in (gap.RECIPE_STEPS, gap.DOUBLE_STEPS, gap.LONG_STEPS))
  d1, d2 = l1 - l2, l2 - l4
  return l4 - d2 * d2 / (d1 - d2) if d1 > d2 > 0 else None


def budget_lines(series: dict[str, list[tuple]], teacher_nll: float) -> list[str]:
  lines = []
  for label, pts in series.items():
    limit = flattens_at(pts)
    if limit is not None:
      lines.append(f'{label}: {limit:.4f} ({100 * (limit / teacher_nll - 1):+.1f}%)')
  if not lines:
    return []
  return ['Where the budget curves flatten (budget.png), if every doubling past 4000 steps gains '
          'the same fraction of the last doubling\'s gain as 2000 -> 4000 did of 1000 -> 2000 '
          '(a geometric series through the three budgets; three points fix it exactly, so they '
          'do not test it; the 4000-step points are one seed): ' + '; '.join(lines) + '.\n']


def curves(runs: dict) -> dict[str, list[dict]]:
  out = {}
  for lever, (label, _) in gap.levers('').items():
    for steps in (gap.RECIPE_STEPS, gap.DOUBLE_STEPS, gap.LONG_STEPS):
      found = seeds_of(runs, lever, steps)
      if 0 in found and found[0].get('curve'):
        out[f'{label}, {steps}'] = found[0]['curve']
  return out
