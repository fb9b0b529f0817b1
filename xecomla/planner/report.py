"""A plan (planner.plan.plan's dict) as text: one table per step kind, analytic beside compiler."""

from __future__ import annotations

from typing import Any

ANALYTIC_ROWS = (('student_params', 'student parameters (float32)'),
                 ('optimizer', 'optimiser state (AdamW moments)'),
                 ('gradients', 'gradients (accumulator + micro-step)'),
                 ('frozen', 'frozen model'),
                 ('batch', 'batch (int32 inputs)'),
                 ('student_activations', 'student activations (estimate)'),
                 ('loss', 'loss [positions, vocab] tensors (estimate)'),
                 ('frozen_activations', 'frozen forward (estimate)'))
COMPILER_ROWS = ('arguments', 'outputs', 'temporaries', 'aliased')


def gib(n: int | None) -> str:
  """Bytes as GiB (MiB below 1 GiB), two decimals."""
  if n is None:
    return '-'
  return f'{n / 2 ** 30:.2f} GiB' if n >= 2 ** 30 else f'{n / 2 ** 20:.2f} MiB'


def _mesh(m: dict[str, int]) -> str:
  return f"data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}"


def _model(name: str, m: dict[str, Any]) -> str:
  count = m['params']
  size = f'{count / 1e9:.3f}B' if count >= 1e9 else f'{count / 1e6:.3f}M'
  text = (f"{name}: {size} parameters, {m['layers']} layers, dim {m['dim']}, "
          f"{m['heads']}/{m['kv_heads']} heads of {m['head_dim']}, vocab {m['vocab']}"
          f"{', tied' if m['tie_embeddings'] else ''}")
  if 'r_kv' in m:
    text += (f", MLA r_kv {m['r_kv']} r_q {m['r_q']} d_qk {m['d_qk']} d_r {m['d_r']} "
             f"(KV {m['kv_fraction']:.1%})")
  return f"{text}; from {m['from']}"


def suggestion_lines(s: dict[str, Any] | None, kind: str) -> list[str]:
  if s is None:
    return [f'  no data x fsdp split of these devices (tensor as given) with a micro-batch that '
            f'divides over it is predicted to fit the {kind} step']
  how = 'confirmed by the compiler' if s['confirmed'] else 'predicted (analytic, calibrated)'
  total = s['compile']['per_device_bytes']['total'] if s['confirmed'] else s['predicted_total']
  lines = [f"  suggestion: mesh {_mesh(s['mesh'])}, accum {s['accum']} (micro-batch "
           f"{s['micro_batch']} rows, {s['rows_per_device']} per data x fsdp shard): "
           f"{gib(total)} {how}"]
  for t in s.get('tried', []):
    if not t['fits']:
      lines.append(f"    tried mesh {_mesh(t['mesh'])}, accum {t['accum']}: {gib(t['total'])}, "
                   'does not fit')
  return lines


def step_lines(kind: str, r: dict[str, Any], mesh: dict[str, int]) -> list[str]:
  b = r['batch']
  head = (f"{kind.upper()} step, mesh {_mesh(mesh)}: {b['rows']} rows of {b['seq_len']} tokens"
          f"{' (pairs)' if kind == 'dpo' else ''}, accum {b['accum']}, micro-batch "
          f"{b['micro_batch']} ({b['rows_per_device']} per data x fsdp shard); "
          f"attention {r['attention']}, remat {r['remat']}")
  lines = [head, f"  {'per device':<44}{'analytic':>12}{'compiler':>12}"]
  for key, label in ANALYTIC_ROWS:
    lines.append(f"  {label:<44}{gib(r['analytic'][key]):>12}")
  pd = r['per_device_bytes'] or {}
  for key in COMPILER_ROWS:
    if key in pd:
      lines.append(f"  {key:<44}{'':>12}{gib(pd[key]):>12}")
  lines.append(f"  {'total':<44}{gib(r['analytic']['total']):>12}{gib(pd.get('total')):>12}")
  if pd.get('peak') is not None:
    lines.append(f"  {'peak (compiler)':<44}{'':>12}{gib(pd['peak']):>12}")
  if 'compile_seconds' in r:
    lines.append(f"  lowering {r['lower_seconds']} s, compile {r['compile_seconds']} s"
                 f"{'' if r['compiled'] else ' (refused: RESOURCE_EXHAUSTED)'}")
  if r.get('error') and r['per_device_bytes'] is None:
    lines.append(f"  cannot run: {r['error']}")
  basis = 'compiler' if r['per_device_bytes'] else 'analytic'
  lines.append(f"  fits {gib(r['limit_bytes'])}: {'yes' if r['fits'] else 'NO'} ({basis})")
  if not r['fits']:
    lines += suggestion_lines(r['suggestion'], kind)
  return lines


def report(p: dict[str, Any]) -> str:
  lines = [f"topology {p['topology']}: {p['devices']} x {p['chip']}, HBM {gib(p['hbm_bytes'])} per "
           f"device; mesh {_mesh(p['mesh'])}",
           _model('student', p['student']), _model('teacher', p['teacher'])]
  lines += [f'note: {n}' for n in p['notes']]
  for kind, r in p['steps'].items():
    lines += [''] + step_lines(kind, r, p['mesh'])
  lines += ['', f"planned in {p['seconds']} s"]
  return '\n'.join(lines) + '\n'
