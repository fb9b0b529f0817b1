"""Llama-3.2 settings of the X-EcoMLA paper (arXiv 2503.11132, official recipe), shared by
r_kv_64.py, r_kv_128.py and dynamic.py.

Models are named by their Hugging Face Hub ids (meta-llama/Llama-3.2-1B-Instruct as the source;
teachers meta-llama/Llama-3.2-1B-Instruct, -3.2-3B-Instruct, -3.1-8B-Instruct): a run takes them
from the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)
without network, and downloads what is not cached unless HF_HUB_OFFLINE=1 (xecomla/hub.py; the
Meta repositories are gated: accept the licence, then `hf auth login` or HF_TOKEN). With
$XECOMLA_MODELS set (read when the config is built), the ids map to local Hugging Face
directories instead, named after the model: $XECOMLA_MODELS/Llama-3.2-1B-Instruct and so on.

Arguments: teacher=1b|3b|8b (the distillation teacher; the student is always upcycled from
Llama-3.2-1B-Instruct), steps, batch, seq_len, lr.
"""

import os

from configs.common import base_config, parse_arg

SOURCE = 'meta-llama/Llama-3.2-1B-Instruct'
TEACHERS = {'1b': SOURCE, '3b': 'meta-llama/Llama-3.2-3B-Instruct',
            '8b': 'meta-llama/Llama-3.1-8B-Instruct'}


def model_path(hub_id: str) -> str:
  """The Hub id, or $XECOMLA_MODELS/<name> when XECOMLA_MODELS is set."""
  models = os.environ.get('XECOMLA_MODELS')
  return os.path.join(os.path.expanduser(models), hub_id.split('/')[-1]) if models else hub_id


def get_base(arg, *, r_kv: int):
  a = parse_arg(arg, teacher='1b', steps=20000, batch=64, seq_len=2048, lr=8e-5)
  if a.teacher not in TEACHERS:
    raise ValueError(f'teacher={a.teacher!r}: choose one of {sorted(TEACHERS)}')
  c = base_config()
  c.dtype = 'bfloat16'
  c.stages = 'init,distill,dpo,eval,export'
  c.teacher.path = model_path(SOURCE)
  if a.teacher != '1b':
    c.distill.teacher_path = model_path(TEACHERS[a.teacher])
  # Llama-3.2-1B: 16 layers, 32 query / 8 KV heads of 64 dims; teacher cache 2*8*64 = 1024/token/layer.
  c.mla.r_kv = r_kv
  c.mla.r_q = 1424
  c.mla.d_qk = 32
  c.mla.d_r = 32
  c.mla.rope_dims = 'paper'
  c.mla.latent_norm = False
  c.distill.kl_weight = 1.0
  c.distill.ce_weight = 0.0
  c.distill.temperature = 1.0
  c.train.steps = a.steps
  c.train.batch_size = a.batch
  # Planned with the TPU compiler (python -m xecomla.tools.plan, README "Planning a run"): on a
  # v5e-16 the mesh is data 2 x fsdp 8 with no accumulation (4 rows of 2048 per device per step);
  # on a v5e-64 (the 8B teacher) data 8 x fsdp 8, one row per device.
  c.train.accum = 1
  c.train.seq_len = a.seq_len
  c.train.lr = a.lr
  c.train.warmup = 0.01
  c.train.b2 = 0.999
  c.train.remat = 'full'
  # One scan over the 16 identical blocks. For the TPU compiler (experiments/paper_plans): at the
  # shipped v5e-16 mesh the KD step needs 10.00 GiB per device scanned and 8.94 GiB unrolled, and
  # compiles faster scanned; at fsdp 16 with 4 micro-steps 6.91 against 14.49 GiB (53 s against
  # 189 s). On CPU the scan measured slower, so the base config keeps it off.
  c.model.scan_layers = True
  c.train.ckpt_every = 1000
  c.train.eval_every = 1000
  c.data.format = 'chat'
  c.data.train_path = os.environ.get('XECOMLA_SFT', '')  # chat JSONL ({"messages": [...]})
  c.dpo.path = os.environ.get('XECOMLA_PREFS', '')
  c.dpo.lr = 5e-7
  # 64 pairs a step: 4 micro-steps of 16 pairs (one pair per device) on the v5e-16 of the 1B and
  # 3B teachers, one step of 64 on the v5e-64 of the 8B teacher (the micro-batch must divide over
  # data x fsdp).
  c.dpo.batch_size = 64
  c.dpo.accum = 1 if a.teacher == '8b' else 4
  c.dpo.beta = 0.01
  c.dpo.max_len = 2048
  c.dpo.max_prompt_len = 1024
  c.eval.path = os.environ.get('XECOMLA_EVAL_TEXT', '')
  c.eval.max_docs = 0
  c.mesh.data = -1
  c.mesh.fsdp = 8
  return c
