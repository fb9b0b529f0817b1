"""Llama-3.2-1B with per-layer ranks chosen by retained energy (the paper's dynamic rank):
delta_kv = delta_q = 0.95, ranks rounded up to a multiple of 8, first and last layer kept at the
fixed ranks (r_kv 64, r_q 1424).

  python -m xecomla.main --config=configs/dynamic.py:teacher=1b
  python -m xecomla.main --config=configs/dynamic.py --config.mla.kv_energy=0.9
"""

from configs.llama32 import get_base


def get_config(arg=None):
  c = get_base(arg, r_kv=64)
  c.mla.kv_energy = 0.95
  c.mla.q_energy = 0.95
  c.mla.round_to = 8
  c.mla.keep_ends_fixed = True
  return c
