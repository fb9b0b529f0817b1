"""Bad Hugging Face directories fail with a message that names the problem."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from xecomla.convert import hf
from xecomla.convert.safetensors_io import CheckpointError


def test_missing_directory(tmp_path):
  with pytest.raises(CheckpointError, match='does not exist'):
    hf.load_llama(str(tmp_path / 'nope'))


def test_missing_config(tmp_path):
  os.makedirs(tmp_path / 'm')
  with pytest.raises(CheckpointError, match='config.json is missing'):
    hf.load_llama(str(tmp_path / 'm'))


def test_missing_weights(hf_llama):
  directory, _ = hf_llama()
  os.remove(os.path.join(directory, 'model.safetensors'))
  with pytest.raises(CheckpointError, match='no model.safetensors'):
    hf.load_llama(directory)


def test_unsupported_model_type(hf_llama):
  directory, _ = hf_llama()
  path = os.path.join(directory, 'config.json')
  cfg = json.load(open(path))
  cfg['model_type'] = 'gpt2'
  json.dump(cfg, open(path, 'w'))
  with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
    hf.load_llama(directory)


def _edit_tensors(directory, fn):
  path = os.path.join(directory, 'model.safetensors')
  tensors = load_file(path)
  fn(tensors)
  save_file(tensors, path, metadata={'format': 'pt'})


def test_missing_tensor(hf_llama):
  directory, _ = hf_llama()
  _edit_tensors(directory, lambda t: t.pop('model.layers.1.mlp.up_proj.weight'))
  with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
    hf.load_llama(directory)


def test_misshaped_tensor(hf_llama):
  directory, _ = hf_llama()

  def cut(t):
    t['model.layers.0.self_attn.k_proj.weight'] = np.zeros((3, 32), np.float32)

  _edit_tensors(directory, cut)
  with pytest.raises(CheckpointError, match=r"k_proj.weight' has shape \(3, 32\)"):
    hf.load_llama(directory)


def test_missing_shard(hf_llama):
  directory, _ = hf_llama(shard_size='20KB')
  index = json.load(open(os.path.join(directory, 'model.safetensors.index.json')))
  os.remove(os.path.join(directory, sorted(set(index['weight_map'].values()))[-1]))
  with pytest.raises(CheckpointError, match='listed in model.safetensors.index.json is missing'):
    hf.load_llama(directory)


def test_legacy_rope_fields_are_read(hf_llama):
  """Older (transformers 4) config.json files keep rope_theta / rope_scaling at the top level."""
  directory, _ = hf_llama()
  path = os.path.join(directory, 'config.json')
  cfg = json.load(open(path))
  cfg.pop('rope_parameters')
  cfg['rope_theta'] = 500000.0
  cfg['rope_scaling'] = {'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0,
                         'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}
  json.dump(cfg, open(path, 'w'))
  config = hf.read_llama_config(directory)
  assert config.rope_theta == 500000.0 and config.rope_scaling_dict['factor'] == 32.0
