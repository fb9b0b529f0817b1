"""A Hugging Face Llama config.json <-> LlamaConfig, refusing what the conversion cannot carry
over (other architectures, attention bias, QK-norm, sliding windows, RoPE types other than
default and llama3), each by name."""

from __future__ import annotations

from typing import Any

from etils import epath

from xecomla import fileio
from xecomla.convert.safetensors_io import CheckpointError
from xecomla.models.config import LlamaConfig

LLAMA_FIX = 'give a Hugging Face Llama (model_type llama) without it'
ROPE_TYPES = ('default', 'llama3')


def refuse(path: str, what: str) -> None:
  raise CheckpointError(f'{path}: {what} is not supported by the conversion: {LLAMA_FIX}.')


def unsupported_features(hf: dict[str, Any]) -> list[str]:
  """The features of a config.json that the Llama conversion cannot carry over, by name."""
  out = [f'{k}=true' for k in ('attention_bias', 'mlp_bias') if hf.get(k)]
  out += [f'QK-norm ({k}=true)' for k in ('qk_norm', 'use_qk_norm', 'qk_layernorm') if hf.get(k)]
  window = hf.get('sliding_window')
  if hf.get('use_sliding_window') or (window and hf.get('use_sliding_window') is not False):
    out.append(f'sliding-window attention (sliding_window={window})')
  layer_types = set(hf.get('layer_types') or ()) - {'full_attention'}
  if layer_types:
    out.append(f'layer_types {sorted(layer_types)}')
  if hf.get('hidden_act', 'silu') != 'silu':
    out.append(f"hidden_act {hf['hidden_act']!r} (silu only)")
  return out


def read_json_object(path, what: str) -> dict[str, Any]:
  """A JSON file of a model or tokenizer directory that must hold an object; CheckpointError
  ('re-save the <what>') when it is not valid JSON or not an object."""
  try:
    out = fileio.read_json(path)
  except (ValueError, OSError) as e:
    raise CheckpointError(f'{path} is not valid JSON ({e}): re-save the {what}.') from e
  if not isinstance(out, dict):
    raise CheckpointError(f'{path} is not a JSON object: re-save the {what}.')
  return out


def eos_token_ids(directory: str, hf: dict[str, Any]) -> tuple[int, ...]:
  """Every EOS id: generation_config.json's eos_token_id (an int or a list; what transformers'
  generate stops at), else config.json's."""
  path = epath.Path(directory) / 'generation_config.json'
  eos = hf.get('eos_token_id')
  if path.exists():
    try:
      gen = fileio.read_json(path)
    except (ValueError, OSError) as e:
      raise CheckpointError(f'{path} is not valid JSON ({e}): re-save the model.') from e
    if isinstance(gen, dict) and gen.get('eos_token_id') is not None:
      eos = gen['eos_token_id']
  ids = [eos] if isinstance(eos, int) else list(eos or [])
  if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
    raise CheckpointError(f'{directory}: eos_token_id {eos!r} is not an id or a list of ids: '
                          're-save the model.')
  return tuple(ids)


def eos_json(c: LlamaConfig) -> int | list[int] | None:
  """eos_token_id as config.json / generation_config.json write it: one id, or the list."""
  return list(c.eos_ids) if len(c.eos_ids) > 1 else c.eos_id


def read_llama_config(directory: str) -> LlamaConfig:
  """Parses a Hugging Face Llama config.json (transformers 5 `rope_parameters`, or the older
  `rope_theta` / `rope_scaling` fields); refuses what the conversion cannot carry over."""
  path = epath.Path(directory) / 'config.json'
  if not epath.Path(directory).is_dir():
    raise CheckpointError(f'teacher directory {directory} does not exist: set teacher.path to a '
                          'Hugging Face Llama directory (or a llama2.c .bin file).')
  if not path.exists():
    raise CheckpointError(f'{path} is missing: not a Hugging Face model directory.')
  hf = read_json_object(path, 'model')
  if hf.get('model_type') != 'llama':
    raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r} is not supported: "
                          "xecomla converts Llama checkpoints (model_type 'llama') only.")
  rope = dict(hf.get('rope_parameters') or {})
  legacy = hf.get('rope_scaling') or {}
  theta = rope.pop('rope_theta', hf.get('rope_theta', 10000.0))
  if legacy and not rope:
    rope = dict(legacy)
    rope.setdefault('rope_type', rope.pop('type', 'default'))
  rope_type = rope.get('rope_type', 'default')
  if rope_type not in ROPE_TYPES:
    raise CheckpointError(f'{path}: rope_type {rope_type!r} is not supported by the conversion '
                          f'(only {", ".join(ROPE_TYPES)}): {LLAMA_FIX}.')
  for what in unsupported_features(hf):
    refuse(path, what)
  try:
    scaling = None
    if rope_type == 'llama3':
      scaling = {'rope_type': 'llama3', **{k: rope[k] for k in (
          'factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')}}
    n_heads = hf['num_attention_heads']
    eos = hf.get('eos_token_id')
    eos_ids = eos_token_ids(directory, hf)
    return LlamaConfig(
        vocab_size=hf['vocab_size'], dim=hf['hidden_size'], n_layers=hf['num_hidden_layers'],
        n_heads=n_heads, n_kv_heads=hf.get('num_key_value_heads') or n_heads,
        head_dim=hf.get('head_dim') or hf['hidden_size'] // n_heads,
        hidden_dim=hf['intermediate_size'], norm_eps=hf.get('rms_norm_eps', 1e-6),
        rope_theta=float(theta), rope_scaling=scaling,
        max_seq_len=hf.get('max_position_embeddings', 2048),
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
        bos_id=hf.get('bos_token_id'), eos_id=(eos or [None])[0] if isinstance(eos, list) else eos,
        eos_ids=eos_ids)
  except KeyError as e:
    raise CheckpointError(f'{path} lacks the field {e.args[0]!r}: re-save the model.') from e


def llama_config_json(c: LlamaConfig, dtype: str = 'float32') -> dict[str, Any]:
  """A transformers-5 config.json for a Llama with these settings."""
  rope = {'rope_type': 'default', 'rope_theta': c.rope_theta}
  if c.rope_scaling:
    rope.update(c.rope_scaling_dict)
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': c.vocab_size, 'hidden_size': c.dim, 'intermediate_size': c.hidden_dim,
      'num_hidden_layers': c.n_layers, 'num_attention_heads': c.n_heads,
      'num_key_value_heads': c.n_kv_heads, 'head_dim': c.head_dim, 'hidden_act': 'silu',
      'max_position_embeddings': c.max_seq_len, 'rms_norm_eps': c.norm_eps,
      'rope_parameters': rope, 'tie_word_embeddings': c.tie_embeddings,
      'attention_bias': False, 'mlp_bias': False, 'attention_dropout': 0.0,
      'bos_token_id': c.bos_id, 'eos_token_id': eos_json(c), 'dtype': dtype, 'use_cache': True,
  }
