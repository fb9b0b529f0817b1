"""Llama-3.2-1B upcycled to MLA at the paper's 15.6% KV setting: r_kv 128 (+ d_r 32) of 1024.

  python -m xecomla.main --config=configs/r_kv_128.py:teacher=3b
"""

from configs.llama32 import get_base


def get_config(arg=None):
  return get_base(arg, r_kv=128)
