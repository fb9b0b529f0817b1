"""Llama-3.2-1B upcycled to MLA at the paper's 9.4% KV setting: r_kv 64, r_q 1424, d_qk 32,
d_r 32 -> (64 + 32) / (2 * 8 * 64) = 9.4% of the teacher's cache (10.7x smaller).

  python -m xecomla.main --config=configs/r_kv_64.py                # 1B teacher
  python -m xecomla.main --config=configs/r_kv_64.py:teacher=8b     # Llama-3.1-8B teacher
"""

from configs.llama32 import get_base


def get_config(arg=None):
  return get_base(arg, r_kv=64)
