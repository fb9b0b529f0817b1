"""Reading and writing safetensors checkpoints (single file or sharded with an index) as numpy.

safetensors' numpy API reads every dtype numpy has; bfloat16, which numpy lacks, is read from the
file's header offsets as `ml_dtypes.bfloat16` and widened to float32.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'


class CheckpointError(ValueError):
  """A checkpoint directory or file is missing, malformed or does not fit the model."""


def weight_files(directory: str) -> dict[str, str]:
  """Maps each tensor name to the safetensors file holding it."""
  single, index = os.path.join(directory, SINGLE), os.path.join(directory, INDEX)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict):
      raise CheckpointError(f'{index} has no "weight_map": re-save the checkpoint with save_pretrained.')
    files = {name: os.path.join(directory, fname) for name, fname in weight_map.items()}
    for path in sorted(set(files.values())):
      if not os.path.exists(path):
        raise CheckpointError(f'shard {path} listed in {INDEX} is missing: download all shards.')
    return files
  if os.path.exists(single):
    with safe_open(single, framework='np') as f:
      return {name: single for name in f.keys()}
  raise CheckpointError(
      f'no {SINGLE} or {INDEX} in {directory}: point to a Hugging Face directory saved with '
      'safetensors (save_pretrained(..., safe_serialization=True)).')


def _read_bf16(path: str, name: str) -> np.ndarray:
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    info = json.loads(f.read(n))[name]
    start, end = info['data_offsets']
    f.seek(8 + n + start)
    raw = f.read(end - start)
  return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(info['shape']).astype(np.float32)


def read_tensors(directory: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """Loads tensors (all, or `names`) of a safetensors checkpoint directory as numpy arrays."""
  files = weight_files(directory)
  wanted = list(files) if names is None else list(names)
  missing = [n for n in wanted if n not in files]
  if missing:
    raise CheckpointError(f'tensor {missing[0]!r} is missing from the checkpoint in {directory} '
                          f'({len(missing)} missing in all): is it a complete model of this type?')
  out: dict[str, np.ndarray] = {}
  by_file: dict[str, list[str]] = {}
  for n in wanted:
    by_file.setdefault(files[n], []).append(n)
  for path, tensor_names in by_file.items():
    with safe_open(path, framework='np') as f:
      for n in tensor_names:
        try:
          out[n] = f.get_tensor(n)
        except TypeError:  # bfloat16: numpy has no such dtype
          out[n] = _read_bf16(path, n)
  return out


def write_tensors(directory: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  """Writes one model.safetensors (contiguous arrays, metadata format=pt as transformers expects)."""
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  save_file(arrays, os.path.join(directory, SINGLE), metadata={'format': 'pt', **(metadata or {})})
