"""The real stories260K Llama (llama2.c, GQA 8/4 heads, head_dim 8, 5 layers) on TinyStories:
the README demo and the tests.

  python -m xecomla.main --config=configs/stories260k.py --workdir=runs/stories260k
  python -m xecomla.main --config=configs/stories260k.py:r_kv=4,d_r=4 ...

Arguments (comma-separated key=value): see `get_config`.
"""

from configs.common import base_config, data_path, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, stages='eval')
  c = base_config()
  c.stages = a.stages
  c.teacher.path = data_path('stories260K', 'stories260K.bin')
  c.teacher.tokenizer = data_path('stories260K', 'tok512.bin')
  c.data.train_path = data_path('text', 'tinystories_train_2MiB.txt')
  c.eval.path = data_path('text', 'tinystories_valid_1000.txt')
  c.eval.max_docs = 200
  c.eval.extra_paths = data_path('text', 'tinyshakespeare.txt')
  c.dpo.path = data_path('prefs', 'orca_dpo_pairs_284.jsonl')
  c.eval.memory_gb = 1.0
  return c
