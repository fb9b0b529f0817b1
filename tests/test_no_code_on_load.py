"""Nothing executes on load: weights and checkpoints are read as data (safetensors, orbax's array
store and JSON), never unpickled, and an export's remote code is the project's own file."""

import ast
import filecmp
import os

import pytest

import xecomla
from xecomla.convert import hf
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.export import REMOTE, REMOTE_FILES, export_hf

PACKAGE = os.path.dirname(xecomla.__file__)
UNSAFE_MODULES = {'pickle', 'cPickle', 'dill', 'cloudpickle', 'joblib', 'marshal', 'shelve'}


def unsafe_calls(path):
  """(line, what) for each import of a pickle-like module, torch.load, np.load(allow_pickle=True),
  eval or exec in one source file."""
  tree = ast.parse(open(path, encoding='utf-8').read(), path)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names if a.name.split('.')[0] in UNSAFE_MODULES]
    elif isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] in UNSAFE_MODULES:
      found.append((node.lineno, node.module))
    elif isinstance(node, ast.Call):
      f = node.func
      name = (f'{f.value.id}.{f.attr}' if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
              else f.id if isinstance(f, ast.Name) else '')
      pickled = any(k.arg == 'allow_pickle' and not (isinstance(k.value, ast.Constant) and
                                                     k.value.value is False) for k in node.keywords)
      if name in ('torch.load', 'eval', 'exec') or (name in ('np.load', 'numpy.load') and pickled):
        found.append((node.lineno, name))
  return found


def test_the_package_never_unpickles_or_evaluates_code():
  sources = [os.path.join(d, f) for d, _, files in os.walk(PACKAGE) for f in files
             if f.endswith('.py')]
  assert len(sources) > 30  # the whole package, the exported modeling file included
  bad = {os.path.relpath(p, PACKAGE): hits for p in sources if (hits := unsafe_calls(p))}
  assert not bad, bad


def test_the_scanner_finds_what_it_looks_for(tmp_path):
  p = tmp_path / 'bad.py'
  p.write_text('import pickle\nfrom joblib import load\nimport numpy as np\nimport torch\n'
               'torch.load("x")\nnp.load("y", allow_pickle=True)\nnp.load("z")\neval("1")\n')
  assert [line for line, _ in unsafe_calls(str(p))] == [1, 2, 5, 6, 8]


def test_an_export_holds_data_files_and_the_projects_own_code(stories_dir, tmp_path):
  llama, params = hf.load_llama(stories_dir)
  cfg, student, _ = upcycle(llama, params, InitOptions(r_kv=6, d_r=4, rope_dims='high_freq',
                                                       round_to=1))
  out = export_hf(str(tmp_path / 'export'), cfg, student, tokenizer_dir=stories_dir)
  names = sorted(os.listdir(out))
  # Weights in safetensors only; no pickle-based weight files (.bin, .pt, .pth, .pkl).
  assert [n for n in names if n.endswith(('.bin', '.pt', '.pth', '.pkl', '.ckpt'))] == []
  assert 'model.safetensors' in names
  code = [n for n in names if n.endswith('.py')]
  assert sorted(code) == sorted(REMOTE_FILES)
  for name in code:  # byte for byte the files shipped in xecomla/export/remote/
    assert filecmp.cmp(os.path.join(out, name), os.path.join(REMOTE, name), shallow=False)
  with open(os.path.join(out, 'modeling_xecomla.py'), 'rb') as f:
    head = f.read()
  assert b'torch.load' not in head and b'pickle' not in head


if __name__ == '__main__':
  pytest.main([__file__])
