"""Reading and writing safetensors checkpoints (single file or sharded with an index) as numpy,
from a local directory or a gs:// one.

Local files are read with safetensors' numpy API (memory-mapped; bfloat16 as
`ml_dtypes.bfloat16`). A file safetensors cannot open (a gs:// object) is read from its header's
byte ranges through epath instead, into the same dtypes, bit for bit.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import IO, Iterable

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import safe_open
from safetensors.numpy import save_file

from xecomla import fileio

SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'


class CheckpointError(ValueError):
  """A checkpoint directory or file is missing, malformed or does not fit the model."""


ITEMSIZE = {'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1,
            'U64': 8, 'U32': 4, 'U16': 2, 'U8': 1, 'BOOL': 1, 'F8_E4M3': 1, 'F8_E5M2': 1}
FIX = 're-download or re-save the checkpoint'
NP_DTYPES = {'F64': '<f8', 'F32': '<f4', 'F16': '<f2', 'BF16': ml_dtypes.bfloat16, 'I64': '<i8',
             'I32': '<i4', 'I16': '<i2', 'I8': '|i1', 'U64': '<u8', 'U32': '<u4', 'U16': '<u2',
             'U8': '|u1', 'BOOL': '|b1'}


def read_header(path: str) -> dict[str, dict]:
  """The tensors of one safetensors file (name -> {dtype, shape, data_offsets}) from its header
  alone, checked against the file's size, so a truncated or malformed file is refused before any
  data is read."""
  with epath.Path(path).open('rb') as f:
    return _header(f, path)[0]


def _header(f: IO[bytes], path: str) -> tuple[dict[str, dict], int]:
  """The checked header of the open file `f` and the offset its tensor data starts at."""
  f.seek(0, 2)
  size = f.tell()
  f.seek(0)
  if size < 8:
    raise CheckpointError(f'{path} is truncated ({size} bytes, no safetensors header): {FIX}.')
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
  return header, 8 + n


def read_headers(directory: str) -> dict[str, tuple[str, tuple[int, ...], str]]:
  """name -> (file, shape, dtype) of every tensor of a checkpoint directory, from the headers."""
  files = weight_files(directory)
  out = {}
  for path in sorted(set(files.values())):
    for name, t in read_header(path).items():
      out[name] = (path, tuple(t['shape']), t['dtype'])
  for name, path in files.items():
    if name not in out or out[name][0] != path:
      raise CheckpointError(f'{_join(directory, INDEX)} places tensor {name!r} in '
                            f'{epath.Path(path).name}, which does not hold it: {FIX}.')
  return out


def _join(directory: str, name: str) -> str:
  return os.fspath(epath.Path(directory) / name)


def weight_files(directory: str) -> dict[str, str]:
  """Maps each tensor name to the safetensors file holding it."""
  single, index = _join(directory, SINGLE), _join(directory, INDEX)
  if epath.Path(index).exists():
    try:
      weight_map = fileio.read_json(index).get('weight_map')
    except (ValueError, AttributeError) as e:
      raise CheckpointError(f'{index} is not a valid index ({e}): {FIX}.') from e
    if not isinstance(weight_map, dict):
      raise CheckpointError(f'{index} has no "weight_map": re-save the checkpoint with save_pretrained.')
    files = {name: _join(directory, fname) for name, fname in weight_map.items()}
    for path in sorted(set(files.values())):
      if not epath.Path(path).exists():
        raise CheckpointError(f'shard {path} listed in {INDEX} is missing: download all shards.')
      if not epath.Path(path).is_file():
        raise CheckpointError(f'shard {path} listed in {INDEX} is not a file: {FIX}.')
    return files
  if epath.Path(single).exists():
    return {name: single for name in read_header(single)}
  raise CheckpointError(
      f'no {SINGLE} or {INDEX} in {directory}: point to a Hugging Face directory saved with '
      'safetensors (save_pretrained(..., safe_serialization=True)).')


def read_ranges(path: str, names: Iterable[str]) -> dict[str, np.ndarray]:
  """Tensors of one file read from its header's byte ranges (one seek and read each), through
  epath, so any backend serves them; the arrays safetensors' numpy API returns."""
  out = {}
  with epath.Path(path).open('rb') as f:
    header, data = _header(f, path)
    for name in names:
      info = header[name]
      if info['dtype'] not in NP_DTYPES:
        raise CheckpointError(f'{path}: tensor {name!r} has dtype {info["dtype"]}, which numpy '
                              'cannot read: save the checkpoint in float32 or bfloat16.')
      start, stop = (int(x) for x in info['data_offsets'])
      f.seek(data + start)
      a = np.frombuffer(f.read(stop - start), dtype=NP_DTYPES[info['dtype']])
      a = a.reshape(info['shape'])
      out[name] = a.copy()  # writable, as safe_open's arrays are
  return out


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
    if not fileio.is_local(path):  # safe_open needs a local file
      out.update(read_ranges(path, tensor_names))
      continue
    read_header(path)  # a truncated shard is refused by name, not by a safetensors panic
    with safe_open(path, framework='np') as f:
      out.update((n, f.get_tensor(n)) for n in tensor_names)
  return out


def write_tensors(directory: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  """Writes one model.safetensors (contiguous arrays, metadata format=pt as transformers expects);
  into a gs:// directory through a local temporary file, as safetensors writes local files only."""
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  metadata = {'format': 'pt', **(metadata or {})}
  target = _join(directory, SINGLE)
  if fileio.is_local(target):
    save_file(arrays, target, metadata=metadata)
    return
  with tempfile.TemporaryDirectory() as tmp:
    save_file(arrays, os.path.join(tmp, SINGLE), metadata=metadata)
    epath.Path(tmp, SINGLE).copy(target, overwrite=True)
