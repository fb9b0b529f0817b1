"""The abstract teacher and student of a config, without weights.

A model path gives its LlamaConfig from, in order: the `config.json` of a Hugging Face directory
(read by the conversion's own reader, so refusals match a real run) or of a Hub id's snapshot in
the Hugging Face cache (never downloaded for a plan), the header of a llama2.c `.bin`, or a named
shape matched from the directory's or the id's name (the paper's models, for planning on a
machine that has not downloaded them). The student is the MLAConfig the init stage builds at
the fixed ranks mla.r_kv / mla.r_q (dynamic ranks need weights).
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile

import jax
from etils import epath

from xecomla import fileio, hub
from xecomla.cli import UsageError
from xecomla.convert import llama2c, rope_dims
from xecomla.convert.hf_config import read_llama_config
from xecomla.models.config import LlamaConfig, MLAConfig

# The published config.json values of Meta's Hugging Face repositories (meta-llama/<name>, the
# files as released: Llama 3.2 in Sept. 2024, Llama 3.1 in July 2024), in their own field names.
# The -Instruct repositories have the same shapes; only eos_token_id lists the extra end-of-turn
# ids. Written out here so that a plan needs no download; parsed by read_llama_config.
_LLAMA3_ROPE = {'rope_type': 'llama3', 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                'original_max_position_embeddings': 8192}
_COMMON = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': 128256,
           'hidden_act': 'silu', 'max_position_embeddings': 131072, 'rms_norm_eps': 1e-05,
           'rope_theta': 500000.0, 'attention_bias': False, 'mlp_bias': False,
           'bos_token_id': 128000, 'eos_token_id': 128001, 'torch_dtype': 'bfloat16'}
NAMED_CONFIGS = {
    'Llama-3.2-1B': {**_COMMON, 'hidden_size': 2048, 'intermediate_size': 8192,
                     'num_hidden_layers': 16, 'num_attention_heads': 32, 'num_key_value_heads': 8,
                     'head_dim': 64, 'tie_word_embeddings': True,
                     'rope_scaling': {**_LLAMA3_ROPE, 'factor': 32.0}},
    'Llama-3.2-3B': {**_COMMON, 'hidden_size': 3072, 'intermediate_size': 8192,
                     'num_hidden_layers': 28, 'num_attention_heads': 24, 'num_key_value_heads': 8,
                     'head_dim': 128, 'tie_word_embeddings': True,
                     'rope_scaling': {**_LLAMA3_ROPE, 'factor': 32.0}},
    'Llama-3.1-8B': {**_COMMON, 'hidden_size': 4096, 'intermediate_size': 14336,
                     'num_hidden_layers': 32, 'num_attention_heads': 32, 'num_key_value_heads': 8,
                     'tie_word_embeddings': False,
                     'rope_scaling': {**_LLAMA3_ROPE, 'factor': 8.0}},
}
_INSTRUCT_EOS = [128001, 128008, 128009]


def named_shape(path: str) -> tuple[str, dict] | None:
  """(name, config.json dict) of the named shape a model path is called after, or None:
  `.../Llama-3.2-1B`, `Llama-3.2-1B-Instruct`, `Meta-Llama-3.1-8B-Instruct` (any case)."""
  base = os.path.basename(os.path.normpath(path)).lower()  # a string op: a URI's last part too
  for name, values in NAMED_CONFIGS.items():
    m = re.fullmatch(r'(meta-)?' + re.escape(name.lower()) + r'(-instruct)?', base)
    if m:
      values = dict(values)
      if m.group(2):
        values['eos_token_id'] = list(_INSTRUCT_EOS)
      return name + (m.group(2) and '-Instruct' or ''), values
  return None


def parse_config_json(values: dict) -> LlamaConfig:
  """A config.json dict -> LlamaConfig through the conversion's reader (which reads files)."""
  with tempfile.TemporaryDirectory() as d:
    fileio.write_text(os.path.join(d, 'config.json'), json.dumps(values))
    return read_llama_config(d)


def model_llama(path: str, field: str) -> tuple[LlamaConfig, str]:
  """(LlamaConfig, where it came from) of the model at `path` (config field `field`)."""
  if not path:
    raise UsageError(f'{field} is empty: set --config.{field} to a Hugging Face Llama directory, '
                     f'a llama2.c .bin, or a path named after one of {", ".join(NAMED_CONFIGS)}.')
  if epath.Path(path).is_dir() and epath.Path(path, 'config.json').exists():
    return read_llama_config(path), f'{path}/config.json'
  hub_id = hub.parse(path)
  if hub_id:  # a plan downloads nothing: the cached config.json, else the shape its name gives
    snap = hub.cached(path)
    if snap:
      return read_llama_config(snap), f'{path} (Hugging Face cache) {snap}/config.json'
    named = named_shape(hub_id[0])
    if not named:
      raise UsageError(f'{field}={path} is not in the Hugging Face cache {hub.cache_dir()} and '
                       f'its name matches no known shape ({", ".join(NAMED_CONFIGS)}, optionally '
                       f'-Instruct): run `hf download {hub_id[0]} config.json` to plan with its '
                       'config.json, or give a local Hugging Face Llama directory.')
    return parse_config_json(named[1]), f'named shape {named[0]} (published config.json)'
  if path.endswith('.bin') and epath.Path(path).is_file():
    return llama2c.read_config(path), f'{path} (llama2.c header)'
  named = named_shape(path)
  if named:
    return parse_config_json(named[1]), f'named shape {named[0]} (published config.json)'
  raise UsageError(f'{field}={path} has no config.json and its name matches no known shape '
                   f'({", ".join(NAMED_CONFIGS)}, optionally -Instruct): point it to a Hugging '
                   'Face Llama directory or name it after one of them.')


def is_dynamic(config) -> bool:
  m = config.mla
  return m.kv_energy is not None or m.q_energy is not None or m.kv_budget is not None


def student_config(config, llama: LlamaConfig) -> MLAConfig:
  """The MLAConfig that init builds from `llama` at the fixed ranks (upcycle.upcycle's
  construction): r_kv and r_q per layer, d_qk = head_dim - d_r, d_v = head_dim, rope_pairs from
  mla.rope_dims (None for 'paper'; 'norm' picks pairs from the weights, so the planner uses
  the first d_r/2 pairs: the same shapes). The mla settings are checked as init checks them."""
  from xecomla.stages import init
  checked = copy.deepcopy(config)
  with checked.unlocked():
    checked.mla.init = 'svd'  # activation-aware init needs calibration text, not other shapes
  init.check_mla(checked, llama)
  m, d_h, n = config.mla, llama.head_dim, llama.n_layers
  choice = 'high_freq' if m.rope_dims == 'norm' else m.rope_dims
  pairs, _, _ = rope_dims.choose(choice, d_h, m.d_r)
  return MLAConfig(llama=llama, r_kv=(m.r_kv,) * n, r_q=(m.r_q or None,) * n, d_r=m.d_r,
                   d_qk=d_h - m.d_r, d_v=d_h, rope_pairs=(pairs,) * n,
                   latent_norm=m.latent_norm)


def models(config) -> dict:
  """{'source', 'teacher' (the KD teacher), 'student'}: LlamaConfigs / MLAConfig, plus where each
  came from and notes (dynamic ranks planned at the fixed ones)."""
  source, source_from = model_llama(config.teacher.path, 'teacher.path')
  teacher, teacher_from = source, source_from
  if config.distill.teacher_path:
    teacher, teacher_from = model_llama(config.distill.teacher_path, 'distill.teacher_path')
  if teacher.vocab_size != source.vocab_size:
    raise UsageError(f'the distillation teacher has a vocabulary of {teacher.vocab_size} tokens, '
                     f'the student {source.vocab_size}: choose a teacher of the same family.')
  if config.distill.hidden_weight > 0 and (teacher.n_layers, teacher.dim) != (source.n_layers,
                                                                               source.dim):
    raise UsageError('distill.hidden_weight > 0 needs a teacher of the student\'s depth and width: '
                     'set it to 0 for this teacher.')
  notes = []
  if is_dynamic(config):
    notes.append(f'dynamic ranks (kv_energy / q_energy / kv_budget) need the weights: planned at '
                 f'the fixed ranks r_kv={config.mla.r_kv}, r_q={config.mla.r_q or None}')
  if config.mla.rope_dims == 'norm':
    notes.append("rope_dims='norm' chooses pairs from the weights: planned with the same shapes")
  return {'source': source, 'teacher': teacher, 'student': student_config(config, source),
          'from': {'student': source_from, 'teacher': teacher_from}, 'notes': notes}


def n_params(abstract) -> int:
  return int(sum(x.size for x in jax.tree.leaves(abstract)))
