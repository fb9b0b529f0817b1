"""The base configuration every experiment starts from, and `parse_arg` for sweep arguments.

Field names under `teacher`, `mla`, `train`, `data`, `eval`, `mesh` and the top-level `stages`,
`dtype`, `seed` are a stable contract (scripts drive xecomla through them): add fields freely,
never rename these.

Paths to the shared real data default to `../shared/data/...` from the project root; set the
environment variable XECOMLA_DATA to move that root, or override any path with a flag.
"""

from __future__ import annotations

import os

from ml_collections import config_dict

DATA = os.environ.get('XECOMLA_DATA', '../shared/data')


def data_path(*parts: str) -> str:
  return os.path.join(DATA, *parts)


def parse_arg(arg: str | None, **defaults) -> config_dict.ConfigDict:
  """'teacher=8b,r_kv=64' -> ConfigDict(teacher='8b', r_kv=64); values take the type of the
  default given for them (bool accepts true/false/1/0)."""
  out = config_dict.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    if '=' not in item:
      raise ValueError(f'config argument {item!r} is not key=value (arguments: {sorted(defaults)})')
    key, value = item.split('=', 1)
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: {sorted(defaults)}')
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ('1', 'true', 'yes')
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = kind(value)
  return out


def base_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.seed = 0
  c.dtype = 'float32'  # compute dtype: float32 | bfloat16 (parameters stay float32)
  # Stages run in order, each resuming from its own checkpoints: init, align, distill, dpo, eval, export.
  c.stages = 'init,distill,eval,export'

  # The Llama that is upcycled (and evaluated as "teacher"): a Hugging Face Llama directory, a Hub
  # id org/name[@revision] (from the HF cache, or downloaded: xecomla/hub.py), or a llama2.c .bin (then `tokenizer` names its tok*.bin and it is converted into W/teacher_hf).
  c.teacher = config_dict.ConfigDict()
  c.teacher.path = ''
  c.teacher.tokenizer = ''

  c.mla = config_dict.ConfigDict()
  c.mla.init = 'svd'             # svd | activation (whitened SVD on calibration text) | random
  c.mla.r_kv = 64                # fixed latent rank (used where kv_energy / kv_budget are unset)
  c.mla.r_q = config_dict.placeholder(int)  # None or 0 = uncompressed query
  c.mla.d_qk = 32                # no-RoPE dims per head; d_qk + d_r = the teacher's head_dim
  c.mla.d_r = 32                 # RoPE dims, one key shared by all heads
  c.mla.rope_dims = 'paper'      # paper | low_freq | high_freq | uniform | norm
  c.mla.rope_key = 'mean'        # mean (paper) | fit (per-pair complex rank-1 fit across heads)
  c.mla.kv_energy = config_dict.placeholder(float)  # delta_kv: per-layer rank by retained energy
  c.mla.q_energy = config_dict.placeholder(float)   # delta_q
  c.mla.kv_budget = config_dict.placeholder(float)  # target KV fraction, ranks by energy allocation
  c.mla.round_to = 8             # dynamic ranks rounded up to a multiple of this
  c.mla.keep_ends_fixed = True   # dynamic rank: first and last layer keep the fixed rank (paper)
  c.mla.sigma = 'up'             # where singular values go: up | down | split
  c.mla.kv_svd = 'joint'         # joint: SVD of [W^K, W^V] (paper) | nope: [W^K no-RoPE cols, W^V]
  c.mla.latent_norm = False      # RMSNorm on C^Q and C^KV (the paper found removing it better)
  c.mla.calib_path = ''          # calibration text for init=activation ('' = data.train_path)
  c.mla.calib_docs = 64
  c.mla.calib_tokens = 16384
  c.mla.calib_len = 2048         # calibration rows: min(this, the model's maximum length) tokens

  c.train = config_dict.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 16        # sequences per optimiser step (global, over all devices)
  c.train.seq_len = 256
  c.train.lr = 3e-3              # peak learning rate
  c.train.warmup = 0.01          # fraction of steps (or an int number of steps if >= 1)
  c.train.min_lr_ratio = 0.0     # cosine decays to lr * min_lr_ratio
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0
  c.train.accum = 1              # micro-batches per step (gradient accumulation)
  c.train.trainable = 'all'      # all | attention
  c.train.remat = 'none'          # rematerialisation of each block: none | full | dots_saveable
  c.train.frozen_dtype = 'auto'   # storage of the frozen KD teacher / DPO reference: auto (= dtype) | float32 | bfloat16
  c.train.log_every = 10
  c.train.eval_every = 0         # held-out NLL every N steps (0 = only at the end)
  c.train.eval_docs = 50
  c.train.ckpt_every = 200
  c.train.keep = 2
  c.train.stop_after = 0          # end the run at this step, checkpointed (resume later); 0 = never
  c.train.max_nonfinite = 3       # stop (exit 3) after this many non-finite steps in a row (never applied)

  c.distill = config_dict.ConfigDict()
  c.distill.teacher_path = ''    # a larger KD teacher (HF Llama dir or Hub id); '' = teacher.path
  c.distill.kl_weight = 1.0
  c.distill.ce_weight = 0.0
  c.distill.temperature = 1.0
  c.distill.hidden_weight = 0.0  # per-layer hidden-state MSE (same depth and width only)
  c.distill.loss_chunk = 512     # KD loss over this many positions at a time (0 = whole rows)
  c.distill.divergence = 'forward_kl'  # per token: forward_kl KL(teacher||student) | reverse_kl
                                 # KL(student||teacher) | jsd (generalised JSD, distill.jsd_beta)
  c.distill.jsd_beta = 0.5       # JSD(beta): beta KL(T||M) + (1-beta) KL(S||M), M = beta T + (1-beta) S
  c.distill.policy_fraction = 0.0  # on-policy distillation (GKD): this fraction of each batch's
                                 # rows sampled from the current student every step (text data)
  c.distill.policy_temperature = 1.0
  c.distill.policy_top_p = 1.0

  # Stage `align` (before distill): each MLA layer's attention output fitted by MSE to the
  # teacher's, on the teacher's own hidden states (all layers at once); attention weights only.
  c.align = config_dict.ConfigDict()
  c.align.steps = 300
  c.align.lr = 1e-3

  c.dpo = config_dict.ConfigDict()
  c.dpo.path = ''                # preference JSONL
  c.dpo.beta = 0.01
  c.dpo.steps = 100
  c.dpo.batch_size = 8
  c.dpo.accum = 1                # micro-batches of pairs per step (gradient accumulation)
  c.dpo.lr = 5e-7
  c.dpo.max_len = 512
  c.dpo.max_prompt_len = 256
  c.dpo.eval_pairs = 32          # pairs held out of training for reward accuracy

  c.data = config_dict.ConfigDict()
  c.data.train_path = ''
  c.data.format = 'text'         # text (<|endoftext|>-separated) | chat (JSONL messages)
  c.data.workers = 0             # grain worker processes (0 = in-process)
  # Stories sampled from the (KD) teacher as training data (xecomla/teacher_data.py), generated
  # once and cached: alone (teacher_fraction 1) or mixed with data.train_path by examples.
  c.data.teacher_stories = 0     # how many (0 = off)
  c.data.teacher_fraction = 1.0  # share of training examples drawn from them
  c.data.teacher_temperature = 1.0
  c.data.teacher_top_p = 1.0
  c.data.teacher_top_k = 0
  c.data.teacher_max_len = 0     # tokens per story at most, BOS included (0 = the model's length)
  c.data.teacher_batch = 256     # stories per generation call
  c.data.teacher_seed = 0
  c.data.teacher_cache = ''      # '' = W/teacher_data; a shared folder lets runs reuse stories

  c.eval = config_dict.ConfigDict()
  c.eval.path = ''               # held-out text, README evaluation definition
  c.eval.max_docs = 200          # 0 = all
  c.eval.extra_paths = ''        # comma-separated further text files (e.g. out of domain)
  c.eval.extra_max_docs = -1     # documents of each extra text (-1: as eval.max_docs, 0: all)
  c.eval.mc_paths = ''           # comma-separated multiple-choice JSONL files
  c.eval.story_mc = 0            # story completion: items built from eval.path's stories, scored as
                                 # multiple choice (xecomla/story_mc.py; 0 = off)
  c.eval.story_mc_choices = 4    # choices per item: the true last sentence + this - 1 other endings
  c.eval.story_mc_seed = 0       # draws the other endings and the true one's position
  c.eval.batch_rows = 16
  c.eval.max_len = 2048          # predicted tokens per document: min(this, the model's maximum length)
  c.eval.sample_tokens = 40      # greedy sample length from BOS (0 = none)
  c.eval.cache_dtype = ''        # also the NLL decoded token by token through a cache of this dtype
                                 # (auto|float32|bfloat16|int8|float8_e4m3fn; '' = not measured)
  c.eval.memory_gb = 16.0        # KV report: the longest context whose cache fits this memory
  c.eval.teacher = True          # also evaluate the teacher (False: the student only)

  c.model = config_dict.ConfigDict()
  c.model.attention = 'auto'     # attention kernel: auto (per backend) | reference | xla | cudnn | splash
  c.model.scan_layers = False    # one lax.scan over identical blocks: see benchmarks/BENCHMARKS.md (slower here)

  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1               # -1 = all devices not used by fsdp x tensor
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.export = config_dict.ConfigDict()
  c.export.out = ''              # '' = W/export/hf
  c.export.deepseek = False      # also write a native deepseek_v3 directory when compatible
  return c
