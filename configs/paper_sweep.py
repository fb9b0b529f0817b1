"""The paper's sweep (X-EcoMLA, arXiv 2503.11132): the Llama-3.2-1B-Instruct MLA student at r_kv
64 (9.4% KV) and r_kv 128 (15.6%), each distilled from the 1B, 3B and 8B teachers, plus the
dynamic rank (per-layer ranks by retained energy, delta 0.95) with the 1B teacher: 7 points.

  python -m xecomla.sweep --config=configs/paper_sweep.py --root=gs://BUCKET/paper_sweep --dry_run
  python -m xecomla.sweep --config=configs/paper_sweep.py:steps=2000 --only=r64_1b,r128_1b

`get_config(arg)` takes `setting=r_kv_64|r_kv_128|dynamic` and the arguments of
configs/llama32.py (teacher, steps, batch, seq_len, lr), and returns that file's config, so a
point is e.g. `--config=configs/paper_sweep.py:setting=r_kv_128,teacher=3b`. The sweep argument
(after the colon of --config) is appended to every point's argument (e.g. `steps=2000`).
"""

from configs import dynamic, r_kv_64, r_kv_128

SETTINGS = {'r_kv_64': r_kv_64.get_config, 'r_kv_128': r_kv_128.get_config,
            'dynamic': dynamic.get_config}
TEACHERS = ('1b', '3b', '8b')


def get_config(arg=None):
  items = [i for i in (arg or '').split(',') if i]
  setting = 'r_kv_64'
  for item in [i for i in items if i.startswith('setting=')]:
    setting = item.split('=', 1)[1]
    items.remove(item)
  if setting not in SETTINGS:
    raise ValueError(f'setting={setting!r}: choose one of {sorted(SETTINGS)}')
  return SETTINGS[setting](','.join(items) or None)


def get_sweep(arg=None):
  extra = f',{arg}' if arg else ''
  points = [{'name': f'r{r_kv}_{t}', 'arg': f'setting=r_kv_{r_kv},teacher={t}{extra}'}
            for r_kv in (64, 128) for t in TEACHERS]
  return points + [{'name': 'dynamic_1b', 'arg': f'setting=dynamic,teacher=1b{extra}'}]
