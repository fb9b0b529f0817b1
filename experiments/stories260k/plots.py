"""The study's plots (PNG): learning curves (held-out NLL against step) and NLL against KV kept."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

VALID = 'tinystories_valid_1000.txt'  # the held-out text every table and curve is measured on


def _save(fig, out: str, name: str) -> str:
  fig.tight_layout()
  path = os.path.join(out, name)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_curves(out: str, teacher: dict, curves: dict[str, list[dict]], name: str, title: str,
                ylim: tuple[float, float] | None = None) -> str:
  """Held-out NLL against step; many curves get the legend beside the axes, not over them."""
  wide = len(curves) > 5
  fig, ax = plt.subplots(figsize=(11, 4.5) if wide else (6, 4))
  drawn = 0
  for label, points in curves.items():
    pts = [(p['step'], p['eval_nll']) for p in points if 'eval_nll' in p]
    if pts:  # ten colours, then the next line style: no two curves look alike
      ax.plot(*zip(*pts), marker='o', ms=3, label=label, color=f'C{drawn % 10}',
              ls=('-', '-.', ':')[drawn // 10 % 3])
      drawn += 1
  ax.axhline(teacher.get('first200_nll') or teacher['texts'][VALID]['nll'], color='k', ls='--',
             label='teacher')
  ax.set_xlabel('distillation step')
  ax.set_ylabel('held-out NLL (first 200 stories)')
  ax.set_title(title)
  if ylim:
    ax.set_ylim(*ylim)
  if wide:
    ax.legend(loc='center left', bbox_to_anchor=(1.02, 0.5), fontsize=8)
  else:
    ax.legend()
  return _save(fig, out, name)


def plot_grid(out: str, teacher: dict, runs: dict) -> str:
  fig, ax = plt.subplots(figsize=(6, 4))
  by_init: dict[str, list] = {}
  for run in runs.values():
    if run['part'] == 'grid' and run.get('after'):
      key = run['init'] if not run['init'].startswith('SVD ') or run['init'] == 'SVD paper' else 'SVD RoPE-consistent'
      by_init.setdefault(key, []).append((100 * run['kv_fraction'], run['after']['texts'][VALID]['nll']))
  for label, pts in sorted(by_init.items()):
    ax.plot(*zip(*sorted(pts)), marker='o', label=label)
  ax.axhline(teacher['texts'][VALID]['nll'], color='k', ls='--', label='teacher')
  ax.set_xscale('log')
  ax.set_xlabel('KV cache kept (% of the teacher)')
  ax.set_ylabel('held-out NLL after distillation')
  ax.legend()
  return _save(fig, out, 'compression.png')


def plot_budget(out: str, teacher_nll: float, series: dict[str, list[tuple]]) -> str:
  """Held-out NLL (all 1000 stories) after training against the distillation budget, one line
  per lever: (steps, mean over seeds, half their spread, seeds) points; the teacher, the goal
  (within 2%) and +10% as horizontal lines."""
  fig, ax = plt.subplots(figsize=(10, 4.5))
  for k, (label, pts) in enumerate(series.items()):
    steps, mean, half, _ = zip(*sorted(pts))
    ax.errorbar([s * 16 * 256 / 1e6 for s in steps], mean, yerr=half, marker='o', ms=4,
                capsize=3, label=label, color=f'C{k % 10}', ls=('-', '-.', ':')[k // 10 % 3])
  for y, style, label in ((teacher_nll, '--', 'teacher'), (1.02 * teacher_nll, ':', 'goal (+2%)'),
                          (1.10 * teacher_nll, '-.', '+10%')):
    ax.axhline(y, color='k', ls=style, lw=1, label=label)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('distillation tokens (M; 16 x 256 a step)')
  ax.set_ylabel('held-out NLL (all 1000 stories)')
  ax.set_title('How far each lever goes with the budget (15.6% KV unless noted)')
  ax.legend(loc='center left', bbox_to_anchor=(1.02, 0.5), fontsize=8)
  return _save(fig, out, 'budget.png')
