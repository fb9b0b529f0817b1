"""gs:// paths through etils.epath: a bucket is mocked by a local directory (epath's own
`mock_epath` hooks, which see the gs:// path and serve it from `root`), so every read and write
takes the non-local branch that a TPU VM takes, and must give what the local path gives, bit for
bit. Local-only calls (open, os.path, safe_open) on a gs:// path would find nothing and fail."""

import contextlib
import json
import os
import shutil

import numpy as np
import pytest
from etils.epath import testing as epath_testing

from tests.conftest import STORIES_BIN, STORIES_TOK
from xecomla import data_checks, eval as evaluation, fileio
from xecomla.convert import hf, llama2c
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.convert.safetensors_io import (CheckpointError, read_header, read_headers,
                                            read_tensors, write_tensors)
from xecomla.export import export_hf, import_hf
from xecomla.tokenizer import Tokenizer

BUCKET = 'gs://bucket'


@contextlib.contextmanager
def mocked_bucket(root, **hooks):
  """gs://bucket/... served from `root`; yields the gs:// paths the backend saw. `hooks` replace
  some of the backend's functions (e.g. one that fails)."""
  calls = []

  def local(p):
    p = os.fspath(p)
    if p.startswith(BUCKET):
      calls.append(p)
      return str(root) + p[len(BUCKET):]
    return p

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)

  fns = dict(open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
             rmtree=one, stat=one, rename=two, replace=two, copy=two)
  with epath_testing.mock_epath(**{**fns, **hooks}):
    yield calls


def files_of(directory):
  return {name: open(os.path.join(directory, name), 'rb').read()
          for name in sorted(os.listdir(directory))}


def flat(tree, prefix=()):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in flat(sub, prefix + (key,)).items()}
  return {prefix: np.asarray(tree)}


def assert_identical(a, b):
  """Same names, dtypes, shapes and bytes."""
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize('kwargs', [{}, {'dtype': 'bfloat16', 'shard_size': '20KB', 'tie': True}])
def test_hf_llama_tensors_from_gs_equal_the_local_read(hf_llama, tmp_path, kwargs):
  """float32 in one file; bfloat16 in shards with an index (ml_dtypes.bfloat16 on both branches)."""
  local, _ = hf_llama(**kwargs)
  shutil.copytree(local, tmp_path / 'bucket' / 'llama')
  config = hf.check_llama_dir(local)
  names = [row[0] for row in hf.name_map(config)]
  with mocked_bucket(tmp_path / 'bucket') as calls:
    remote_headers = read_headers(f'{BUCKET}/llama')
    remote = read_tensors(f'{BUCKET}/llama', names)
  assert any(c.endswith('.safetensors') for c in calls)
  assert {k: v[1:] for k, v in remote_headers.items()} == {
      k: v[1:] for k, v in read_headers(local).items()}
  assert_identical(remote, read_tensors(local, names))
  assert_identical(flat(hf.hf_to_params(config, remote)), flat(hf.load_llama(local)[1]))


def test_load_llama_from_gs_equals_local(hf_llama, tmp_path):
  local, _ = hf_llama()
  shutil.copytree(local, tmp_path / 'bucket' / 'llama')
  with mocked_bucket(tmp_path / 'bucket'):
    config, params = hf.load_llama(f'{BUCKET}/llama')
  ref_config, ref_params = hf.load_llama(local)
  assert config == ref_config
  assert_identical(flat(params), flat(ref_params))


def test_every_numpy_dtype_reads_the_same_from_gs(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {'f64': rng.normal(size=(3, 2)), 'f32': rng.normal(size=(5,)).astype(np.float32),
            'f16': rng.normal(size=(2, 2)).astype(np.float16),
            'empty': np.zeros((0, 4), np.float32), 'bool': np.array([True, False, True])}
  for t in ('int64', 'int32', 'int16', 'int8', 'uint64', 'uint32', 'uint16', 'uint8'):
    arrays[t] = rng.integers(0, 100, size=(2, 3)).astype(t)
  local = tmp_path / 'local'
  for d in (local, tmp_path / 'bucket' / 'st'):
    d.mkdir(parents=True)
  write_tensors(str(local), arrays)
  with mocked_bucket(tmp_path / 'bucket'):
    write_tensors(f'{BUCKET}/st', arrays)  # through a local temporary file and a copy
  assert files_of(local) == files_of(tmp_path / 'bucket' / 'st')
  with mocked_bucket(tmp_path / 'bucket'):
    remote = read_tensors(f'{BUCKET}/st')
    remote_header = read_header(f'{BUCKET}/st/model.safetensors')
  assert remote_header == read_header(str(local / 'model.safetensors'))
  assert_identical(remote, read_tensors(str(local)))
  assert_identical(remote, {k: np.asarray(v) for k, v in arrays.items()})


def test_a_truncated_gs_shard_is_refused_by_name(tmp_path):
  d = tmp_path / 'bucket' / 'st'
  d.mkdir(parents=True)
  write_tensors(str(d), {'w': np.ones((16, 16), np.float32)})
  data = (d / 'model.safetensors').read_bytes()
  (d / 'model.safetensors').write_bytes(data[:-4])
  with mocked_bucket(tmp_path / 'bucket'), pytest.raises(CheckpointError, match='truncated'):
    read_tensors(f'{BUCKET}/st')


def test_atomic_write_json_to_gs_leaves_only_the_file(tmp_path):
  obj = {'nll': 1.25, 'name': 'naïve', 'rows': [1, 2]}
  fileio.atomic_write_json(str(tmp_path / 'local' / 'results.json'), obj)
  with mocked_bucket(tmp_path / 'bucket') as calls:
    fileio.atomic_write_json(f'{BUCKET}/w/sub/results.json', obj)
    assert fileio.read_json(f'{BUCKET}/w/sub/results.json') == obj
  assert any('.tmp-' in c for c in calls)  # written to a temporary sibling, then renamed
  assert os.listdir(tmp_path / 'bucket' / 'w' / 'sub') == ['results.json']
  assert files_of(tmp_path / 'bucket' / 'w' / 'sub') == files_of(tmp_path / 'local')


def test_a_failed_gs_write_leaves_neither_target_nor_temporary(tmp_path):
  (tmp_path / 'bucket' / 'w').mkdir(parents=True)

  def failing_replace(fn, path, dst):
    raise OSError('connection reset')

  with mocked_bucket(tmp_path / 'bucket', replace=failing_replace):
    with pytest.raises(OSError, match='reset'):
      fileio.atomic_write_text(f'{BUCKET}/w/results.md', 'text')
  assert os.listdir(tmp_path / 'bucket' / 'w') == []


def test_text_reads_from_gs_equal_local_open(tmp_path):
  """UTF-8 and universal newlines as open(path, encoding='utf-8') reads, line by line too."""
  raw = 'héllo\r\nworld\rone\n\nsecond doc ✓\n'.encode('utf-8')
  (tmp_path / 'bucket').mkdir()
  (tmp_path / 'bucket' / 't.txt').write_bytes(raw)
  local = str(tmp_path / 'bucket' / 't.txt')
  rows = [{'context': 'a', 'choices': ['b', 'c'], 'label': 1}, {'context': 'd', 'choices': ['e'],
                                                                 'label': 0}]
  (tmp_path / 'bucket' / 'mc.jsonl').write_text('\r\n'.join(json.dumps(r) for r in rows))
  with mocked_bucket(tmp_path / 'bucket'):
    text = fileio.read_text(f'{BUCKET}/t.txt')
    with fileio.open_text(f'{BUCKET}/t.txt') as f:
      lines = list(f)
    docs = evaluation.read_documents(f'{BUCKET}/t.txt')
    mc = evaluation.read_mc(f'{BUCKET}/mc.jsonl')
    data_checks.check_text(f'{BUCKET}/t.txt', 'eval.path')
  with open(local, encoding='utf-8') as f:
    assert text == f.read()
  with open(local, encoding='utf-8') as f:
    assert lines == list(f)
  assert docs == evaluation.read_documents(local) == ['héllo\nworld\none', 'second doc ✓']
  assert mc == rows


def test_llama2c_converted_into_gs_is_the_local_directory_and_its_tokenizer_loads(tmp_path,
                                                                                 stories_dir):
  with mocked_bucket(tmp_path / 'bucket'):
    llama2c.convert(STORIES_BIN, STORIES_TOK, f'{BUCKET}/hf')
    tok = Tokenizer(f'{BUCKET}/hf')
  assert sorted(os.listdir(tmp_path / 'bucket')) == ['hf']  # the .tmp sibling renamed away
  assert files_of(tmp_path / 'bucket' / 'hf') == files_of(stories_dir)
  text = 'Once upon a time, a naïve cat said "hi"!\n'
  ref = Tokenizer(stories_dir)
  assert tok.vocab_size == ref.vocab_size and tok.encode(text) == ref.encode(text)
  assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))


def test_export_into_gs_is_the_local_export_and_imports_back(tmp_path, stories_dir):
  cfg, params, _ = upcycle(*hf.load_llama(stories_dir), InitOptions(r_kv=8, d_r=2, round_to=1))
  extra = {'xecomla_source.json': {'stage': 'kd', 'note': 'naïve'}}
  export_hf(str(tmp_path / 'local'), cfg, params, stories_dir, extra_json=extra)
  with mocked_bucket(tmp_path / 'bucket'):
    export_hf(f'{BUCKET}/export', cfg, params, stories_dir, extra_json=extra)
    got_cfg, got = import_hf(f'{BUCKET}/export')
    with pytest.raises(CheckpointError, match='not empty'):
      export_hf(f'{BUCKET}/export', cfg, params, stories_dir)
  assert sorted(os.listdir(tmp_path / 'bucket')) == ['export']
  assert files_of(tmp_path / 'bucket' / 'export') == files_of(tmp_path / 'local')
  ref_cfg, ref = import_hf(str(tmp_path / 'local'))
  assert got_cfg == ref_cfg
  assert_identical(flat(got), flat(ref))
