"""A stories260K sweep that runs on this machine: three students over the latent rank r_kv and
the RoPE dims d_r (9.4%, 15.6% and 25% of the teacher's 64 cached values per token and layer),
each a short distillation, evaluated on the held-out stories (init, distill, eval; no export).

  python -m xecomla.sweep --config=configs/stories260k_sweep.py --dry_run
  python -m xecomla.sweep --config=configs/stories260k_sweep.py:steps=100,max_docs=100

Sweep arguments (after the colon): steps (distillation steps per point, 300), max_docs
(held-out stories evaluated, 200). `get_config(arg)` is configs/stories260k.py's, so a point is
`--config=configs/stories260k_sweep.py:r_kv=4,d_r=2,steps=300` and runs alone with
python -m xecomla.main as well.
"""

from configs import stories260k
from configs.common import parse_arg

# (r_kv, d_r): (r_kv + d_r) / 64 of the teacher's cache per layer.
POINTS = ((4, 2), (6, 4), (12, 4))


def get_config(arg=None):
  return stories260k.get_config(arg)


def get_sweep(arg=None):
  a = parse_arg(arg, steps=300, max_docs=200)
  # pairs 0.. (high_freq): the RoPE choice the README's sweep figures were measured with
  return [{'name': f'r{r_kv}_d{d_r}',
           'arg': f'r_kv={r_kv},d_r={d_r},rope_dims=high_freq,steps={a.steps}',
           'overrides': {'stages': 'init,distill,eval', 'eval.max_docs': a.max_docs}}
          for r_kv, d_r in POINTS]
