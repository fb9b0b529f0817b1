"""Export of an MLA student to Hugging Face format, and its import back.

`export_hf` writes a directory that transformers loads with trust_remote_code=True
(config.json with auto_map, model.safetensors, the tokenizer, configuration_xecomla.py and
modeling_xecomla.py, whose cache holds only the latent and the shared RoPE key). With
`deepseek=True` and a DeepSeek-compatible student (latent norm on, one r_kv and one r_q for all
layers, fresh RoPE over d_r) it writes a native `deepseek_v3` directory instead, which stock
transformers loads without remote code, its RoPE columns in DeepSeek's own interleaved order
(`rope_interleave: true`, as DeepSeek-V3's checkpoints and the engines serving them have it).
`import_hf` reads either back, bit-exactly.
"""

from __future__ import annotations

import json
import os

from etils import epath

from xecomla import fileio
from xecomla.convert import hf
from xecomla.convert.hf_config import eos_json
from xecomla.convert.safetensors_io import CheckpointError, read_tensors, write_tensors
from xecomla.export.names import interleaved_rope, mla_rows
from xecomla.models.config import MLAConfig

REMOTE = epath.Path(__file__).parent / 'remote'
REMOTE_FILES = ('configuration_xecomla.py', 'modeling_xecomla.py')
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'tokenizer.model', 'chat_template.jinja')


def deepseek_incompatibility(c: MLAConfig) -> str | None:
  """Why stock DeepseekV3 cannot compute this student, or None if it can."""
  if not c.latent_norm:
    return 'DeepseekV3 always normalises the latents (train with mla.latent_norm=True)'
  if len(set(c.r_kv)) > 1 or len(set(c.r_q)) > 1:
    return 'DeepseekV3 has one r_kv and one r_q for all layers (per-layer ranks here)'
  if any(p is not None for p in c.rope_pairs):
    return 'DeepseekV3 applies a fresh RoPE over d_r (use mla.rope_dims=paper)'
  if c.llama.rope_scaling is not None and c.llama.rope_scaling_dict.get('rope_type') != 'llama3':
    return 'unsupported RoPE scaling'
  return None


def remote_config(c: MLAConfig) -> dict:
  llama = c.llama
  return {
      'architectures': ['XEcoMLAForCausalLM'], 'model_type': 'xecomla',
      'auto_map': {'AutoConfig': 'configuration_xecomla.XEcoMLAConfig',
                   'AutoModelForCausalLM': 'modeling_xecomla.XEcoMLAForCausalLM'},
      'xecomla': c.to_dict(), 'vocab_size': llama.vocab_size, 'hidden_size': llama.dim,
      'num_hidden_layers': llama.n_layers, 'num_attention_heads': llama.n_heads,
      'max_position_embeddings': llama.max_seq_len, 'tie_word_embeddings': llama.tie_embeddings,
      'bos_token_id': llama.bos_id, 'eos_token_id': eos_json(llama), 'dtype': 'float32',
  }


def deepseek_config(c: MLAConfig) -> dict:
  llama = c.llama
  rope = {'rope_type': 'default', 'rope_theta': llama.rope_theta}
  if llama.rope_scaling is not None:
    rope.update(llama.rope_scaling_dict)
  return {
      'architectures': ['DeepseekV3ForCausalLM'], 'model_type': 'deepseek_v3',
      'vocab_size': llama.vocab_size, 'hidden_size': llama.dim, 'intermediate_size': llama.hidden_dim,
      'moe_intermediate_size': llama.hidden_dim, 'num_hidden_layers': llama.n_layers,
      'num_attention_heads': llama.n_heads, 'num_key_value_heads': llama.n_heads,
      'n_shared_experts': 1, 'n_routed_experts': 1, 'num_experts_per_tok': 1, 'n_group': 1,
      'topk_group': 1, 'first_k_dense_replace': llama.n_layers,
      'kv_lora_rank': c.r_kv[0], 'q_lora_rank': c.r_q[0], 'qk_rope_head_dim': c.d_r,
      'qk_nope_head_dim': c.d_qk, 'v_head_dim': c.d_v, 'rope_interleave': True,
      'rope_parameters': rope, 'rms_norm_eps': llama.norm_eps,
      'max_position_embeddings': llama.max_seq_len, 'tie_word_embeddings': llama.tie_embeddings,
      'bos_token_id': llama.bos_id, 'eos_token_id': eos_json(llama), 'hidden_act': 'silu',
      'attention_bias': False, 'dtype': 'float32', 'use_cache': True,
      'xecomla': c.to_dict(),
  }


def generation_config(c: MLAConfig, tokenizer_dir: str | None) -> dict:
  """generation_config.json: the teacher's (sampling defaults kept) with every EOS id."""
  path = epath.Path(tokenizer_dir or '.') / 'generation_config.json'
  out = dict(fileio.read_json(path)) if tokenizer_dir and path.exists() else {}
  out.update(bos_token_id=c.llama.bos_id, eos_token_id=eos_json(c.llama))
  return out


def export_hf(out: str, config: MLAConfig, params: dict, tokenizer_dir: str | None = None, *,
              deepseek: bool = False, extra_json: dict[str, dict] | None = None) -> str:
  """Writes the export into `out` (which must not exist or be empty); built in a temporary
  sibling and renamed, so a failure leaves nothing half-written."""
  if fileio.is_nonempty_dir(out):
    raise CheckpointError(f'export directory {out} exists and is not empty: choose a new one.')
  if deepseek:
    why = deepseek_incompatibility(config)
    if why:
      raise CheckpointError(f'this student cannot be a native deepseek_v3 export: {why}.')
  tmp = epath.Path(os.fspath(out).rstrip('/') + '.tmp')
  tmp.rmtree(missing_ok=True)
  tmp.mkdir(parents=True, exist_ok=True)
  if deepseek:  # DeepSeek's own layout, which engines serving DeepSeek-V3 expect (names.py)
    params = interleaved_rope(params, config)
  write_tensors(os.fspath(tmp), hf.to_tensors(mla_rows(config), params))
  fileio.write_text(tmp / 'config.json', json.dumps(
      deepseek_config(config) if deepseek else remote_config(config), indent=2))
  if not deepseek:
    for name in REMOTE_FILES:
      (REMOTE / name).copy(tmp / name, overwrite=True)
  extra_json = {'generation_config.json': generation_config(config, tokenizer_dir),
                **(extra_json or {})}
  for name, obj in extra_json.items():
    fileio.write_text(tmp / name, json.dumps(obj, indent=2))
  if tokenizer_dir:
    for name in TOKENIZER_FILES:
      if (epath.Path(tokenizer_dir) / name).exists():
        (epath.Path(tokenizer_dir) / name).copy(tmp / name, overwrite=True)
  fileio.commit_dir(tmp, out)
  return out


def import_hf(directory: str) -> tuple[MLAConfig, dict]:
  """An xecomla export (remote-code or native deepseek_v3) -> (MLAConfig, float32 params)."""
  path = os.fspath(epath.Path(directory) / 'config.json')
  if not epath.Path(path).exists():
    raise CheckpointError(f'{path} is missing: not an exported model directory.')
  cfg = fileio.read_json(path)
  if 'xecomla' not in cfg:
    raise CheckpointError(f'{path} was not written by xecomla (no "xecomla" architecture entry).')
  config = MLAConfig.from_dict(cfg['xecomla'])
  rows = mla_rows(config)
  params = hf.to_params(rows, read_tensors(directory, [r[0] for r in rows]))
  if cfg.get('model_type') == 'deepseek_v3' and cfg.get('rope_interleave', True):
    params = interleaved_rope(params, config, inverse=True)
  return config, params

