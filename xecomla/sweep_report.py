"""One report across a sweep, from each point's W/results.json: ROOT/sweep.json (every figure),
ROOT/sweep.md (a table) and ROOT/sweep.png (held-out NLL against KV fraction per point).

The KV fraction is the student's cached values per token over the teacher's
(`kv_values_per_token`, all layers; README "stable contract"); a point without results.json is
listed as not run, with no figures.
"""

from __future__ import annotations

import io
import json
import shlex

from etils import epath

from xecomla.cli import UsageError


def _ranks(values) -> str:
  """Per-layer ranks in a few characters: '64' when all layers agree, else 'min-max (mean m)'."""
  values = [v for v in (values or []) if v is not None]
  if not values:
    return ''
  if len(set(values)) == 1:
    return str(values[0])
  return f'{min(values)}-{max(values)} (mean {sum(values) / len(values):.1f})'


def row(point, workdir: str, cmd: list[str]) -> dict:
  """A point's figures from its results.json (None where it has none)."""
  out = {'name': point.name, 'workdir': workdir, 'arg': point.arg,
         'overrides': dict(point.overrides), 'command': shlex.join(cmd), 'status': 'not run'}
  path = epath.Path(workdir) / 'results.json'
  if not path.exists():
    return out
  try:
    results = json.loads(path.read_text())
    t, s = results['teacher'], results['student']
    out.update(status='done', teacher_nll=t['nll'], student_nll=s['nll'],
               teacher_kv=t['kv_values_per_token'], student_kv=s['kv_values_per_token'],
               r_kv=list(s.get('ranks', {}).get('r_kv') or []),
               r_q=list(s.get('ranks', {}).get('r_q') or []))
  except (ValueError, KeyError, TypeError) as e:
    out['status'] = f'unreadable results.json ({type(e).__name__}: {e})'
    return out
  out['kv_fraction'] = out['student_kv'] / out['teacher_kv']
  out['nll_vs_teacher'] = out['student_nll'] / out['teacher_nll'] - 1
  return out


def markdown(rows: list[dict], config: str) -> str:
  lines = [f'# Sweep `{config}`', '',
           '| point | config | teacher NLL | student NLL | vs teacher | KV values / token '
           '(student / teacher) | KV fraction | r_kv | r_q |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    settings = ', '.join(filter(None, [r['arg']] + [f'{k}={v}' for k, v in r['overrides'].items()]))
    if r['status'] != 'done':
      lines.append(f'| {r["name"]} | {settings} | {r["status"]} |  |  |  |  |  |  |')
      continue
    q = _ranks(r['r_q']) or 'none (full query)'
    lines.append(f'| {r["name"]} | {settings} | {r["teacher_nll"]:.4f} | {r["student_nll"]:.4f} '
                 f'| {r["nll_vs_teacher"]:+.1%} | {r["student_kv"]} / {r["teacher_kv"]} '
                 f'| {r["kv_fraction"]:.1%} | {_ranks(r["r_kv"])} | {q} |')
  lines += ['', 'Held-out NLL per predicted token (README "Evaluation"); KV values per token are '
            'cached values over all layers.', '']
  return '\n'.join(lines)


def plot(rows: list[dict], config: str) -> bytes:
  """NLL against KV fraction: each student a labelled point, each distinct teacher at 1.0."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  done = [r for r in rows if r['status'] == 'done']
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  ax.scatter([r['kv_fraction'] for r in done], [r['student_nll'] for r in done], color='C0',
             label='MLA student', zorder=3)
  for r in done:
    ax.annotate(r['name'], (r['kv_fraction'], r['student_nll']), textcoords='offset points',
                xytext=(4, 4), fontsize=8)
  teachers = sorted({round(r['teacher_nll'], 6) for r in done})
  ax.scatter([1.0] * len(teachers), teachers, color='C3', marker='s', label='teacher', zorder=3)
  ax.set_xlabel('KV fraction (student / teacher cached values per token)')
  ax.set_ylabel('held-out NLL')
  ax.set_title(f'sweep {config}', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format='png')
  plt.close(fig)
  return buf.getvalue()


def write(root: str, config: str, plan) -> str:
  """Writes ROOT/sweep.json, sweep.md and sweep.png for [(point, workdir, command)]; returns the
  markdown table."""
  try:
    rows = [row(p, w, c) for p, w, c in plan]
  except (ImportError, OSError) as e:
    raise UsageError(f'cannot read the sweep directory {root} here ({e}): install its filesystem '
                     '(gs://: pip install -e ".[gcs]") or copy the directory here and give --root') from e
  out = epath.Path(root)
  out.mkdir(parents=True, exist_ok=True)
  text = markdown(rows, config)
  (out / 'sweep.json').write_text(json.dumps({'config': config, 'points': rows}, indent=2) + '\n')
  (out / 'sweep.md').write_text(text)
  (out / 'sweep.png').write_bytes(plot(rows, config))
  return text
