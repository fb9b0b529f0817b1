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


ITEMSIZE = {'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1,
            'U64': 8, 'U32': 4, 'U16': 2, 'U8': 1, 'BOOL': 1, 'F8_E4M3': 1, 'F8_E5M2': 1}
FIX = 're-download or re-save the checkpoint'


def read_header(path: str) -> dict[str, dict]:
  """The tensors of one safetensors file (name -> {dtype, shape, data_offsets}) from its header
  alone, checked against the file's size, so a truncated or malformed file is refused before any
  data is read."""
  size = os.path.getsize(path)
  if size < 8:
    raise CheckpointError(f'{path} is truncated ({size} bytes, no safetensors header): {FIX}.')
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    if 8 + n > size:
      raise CheckpointError(f'{path} is truncated: its header needs {n} bytes but the file has '
                            f'{size} bytes in all: {FIX}.')
    raw = f.read(n)
  try:
    header = json.loads(raw)
    header.pop('__metadata__', None)
    end = 0
    for name, t in header.items():
      start, stop = (int(x) for x in t['data_offsets'])
      count = int(np.prod(t['shape'], dtype=np.int64))
      item = ITEMSIZE.get(t['dtype'])
      if stop < start or (item is not None and stop - start != count * item):
        raise CheckpointError(f'{path}: tensor {name!r} has {stop - start} bytes of data for shape '
                              f'{tuple(t["shape"])} {t["dtype"]}: {FIX}.')
      end = max(end, stop)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f'{path} has a malformed safetensors header ({type(e).__name__}: {e}): '
                          f'{FIX}.') from e
  if 8 + n + end > size:
    raise CheckpointError(f'{path} is truncated: its tensor data ends at byte {8 + n + end} but '
                          f'the file has {size} bytes: {FIX}.')
  return header


def read_headers(directory: str) -> dict[str, tuple[str, tuple[int, ...], str]]:
  """name -> (file, shape, dtype) of every tensor of a checkpoint directory, from the headers."""
  files = weight_files(directory)
  out = {}
  for path in sorted(set(files.values())):
    for name, t in read_header(path).items():
      out[name] = (path, tuple(t['shape']), t['dtype'])
  for name, path in files.items():
    if name not in out or out[name][0] != path:
      raise CheckpointError(f'{os.path.join(directory, INDEX)} places tensor {name!r} in '
                            f'{os.path.basename(path)}, which does not hold it: {FIX}.')
  return out


def weight_files(directory: str) -> dict[str, str]:
  """Maps each tensor name to the safetensors file holding it."""
  single, index = os.path.join(directory, SINGLE), os.path.join(directory, INDEX)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f).get('weight_map')
    except (ValueError, AttributeError) as e:
      raise CheckpointError(f'{index} is not a valid index ({e}): {FIX}.') from e
    if not isinstance(weight_map, dict):
      raise CheckpointError(f'{index} has no "weight_map": re-save the checkpoint with save_pretrained.')
    files = {name: os.path.join(directory, fname) for name, fname in weight_map.items()}
    for path in sorted(set(files.values())):
      if not os.path.exists(path):
        raise CheckpointError(f'shard {path} listed in {INDEX} is missing: download all shards.')
      if not os.path.isfile(path):
        raise CheckpointError(f'shard {path} listed in {INDEX} is not a file: {FIX}.')
    return files
  if os.path.exists(single):
    return {name: single for name in read_header(single)}
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
    read_header(path)  # a truncated shard is refused by name, not by a safetensors panic
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
