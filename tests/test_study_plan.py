"""The stories260K study's plan: every run it would make is a valid configuration of the product,
with the KV cache its tables claim. (Running the study itself takes hours: see its README.)"""

import zlib

import pytest

from experiments.stories260k import plan, study
from tests.conftest import require_shared_data
from xecomla import pipeline


def finished(spec):
  """Stands in for a finished run when a part looks at earlier results (best choice, long run)."""
  nll = 4.0 + zlib.crc32(spec['name'].encode()) % 1000 / 1000
  return {'before': {'nll': nll}, 'after': {'nll': nll}}


SPECS = [s for part in plan.PARTS for s in plan.specs(part, finished)]


def test_run_names_are_unique_and_parts_known():
  names = [s['name'] for s in SPECS]
  assert len(names) == len(set(names))
  assert {s['part'] for s in SPECS} <= set(plan.PARTS)


def test_overrides_name_existing_fields():
  for spec in SPECS:
    study.config_for(spec['over'])   # set_dotted refuses a field the config does not have
  with pytest.raises(KeyError, match='mla.rope_kye is not a config field'):
    study.config_for({'mla.rope_kye': 'fit'})


def test_kv_fractions_are_what_the_tables_say():
  for s in SPECS:
    over = {**study.BASE, **s['over']}
    assert over['mla.d_qk'] + over['mla.d_r'] == 8, s['name']   # stories260K's head_dim
    values = over['mla.r_kv'] + over['mla.d_r']
    if s['part'] in ('grid', 'init'):
      assert values == plan.FRACTIONS[s['frac']] + 2, s['name']
    if s['part'] in ('recipe', 'goal', 'loss', 'norm', 'dpo'):
      assert values == 10, s['name']                             # 10 / 64 = 15.6%


def test_every_run_passes_the_pipelines_validation():
  require_shared_data()
  for s in SPECS:
    c = study.config_for(s['over'])
    pipeline.validate(c, pipeline.parse_stages('init,distill,dpo,eval'))
