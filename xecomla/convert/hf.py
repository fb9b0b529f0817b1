"""Hugging Face Llama directory <-> xecomla parameter tree, without torch.

The name map is one table of (Hugging Face name, our path, layout); both directions derive from it,
so import and export cannot drift apart. Layouts: Hugging Face Linear weights are [out, in]; ours
are [in, ...out] with heads split out, e.g. q_proj [n_h*d_h, D] <-> attn.q [D, n_h, d_h].
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np
from etils import epath

from xecomla import fileio
from xecomla.convert.hf_config import llama_config_json, read_llama_config, refuse
from xecomla.convert.safetensors_io import (CheckpointError, read_headers, read_tensors,
                                            write_tensors)
from xecomla.models.config import LlamaConfig

Params = dict[str, Any]


def check_llama_dir(directory: str) -> LlamaConfig:
  """config.json and the safetensors headers of a Llama directory, checked without reading any
  weights: supported features, every shard present and complete, every tensor of the right shape."""
  config = read_llama_config(directory)
  headers = read_headers(directory)
  path = os.fspath(epath.Path(directory) / 'config.json')
  for name in headers:
    if '.self_attn.' in name and ('q_norm' in name or 'k_norm' in name):
      refuse(path, f'QK-norm (tensor {name})')
    if '.self_attn.' in name and name.endswith('.bias'):
      refuse(path, f'attention bias (tensor {name})')
  shapes = expected_hf_shapes(config)
  for hf_name, _, _, _ in name_map(config):
    if hf_name not in headers:
      raise CheckpointError(f'tensor {hf_name!r} is missing from the checkpoint in {directory}: '
                            'the checkpoint does not match its config.json (layers, tied '
                            'embeddings); re-download or re-save it.')
    if headers[hf_name][1] != shapes[hf_name]:
      raise CheckpointError(f'tensor {hf_name!r} has shape {headers[hf_name][1]}, config.json '
                            f'implies {shapes[hf_name]}: the weights and config.json disagree; '
                            're-download or re-save the checkpoint.')
  return config


# ----------------------------------------------------------------------------------------------
# The name map
# ----------------------------------------------------------------------------------------------
# A row is (Hugging Face name, our paths, to_ours, to_hf): to_ours maps the HF tensor to one array
# per path, to_hf maps those arrays back. Most rows are one-to-one; MLA export rows join several
# of our arrays into one Hugging Face tensor (e.g. kv_b_proj = [W^UK, W^UV] per head).

Row = tuple[str, tuple[tuple, ...], Callable, Callable]


def one(hf_name: str, path: tuple, to_ours: Callable = lambda w: w,
        to_hf: Callable = lambda p: p) -> Row:
  return (hf_name, (path,), lambda w: (to_ours(w),), lambda ps: to_hf(ps[0]))


def linear(*out_shape: int) -> tuple[Callable, Callable]:
  """[out, in] <-> [in, *out_shape]."""
  return (lambda w: w.T.reshape(w.shape[1], *out_shape),
          lambda p: p.reshape(p.shape[0], -1).T)


def out_linear(*in_shape: int) -> tuple[Callable, Callable]:
  """[out, in] <-> [*in_shape, out] (attention output projection)."""
  return (lambda w: w.T.reshape(*in_shape, w.shape[0]),
          lambda p: p.reshape(-1, p.shape[-1]).T)


def shared_rows(c: LlamaConfig) -> list[Row]:
  """Everything but attention: embeddings, norms, MLP, output layer, and W^O."""
  rows = [one('model.embed_tokens.weight', ('embed', 'embedding')),
          one('model.norm.weight', ('final_norm', 'scale'))]
  if not c.tie_embeddings:
    rows.append(one('lm_head.weight', ('lm_head',), *linear(c.vocab_size)))
  for l in range(c.n_layers):
    hf, ours = f'model.layers.{l}.', ('layers', l)
    rows += [
        one(hf + 'input_layernorm.weight', ours + ('attn_norm', 'scale')),
        one(hf + 'post_attention_layernorm.weight', ours + ('mlp_norm', 'scale')),
        one(hf + 'self_attn.o_proj.weight', ours + ('attn', 'o'), *out_linear(c.n_heads, c.head_dim)),
        one(hf + 'mlp.gate_proj.weight', ours + ('mlp', 'gate'), *linear(c.hidden_dim)),
        one(hf + 'mlp.up_proj.weight', ours + ('mlp', 'up'), *linear(c.hidden_dim)),
        one(hf + 'mlp.down_proj.weight', ours + ('mlp', 'down'), *linear(c.dim)),
    ]
  return rows


def name_map(c: LlamaConfig) -> list[Row]:
  """Every tensor of a Hugging Face Llama."""
  rows = shared_rows(c)
  for l in range(c.n_layers):
    hf, ours = f'model.layers.{l}.self_attn.', ('layers', l, 'attn')
    rows += [one(hf + 'q_proj.weight', ours + ('q',), *linear(c.n_heads, c.head_dim)),
             one(hf + 'k_proj.weight', ours + ('k',), *linear(c.n_kv_heads, c.head_dim)),
             one(hf + 'v_proj.weight', ours + ('v',), *linear(c.n_kv_heads, c.head_dim))]
  return rows


def set_path(tree: Params, path: tuple, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_path(tree: Params, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def to_params(rows: list[Row], tensors: dict[str, np.ndarray],
              shapes: dict[str, tuple[int, ...]] | None = None) -> Params:
  """Hugging Face tensors -> our float32 parameter tree (nested dicts, layers keyed by int)."""
  params: Params = {}
  for hf_name, paths, to_ours, _ in rows:
    if hf_name not in tensors:
      raise CheckpointError(f'tensor {hf_name!r} is missing: the checkpoint does not match its '
                            'config.json (layers, tied embeddings).')
    w = np.asarray(tensors[hf_name])
    if shapes is not None and tuple(w.shape) != shapes[hf_name]:
      raise CheckpointError(f'tensor {hf_name!r} has shape {tuple(w.shape)}, config.json implies '
                            f'{shapes[hf_name]}: the weights and config.json disagree.')
    for path, value in zip(paths, to_ours(w.astype(np.float32))):
      set_path(params, path, np.ascontiguousarray(value))
  return params


def to_tensors(rows: list[Row], params: Params) -> dict[str, np.ndarray]:
  return {hf_name: np.ascontiguousarray(to_hf([np.asarray(get_path(params, p)) for p in paths]),
                                        dtype=np.float32)
          for hf_name, paths, _, to_hf in rows}


def expected_hf_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
  d, f, v = c.dim, c.hidden_dim, c.vocab_size
  qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  shapes = {'model.embed_tokens.weight': (v, d), 'model.norm.weight': (d,), 'lm_head.weight': (v, d)}
  for l in range(c.n_layers):
    p = f'model.layers.{l}.'
    shapes.update({
        p + 'input_layernorm.weight': (d,), p + 'post_attention_layernorm.weight': (d,),
        p + 'self_attn.q_proj.weight': (qd, d), p + 'self_attn.k_proj.weight': (kvd, d),
        p + 'self_attn.v_proj.weight': (kvd, d), p + 'self_attn.o_proj.weight': (d, qd),
        p + 'mlp.gate_proj.weight': (f, d), p + 'mlp.up_proj.weight': (f, d),
        p + 'mlp.down_proj.weight': (d, f)})
  return shapes


def hf_to_params(c: LlamaConfig, tensors: dict[str, np.ndarray]) -> Params:
  return to_params(name_map(c), tensors, expected_hf_shapes(c))


def params_to_hf(c: LlamaConfig, params: Params) -> dict[str, np.ndarray]:
  return to_tensors(name_map(c), params)


def load_llama(directory: str) -> tuple[LlamaConfig, Params]:
  """Reads a Hugging Face Llama directory: its config and float32 parameters."""
  config = check_llama_dir(directory)
  names = [row[0] for row in name_map(config)]
  return config, hf_to_params(config, read_tensors(directory, names))


def save_llama(directory: str, config: LlamaConfig, params: Params) -> None:
  """Writes config.json and model.safetensors (float32) of a standard Hugging Face Llama."""
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  fileio.write_text(epath.Path(directory) / 'config.json',
                    json.dumps(llama_config_json(config), indent=2))
  write_tensors(directory, params_to_hf(config, params))
