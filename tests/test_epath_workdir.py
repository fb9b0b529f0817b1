"""A gs:// work directory through the migrated code (workdir, ckpt_manifest, ckpt's listing,
train.logs, pipeline.validate, read_jsonl), served from a local directory by tests.test_epath_io's
mocked bucket, without orbax saves. A local-only call (os.path, open) on a gs:// path would find
nothing there, and os.path.abspath would make a stray './gs:' folder: both are checked."""

import ast
import json
import os
import pathlib
import shutil

import pytest

from tests.conftest import STORIES_BIN, require_shared_data, small_config
from tests.test_epath_io import BUCKET, files_of, mocked_bucket
from xecomla import chat_data, ckpt, console, fileio, hub, pipeline, workdir as wd
from xecomla.ckpt_manifest import COMMIT, MANIFEST, check_step_dir, manifest_of
from xecomla.cli import UsageError
from xecomla.convert import hf
from xecomla.train.logs import MetricsLog

W = f'{BUCKET}/w'


def stray():
  """What a URI made local would have written under the cwd (configs' data paths are relative to
  it, so the tests run there)."""
  return sorted(map(str, pathlib.Path('gs:').rglob('*'))) if os.path.exists('gs:') else None


@pytest.fixture
def bucket(tmp_path):
  """The bucket's root; nothing may appear under './gs:' meanwhile."""
  before = stray()
  yield tmp_path / 'bucket'
  assert stray() == before


def test_a_gs_teacher_directory_is_used_as_it_is(hf_llama, bucket):
  local, _ = hf_llama()
  shutil.copytree(local, bucket / 'teacher')
  with mocked_bucket(bucket):
    assert wd.hf_dir(f'{BUCKET}/teacher', '', W) == f'{BUCKET}/teacher'
    assert wd.check_teacher(f'{BUCKET}/teacher', '', W) == hf.check_llama_dir(local)
    assert wd.converted_dir(f'{BUCKET}/teacher', W) == f'{BUCKET}/teacher'
    with pytest.raises(UsageError, match='does not exist'):
      wd.check_teacher(f'{BUCKET}/nothing', '', W)
  assert hub.parse(f'{BUCKET}/teacher') is None  # a URI is never a Hub id
  assert hub.normalised(f'{BUCKET}/teacher') == f'{BUCKET}/teacher'  # nor made absolute


def fake_step(directory, meta):
  """A committed step as orbax lays it out: items with nested files, commit markers."""
  for item, files in {'meta': {'metadata': json.dumps(meta)},
                      'params': {'d/0.0': 'x' * 40, 'manifest.ocdbt': 'm'}}.items():
    for rel, text in files.items():
      (directory / item / rel).parent.mkdir(parents=True, exist_ok=True)
      (directory / item / rel).write_text(text)
    (directory / item / COMMIT).write_text('')
  (directory / COMMIT).write_text('')


def test_latest_step_and_its_meta_are_read_from_gs(bucket):
  ckpts = bucket / 'w' / 'init' / 'ckpt'
  for step in (3, 12):
    fake_step(ckpts / str(step), {'step': step})
  (ckpts / '20.orbax-checkpoint-tmp-1').mkdir()  # an unfinished save: no step
  with mocked_bucket(bucket):
    assert wd.latest_step_dir(W, 'init') == f'{W}/init/ckpt/12'
    assert wd.peek_meta(W, 'init') == {'step': 12} and wd.peek_meta(W, 'dpo') is None
    (ckpts / '12' / 'meta' / 'metadata').write_text('{cut')
    with pytest.raises(UsageError, match='damaged'):
      wd.peek_meta(W, 'init')


def test_manifest_and_step_checks_on_gs_equal_the_local_ones(bucket, tmp_path):
  fake_step(tmp_path / 'local', {'step': 1})
  shutil.copytree(tmp_path / 'local', bucket / '1')
  with mocked_bucket(bucket):
    manifest = manifest_of(f'{BUCKET}/1')
    assert manifest == manifest_of(tmp_path / 'local')
    assert manifest['files']['params/d/0.0'] == 40
    fileio.atomic_write_json(f'{BUCKET}/1/{MANIFEST}', manifest)
    assert check_step_dir(f'{BUCKET}/1', ('params', 'meta')) is None
    (bucket / '1' / 'params' / 'd' / '0.0').write_text('x' * 39)
    assert check_step_dir(f'{BUCKET}/1') == 'params/d/0.0 is 39 bytes, 40 were written (truncated?)'
    (bucket / '1' / COMMIT).unlink()
    assert check_step_dir(f'{BUCKET}/1') == f'half-written: no {COMMIT}'
    assert check_step_dir(f'{BUCKET}/2') == 'missing'


def test_stage_checkpoints_keep_a_gs_directory_a_uri(bucket, monkeypatch):
  """orbax 0.12.8 asks google-cloud-storage whether a gs:// bucket has a hierarchical namespace
  before listing steps: the mocked bucket has none (and the package is not installed here)."""
  from orbax.checkpoint._src.path import gcs_utils
  monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)
  fake_step(bucket / 'ck' / '5', {'step': 5})
  (bucket / 'ck' / '7.orbax-checkpoint-tmp-9').mkdir()
  with mocked_bucket(bucket):
    cks = ckpt.StageCheckpoints(f'{BUCKET}/ck', async_save=False)
    try:
      assert cks.directory == f'{BUCKET}/ck' and cks.step_dir(5) == f'{BUCKET}/ck/5'
      assert cks.all_steps() == [5] and cks.check(5, ('params',)) is None
      assert cks._matching(f'*{ckpt.TMP}*') == [f'{BUCKET}/ck/7.orbax-checkpoint-tmp-9']
      cks.discard()  # the unfinished save, deleted through epath
    finally:
      cks.close()
  assert sorted(os.listdir(bucket / 'ck')) == ['5']


def test_the_config_record_and_the_resume_check_on_gs(bucket):
  config = small_config()
  with mocked_bucket(bucket):
    wd.check_resume(config, W, {})  # nothing there yet
    fileio.atomic_write_json(f'{W}/config.json', json.loads(config.to_json_best_effort()))
    wd.check_resume(config, W, {})
    config.mla.r_kv = config.mla.r_kv + 1
    with pytest.raises(UsageError, match=r'holds a run with other settings \(mla.r_kv'):
      wd.check_resume(config, W, {})
    (bucket / 'w' / 'config.json').write_text('{')
    with pytest.raises(UsageError, match='is not valid JSON'):
      wd.check_resume(config, W, {})


def test_metrics_jsonl_on_gs_is_the_local_file_and_resumes(bucket, tmp_path):
  rows = [(s, {'loss': 1.0 / s, 'lr': 0.1}) for s in (1, 2, 3, 4)]
  for stage_dir in (str(tmp_path / 'local'), f'{W}/distill'):
    with mocked_bucket(bucket):
      log = MetricsLog(stage_dir, 0)
      for step, values in rows:
        log.write(step, values)
      log.close()
  assert files_of(bucket / 'w' / 'distill') == {
      'metrics.jsonl': (tmp_path / 'local' / 'metrics.jsonl').read_bytes()}  # no local tb/ either
  with mocked_bucket(bucket):
    MetricsLog(f'{W}/distill', 2).close()  # resumed at step 2: later lines dropped
  assert [json.loads(line)['step'] for line in
          (bucket / 'w' / 'distill' / 'metrics.jsonl').read_text().splitlines()] == [1, 2]


def test_pipeline_validate_on_a_gs_workdir(bucket):
  require_shared_data()
  config = small_config()
  assert config.teacher.path == STORIES_BIN
  stages = ['init', 'distill', 'eval', 'export']
  with mocked_bucket(bucket) as calls:
    assert pipeline.validate(config, stages, W) == {}
    assert any(c.startswith(W) for c in calls)  # the work directory was looked at, on gs://
    fake_step(bucket / 'w' / 'init' / 'ckpt' / '0', {'report': {'options': {'r_kv': 1}}})
    with pytest.raises(UsageError, match='holds a student made with other mla settings'):
      pipeline.validate(config, stages, W)
    (bucket / 'file').write_text('')
    with pytest.raises(UsageError, match='is a file'):
      pipeline.validate(config, stages, f'{BUCKET}/file')


def test_jsonl_rows_are_read_from_gs(bucket):
  rows = [{'messages': [{'role': 'user', 'content': 'naïve'}]}, {'n': 2}]
  bucket.mkdir()
  (bucket / 'c.jsonl').write_bytes(('\n'.join(json.dumps(r) for r in rows) + '\n').encode())
  with mocked_bucket(bucket):
    assert chat_data.read_jsonl(f'{BUCKET}/c.jsonl') == rows
    with pytest.raises(UsageError, match='does not exist'):
      chat_data.read_jsonl(f'{BUCKET}/none.jsonl')


def test_the_log_file_is_copied_whole_into_a_gs_work_directory(bucket, tmp_path):
  local = tmp_path / 'run.log'
  with open(local, 'a', encoding='utf-8') as f:
    f.write('I0101 naïve line\n')  # not yet flushed: the copy flushes it first
    with mocked_bucket(bucket):
      console._copy_up(f, str(local), f'{W}/logs/run.log')
  assert (bucket / 'w' / 'logs' / 'run.log').read_bytes() == local.read_bytes() != b''


LOCAL_ONLY = ('os.path.exists', 'os.path.isdir', 'os.path.isfile', 'os.listdir', 'os.makedirs',
              'open', 'glob.glob', 'os.path.abspath', 'os.walk', 'os.path.getsize')
ALLOWED = {(f, fn, c) for f, fn, calls in (  # (file, function, calls): local by nature
    ('fileio.py', '_atomic_write_local', ('os.path.abspath', 'os.makedirs', 'os.path.exists')),
    ('ckpt.py', '__init__', ('os.path.abspath',)),  # for a local path only (fileio.is_local)
    ('hub.py', 'normalised', ('os.path.abspath',)),  # for a local path only
    ('hub.py', 'missing', ('os.path.isfile', 'open', 'glob.glob')),  # the HF cache is local
    ('hub.py', '_cached', ('os.path.isfile',)),
    ('console.py', 'log_to', ('os.makedirs', 'open')),  # the log file: local, copied up at exit
    ('console.py', '_copy_up', ('open',)),
    ('sweep_points.py', 'load_module', ('os.path.isfile',)),  # a config file, run as a module
) for c in calls}


def local_only_calls(path: pathlib.Path):
  """(function, call, line) of every LOCAL_ONLY call (or shutil.*) in a Python file."""
  out = []

  def visit(node, function):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.Call):
        name = ast.unparse(child.func)
        if name in LOCAL_ONLY or name.startswith('shutil.'):
          out.append((function, name, child.lineno))
      inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      visit(child, child.name if inner else function)

  visit(ast.parse(path.read_text()), '')
  return out


def test_file_io_goes_through_epath():
  """Every os.path / open / shutil / glob IO call in xecomla is an allowed local site: a new one
  must use etils.epath / xecomla.fileio, or be added to ALLOWED with its reason."""
  root = pathlib.Path(__file__).parent.parent / 'xecomla'
  found = []
  for path in sorted(root.rglob('*.py')):
    found += [(str(path.relative_to(root)), f, c, f'{path.relative_to(root.parent)}:{n} {c}(') for f, c, n in
              local_only_calls(path)]
  bad = [where for name, f, c, where in found if (name, f, c) not in ALLOWED]
  assert not bad, 'local-only IO (use etils.epath / xecomla.fileio):\n' + '\n'.join(bad)
  assert {(name, f, c) for name, f, c, _ in found} == ALLOWED  # no stale allow-list entry
