"""What the study runs. A spec is {'name', 'part', 'over' (dotted config overrides),
'steps' (0 = initialisation only), optional 'dpo'}; `specs(part, run)` yields a part's specs, and
may call `run(spec)` to look at earlier results (e.g. to pick the best RoPE-consistent choice).

The teacher caches 2 x 4 KV heads x 8 dims = 64 values per token and layer; a student keeps
r_kv + d_r of them. With d_r = 2 (one rotate-half pair; d_qk = 6): r_kv 30 -> 50%, 14 -> 25%,
8 -> 15.6%, 4 -> 9.4%, 1 -> 4.7% (the smallest possible with a RoPE key).
"""

from __future__ import annotations

from typing import Callable, Iterator

from experiments.stories260k import demo_budget, gap

PARTS = ('init', 'recipe', 'goal', 'grid', 'dynamic', 'loss', 'norm', 'dpo', 'long', 'gap', 'demo')
FRACTIONS = {'50%': 30, '25%': 14, '15.6%': 8, '9.4%': 4, '4.7%': 1}   # r_kv at d_r = 2
INIT_FRACTIONS = ('50%', '25%', '15.6%', '9.4%')
CONSISTENT = ('high_freq', 'low_freq', 'uniform', 'norm')
GRID_STEPS = 400      # 400 x 16 x 256 = 1.6M tokens per run
RECIPE_STEPS = 1000   # the recipe's budget: 1000 x 16 x 256 = 4.1M tokens
GOAL_LONG_STEPS = 2000   # twice the recipe's budget

# The recipe the PyTorch reference ran (see the issue): 15.6% KV, paper RoPE choice, r_q 64,
# SVD init, all parameters trained, KL only, AdamW peak lr 3e-3 with cosine decay.
RECIPE = {'mla.r_kv': 8, 'mla.d_r': 2, 'mla.d_qk': 6, 'mla.rope_dims': 'paper', 'mla.r_q': 64,
          'train.lr': 3e-3, 'train.batch_size': 16, 'train.seq_len': 256,
          'distill.kl_weight': 1.0, 'distill.ce_weight': 0.0}
BEST = {**RECIPE, 'mla.rope_dims': 'low_freq', 'mla.rope_key': 'fit'}  # goal_5: parts gap, demo
CURVE = {'train.eval_every': 50, 'train.eval_docs': 200}
TEACHER_CACHE = 'runs/study/teacher_data'  # the gap part's teacher stories, shared by its runs


def shape(r_kv: int, d_r: int = 2) -> dict:
  return {'mla.r_kv': r_kv, 'mla.d_r': d_r, 'mla.d_qk': 8 - d_r}


def init_name(frac: str, method: str, rope: str, key: str) -> str:
  return f'init_{frac.rstrip("%").replace(".", "p")}_{method}_{rope}_{key}'


def init_specs() -> Iterator[dict]:
  """Before any training (first 200 held-out stories): every RoPE choice x shared-key fit x
  weight-SVD vs activation-aware, at the four KV fractions of the paper's range."""
  for frac in INIT_FRACTIONS:
    for method in ('svd', 'activation'):
      for rope in ('paper',) + CONSISTENT:
        for key in ('mean', 'fit'):
          yield {'name': init_name(frac, method, rope, key), 'part': 'init', 'steps': 0,
                 'frac': frac, 'method': method, 'rope': rope, 'key': key,
                 'over': {**shape(FRACTIONS[frac]), 'mla.init': method, 'mla.rope_dims': rope,
                          'mla.rope_key': key, 'eval.max_docs': 200}}


def best_consistent(frac: str, run: Callable[[dict], dict]) -> tuple[str, str]:
  """The RoPE-consistent choice (and key) with the lowest NLL before training (weight SVD)."""
  best = None
  for spec in init_specs():
    if spec['frac'] == frac and spec['method'] == 'svd' and spec['rope'] in CONSISTENT:
      nll = run(spec)['before']['nll']
      if best is None or nll < best[0]:
        best = (nll, spec['rope'], spec['key'])
  return best[1], best[2]


def grid_specs(run) -> Iterator[dict]:
  """Compression x initialisation, before and after the same distillation budget."""
  for frac, r_kv in FRACTIONS.items():
    tag = frac.rstrip('%').replace('.', 'p')
    base = {**shape(r_kv), 'mla.r_q': 64}
    curve = CURVE if frac == '9.4%' else {}
    yield {'name': f'grid_{tag}_random', 'part': 'grid', 'frac': frac, 'init': 'random',
           'steps': GRID_STEPS, 'over': {**base, **curve, 'mla.init': 'random'}}
    yield {'name': f'grid_{tag}_svd_paper', 'part': 'grid', 'frac': frac, 'init': 'SVD paper',
           'steps': GRID_STEPS, 'over': {**base, **curve, 'mla.rope_dims': 'paper'}}
    if frac in INIT_FRACTIONS:
      rope, key = best_consistent(frac, run)
    else:  # below the init study's range: the choice that won at 9.4%
      rope, key = best_consistent('9.4%', run)
    yield {'name': f'grid_{tag}_svd_consistent', 'part': 'grid', 'frac': frac,
           'init': f'SVD {rope}/{key}', 'steps': GRID_STEPS,
           'over': {**base, 'mla.rope_dims': rope, 'mla.rope_key': key}}
    yield {'name': f'grid_{tag}_activation', 'part': 'grid', 'frac': frac,
           'init': 'activation-aware (paper dims)', 'steps': GRID_STEPS,
           'over': {**base, 'mla.init': 'activation', 'mla.rope_dims': 'paper'}}


def specs(part: str, run: Callable[[dict], dict]) -> Iterator[dict]:
  base15 = {**shape(8), 'mla.r_q': 64}
  if part == 'init':
    yield from init_specs()
  elif part == 'recipe':
    yield {'name': 'recipe_svd', 'part': 'recipe', 'steps': RECIPE_STEPS, 'init': 'SVD paper',
           'over': {**RECIPE, **CURVE}}
    yield {'name': 'recipe_random', 'part': 'recipe', 'steps': RECIPE_STEPS, 'init': 'random',
           'over': {**RECIPE, **CURVE, 'mla.init': 'random'}}
  elif part == 'grid':
    yield from grid_specs(run)
  elif part == 'dynamic':
    for delta in (0.90, 0.95, 0.99):
      yield {'name': f'dynamic_{int(delta * 100)}', 'part': 'dynamic', 'steps': GRID_STEPS,
             'delta': delta, 'over': {**base15, 'mla.kv_energy': delta, 'mla.keep_ends_fixed': True}}
    yield {'name': 'dynamic_budget_15p6', 'part': 'dynamic', 'steps': GRID_STEPS, 'delta': None,
           'over': {**base15, 'mla.kv_budget': 50 / 320}}
  elif part == 'loss':
    for kl, ce in ((1.0, 0.1), (0.5, 0.5), (0.0, 1.0)):
      yield {'name': f'loss_kl{kl}_ce{ce}', 'part': 'loss', 'steps': GRID_STEPS, 'kl': kl, 'ce': ce,
             'over': {**base15, 'distill.kl_weight': kl, 'distill.ce_weight': ce}}
  elif part == 'norm':
    yield {'name': 'norm_on', 'part': 'norm', 'steps': GRID_STEPS,
           'over': {**base15, 'mla.latent_norm': True}}
  elif part == 'dpo':
    yield {'name': 'dpo_15p6', 'part': 'dpo', 'steps': GRID_STEPS, 'dpo': True,
           'over': {**base15, 'dpo.steps': 100, 'dpo.lr': 2e-5, 'dpo.batch_size': 8,
                    'dpo.beta': 0.1, 'dpo.eval_pairs': 32, 'train.eval_every': 25}}
  elif part == 'goal':
    yield from goal_specs(run)
  elif part == 'long':
    yield long_spec(run)
  elif part == 'gap':
    yield from gap.specs(BEST, TEACHER_CACHE)
  elif part == 'demo':
    yield from demo_budget.specs(BEST)


GOAL_STEPS = [  # (name, what changes against the recipe, overrides)
    ('goal_1_consistent_fit', 'RoPE-consistent pair 0 + fitted shared key',
     {'mla.rope_dims': 'high_freq', 'mla.rope_key': 'fit'}),
    ('goal_2_split_6_4', 'split r_kv 6 + d_r 4 (pairs 0,1, fitted key)',
     {'mla.rope_dims': 'high_freq', 'mla.rope_key': 'fit', **shape(6, 4)}),
    ('goal_3_split_4_6', 'split r_kv 4 + d_r 6 (pairs 0-2, fitted key)',
     {'mla.rope_dims': 'high_freq', 'mla.rope_key': 'fit', **shape(4, 6)}),
    ('goal_4_split_2_8', 'split r_kv 2 + d_r 8 (all dims RoPE, fitted key)',
     {'mla.rope_dims': 'high_freq', 'mla.rope_key': 'fit', **shape(2, 8)}),
    # Added after the grid: at 25% the slowest pair (low_freq) trained best, not the pair with the
    # best NLL before training.
    ('goal_5_low_freq_fit', 'slowest pair 3 + fitted key',
     {'mla.rope_dims': 'low_freq', 'mla.rope_key': 'fit'}),
    ('goal_6_split_6_4_low', 'split r_kv 6 + d_r 4 (slowest pairs 2,3, fitted key)',
     {'mla.rope_dims': 'low_freq', 'mla.rope_key': 'fit', **shape(6, 4)}),
    ('goal_7_lr_6e-3', 'peak lr 6e-3, pair 0 + fitted key',
     {'mla.rope_dims': 'high_freq', 'mla.rope_key': 'fit', 'train.lr': 6e-3}),
]


def goal_spec(name: str, label: str, over: dict) -> dict:
  return {'name': name, 'part': 'goal', 'label': label, 'steps': RECIPE_STEPS,
          'over': {**RECIPE, **CURVE, **over}}


def goal_specs(run) -> Iterator[dict]:
  """Toward a 15.6% student within 2% of the teacher: one change at a time against the recipe,
  at the recipe's 1000-step budget."""
  del run
  for name, label, over in GOAL_STEPS:
    yield goal_spec(name, label, over)


def long_spec(run) -> dict:
  """The best 15.6% setting of the recipe and the goal steps, with twice the budget."""
  candidates = [(run(next(specs('recipe', run)))['after']['nll'], 'the recipe as it is', {})]
  for name, label, over in GOAL_STEPS:
    candidates.append((run(goal_spec(name, label, over))['after']['nll'], label, over))
  _, label, over = min(candidates, key=lambda c: c[0])
  return {'name': 'goal_long', 'part': 'goal', 'steps': GOAL_LONG_STEPS,
          'label': f'{label}, {GOAL_LONG_STEPS} steps', 'over': {**RECIPE, **CURVE, **over}}
