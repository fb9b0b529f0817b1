"""File IO for local paths and cloud URIs alike, through etils.epath; atomic writes, so that a
failed run never leaves a half-written file.

`epath.Path(p)` is a plain local file for a path and a cloud object for a `gs://bucket/...` URI
(also s3://, az://). For gs:// one backend is installed on the TPU VM: `gcsfs` (fsspec's GCS
filesystem: setup.cfg's `gcs` extra, which launch/tpu.py installs), which etils uses when
TensorFlow is absent; with TensorFlow installed etils uses `tf.io.gfile` instead (set
EPATH_USE_TF=0 to keep gcsfs). Callers use
`epath.Path` directly; the helpers here add what it lacks: UTF-8 and universal newlines on every
backend (epath's own text mode falls back to the locale's encoding on fsspec), and atomic writes.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from typing import IO, Any

from etils import epath

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
  """True for a local path, False for a URI (gs://, s3://, ...) that local-only libraries
  (safetensors' safe_open, tokenizers' from_file) cannot open."""
  return '://' not in os.fspath(path)


def read_text(path: PathLike) -> str:
  """The text of a file as `open(path, encoding='utf-8').read()` returns it (UTF-8, '\\r\\n' and
  '\\r' read as '\\n'), on every backend."""
  text = epath.Path(path).read_bytes().decode('utf-8')
  return text.replace('\r\n', '\n').replace('\r', '\n')


def open_text(path: PathLike) -> IO[str]:
  """A text file opened for reading line by line, as `open(path, encoding='utf-8')` opens it, so
  a large file is not read whole and a decoding error names the line it is on."""
  f = epath.Path(path).open('rb')
  if isinstance(f, io.IOBase):  # local files and fsspec (gcsfs) objects
    return io.TextIOWrapper(f, encoding='utf-8')
  f.close()  # tf.io.gfile's GFile is no io object; its text mode decodes UTF-8 itself
  return epath.Path(path).open('r')


def write_text(path: PathLike, text: str) -> None:
  """Writes `text` as UTF-8 (not the locale's encoding, whatever the backend)."""
  epath.Path(path).write_bytes(text.encode('utf-8'))


def read_json(path: PathLike) -> Any:
  return json.loads(read_text(path))


def atomic_write_text(path: PathLike, text: str) -> None:
  """Writes a temporary sibling, then renames it onto `path`: readers see the old file or the
  new one, never a half-written one. On gs:// the rename is a copy and a delete (objects appear
  whole or not at all); a failed write leaves no temporary file behind."""
  if is_local(path):
    _atomic_write_local(os.fspath(path), text)
    return
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f'.tmp-{uuid.uuid4().hex}{target.name}'
  try:
    write_text(tmp, text)
    tmp.replace(target)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _atomic_write_local(path: str, text: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_json(path: PathLike, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + '\n')


def is_nonempty_dir(path: PathLike) -> bool:
  """True when `path` exists and holds anything (a file counts as non-empty)."""
  p = epath.Path(path)
  return p.exists() and (not p.is_dir() or any(True for _ in p.iterdir()))


def commit_dir(tmp: PathLike, out: PathLike) -> None:
  """Renames a finished temporary directory `tmp` to `out` (removing `out` first if it is an
  empty directory). Locally one rename; on gs:// every object is copied then deleted, so
  another reader may see `out` fill up, but each object in it is whole."""
  out_p = epath.Path(out)
  if out_p.is_dir():
    out_p.rmdir()
  epath.Path(tmp).replace(out_p)
