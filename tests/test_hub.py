"""Hub ids as teacher.path / distill.teacher_path (xecomla/hub.py): a tiny random Llama saved by
transformers, placed in a temporary cache in the hub's layout (models--org--name/blobs,
snapshots/<commit>/ links, refs/<revision>). No test touches the network: offline mode is on for
xecomla and huggingface_hub, and the downloader fails the test (download tests replace it)."""

import hashlib
import json
import os
import shutil

import httpx2
import pytest
from huggingface_hub import errors as hf_errors
from tokenizers import Tokenizer, models

from tests.conftest import make_hf_llama, small_config
from xecomla import hub, pipeline, workdir as wd
from xecomla.cli import UsageError
from xecomla.planner import shapes

VOCAB = 97  # make_hf_llama's vocabulary
REPO = 'org/tiny-llama'
real = os.path.realpath  # snapshot_download returns the cache's path with links resolved


def commit_of(name):
  return hashlib.sha1(name.encode()).hexdigest()  # 40 hex digits, as the hub's commits


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
  """A random tiny Llama (vocab 97, dim 32, 2 layers, head_dim 8) saved by transformers, with a
  word-level tokenizer.json of the same vocabulary."""
  d = tmp_path_factory.mktemp('model') / 'tiny'
  make_hf_llama(str(d))
  vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, **{f'w{i}': i for i in range(3, VOCAB)}}
  Tokenizer(models.WordLevel(vocab, unk_token='<unk>')).save(str(d / 'tokenizer.json'))
  return d


def place(cache, repo, src, commit, refs=('main',), only=None):
  """The files of `src` (or just `only`) in the hub cache's layout: blobs named by content hash,
  snapshots/<commit>/<file> relative links to them, refs/<ref> holding the commit; returns the
  snapshot directory."""
  root = cache / ('models--' + repo.replace('/', '--'))
  (root / 'blobs').mkdir(parents=True, exist_ok=True)
  snap = root / 'snapshots' / commit
  snap.mkdir(parents=True)
  for name in sorted(only or os.listdir(src)):
    data = (src / name).read_bytes()
    blob = hashlib.sha256(data).hexdigest()
    (root / 'blobs' / blob).write_bytes(data)
    (snap / name).symlink_to(os.path.join('..', '..', 'blobs', blob))
  (root / 'refs').mkdir(exist_ok=True)
  for ref in refs:
    (root / 'refs' / ref).write_text(commit)  # no newline, as huggingface_hub writes it
  return str(snap)


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
  """An empty cache in HF_HUB_CACHE, offline mode on (for xecomla and for huggingface_hub, which
  read it at import), and a downloader that fails the test if anything tries it."""
  cache = tmp_path / 'hf_cache'
  cache.mkdir()
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setattr('huggingface_hub.constants.HF_HUB_OFFLINE', True)

  def no_network(*args, **kwargs):
    pytest.fail(f'a test tried to download {args}')

  monkeypatch.setattr(hub, '_download', no_network)
  return cache


def test_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
  assert hub.parse('meta-llama/Llama-3.2-1B-Instruct') == ('meta-llama/Llama-3.2-1B-Instruct',
                                                          'main')
  assert hub.parse('org/name@v1.0') == ('org/name', 'v1.0')
  assert hub.parse('org/name@refs/pr/1') == ('org/name', 'refs/pr/1')
  for path in ('/abs/model', 'a/b/c', '../x/y', './x', 'org/model.bin', 'name', 'org--a/b',
               'org/x.git', ''):
    assert hub.parse(path) is None, path
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'org' / 'name').mkdir(parents=True)
  assert hub.parse('org/name') is None  # it exists here: a local path
  assert hub.normalised('org/name') == str(tmp_path / 'org' / 'name')
  assert hub.normalised('other/name@v1') == 'other/name'


def test_cache_location_is_read_from_the_environment_at_each_call(tmp_path, monkeypatch):
  for name in ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HF_HOME', 'XDG_CACHE_HOME'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  assert hub.cache_dir() == str(tmp_path / '.cache' / 'huggingface' / 'hub')
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'home'))
  assert hub.cache_dir() == str(tmp_path / 'home' / 'hub')
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'c'))
  assert hub.cache_dir() == str(tmp_path / 'c')


def test_an_id_resolves_to_its_cached_snapshot(offline_cache, tiny_model, tmp_path, monkeypatch):
  snap = place(offline_cache, REPO, tiny_model, commit_of('a'))
  found = hub.snapshot(REPO, 'teacher.path')
  assert (found.id, found.revision, found.commit, found.source) == (REPO, 'main', commit_of('a'),
                                                                    'cache')
  assert real(found.path) == real(snap) and real(hub.resolve(REPO, 'f')) == real(snap)
  assert wd.check_teacher(REPO, '', None).vocab_size == VOCAB
  assert real(wd.hf_dir(REPO, '', str(tmp_path / 'w'))) == real(snap)
  # HF_HOME/hub, read now: the same model found under another home once HF_HUB_CACHE is unset.
  home = tmp_path / 'home'
  other = place(home / 'hub', REPO, tiny_model, commit_of('home'))
  monkeypatch.delenv('HF_HUB_CACHE')
  monkeypatch.setenv('HF_HOME', str(home))
  assert real(hub.resolve(REPO, 'f')) == real(other)


def test_revisions_name_other_snapshots(offline_cache, tiny_model):
  main = place(offline_cache, REPO, tiny_model, commit_of('a'))
  v1 = place(offline_cache, REPO, tiny_model, commit_of('b'), refs=('v1',))
  assert real(hub.resolve(REPO, 'f')) == real(main)
  assert real(hub.resolve(f'{REPO}@v1', 'f')) == real(v1)
  assert real(hub.resolve(f'{REPO}@{commit_of("b")}', 'f')) == real(v1)  # a commit, no ref
  with pytest.raises(UsageError, match=r'revision v2\) is not in the Hugging Face cache'):
    hub.resolve(f'{REPO}@v2', 'teacher.path')


def test_a_local_path_wins_over_the_cache(offline_cache, tiny_model, tmp_path, monkeypatch):
  place(offline_cache, REPO, tiny_model, commit_of('a'))
  monkeypatch.chdir(tmp_path)
  shutil.copytree(tiny_model, tmp_path / REPO)
  assert hub.resolve(REPO, 'teacher.path') == REPO
  assert hub.snapshot('/no/such/dir', 'teacher.path') is None  # a path: left to the path checks


def test_missing_offline_is_one_line_with_the_fix(offline_cache, tiny_model):
  with pytest.raises(UsageError) as e:
    wd.check_teacher('org/absent', '', None, field='distill.teacher_path')
  msg = str(e.value)
  assert '\n' not in msg
  for part in ('distill.teacher_path=org/absent', str(offline_cache), 'HF_HUB_OFFLINE=1',
               '`hf download org/absent`', 'HF_HUB_CACHE', 'local directory'):
    assert part in msg, part
  # A snapshot with config.json only (what AutoConfig fetches): not enough for a run, enough to
  # plan from.
  place(offline_cache, 'org/config-only', tiny_model, commit_of('c'), only=['config.json'])
  with pytest.raises(UsageError, match=r'snapshot without tokenizer.json, model.safetensors'):
    hub.resolve('org/config-only', 'teacher.path')
  assert hub.cached('org/config-only').endswith(commit_of('c'))
  assert shapes.model_llama('org/config-only', 'teacher.path')[0].dim == 32


def hub_error(cls, status):
  url = 'https://huggingface.co/api/models/org/x'
  return cls('refused', response=httpx2.Response(status, request=httpx2.Request('GET', url)))


@pytest.mark.parametrize('error, message', [
    (hub_error(hf_errors.GatedRepoError, 401), 'gated .* `hf auth login` or set HF_TOKEN'),
    (hub_error(hf_errors.RepositoryNotFoundError, 404), 'is neither a model on the Hub'),
    (hub_error(hf_errors.RevisionNotFoundError, 404), "has no revision 'main'"),
    (hf_errors.LocalEntryNotFoundError('Got: ConnectError: [Errno -3] no name\nAn error happened'),
     r'downloading it failed \(LocalEntryNotFoundError: Got: ConnectError: \[Errno -3\] no name\)'
     r': run `hf download org/x`'),
])
def test_download_failures_are_one_line_each(monkeypatch, error, message):
  monkeypatch.setenv('HF_HUB_OFFLINE', '0')

  def refused(repo, revision, cache):
    raise error

  monkeypatch.setattr(hub, '_download', refused)
  with pytest.raises(UsageError, match=message) as e:
    hub.resolve('org/x', 'teacher.path')
  assert '\n' not in str(e.value)


def test_online_a_missing_model_is_downloaded_once(offline_cache, tiny_model, monkeypatch):
  """The download path with the network replaced: what it is asked for, and that the next
  resolution is served by the cache."""
  monkeypatch.setenv('HF_HUB_OFFLINE', '0')
  asked = []

  def download(repo, revision, cache):
    asked.append((repo, revision, cache))
    return place(offline_cache, repo, tiny_model, commit_of('d'))

  monkeypatch.setattr(hub, '_download', download)
  found = hub.snapshot(REPO, 'teacher.path')
  assert (found.source, found.commit) == ('download', commit_of('d'))
  assert asked == [(REPO, 'main', str(offline_cache))]
  assert hub.snapshot(REPO, 'teacher.path').source == 'cache' and len(asked) == 1
  assert {'config.json', '*.safetensors', '*.safetensors.index.json', 'tokenizer.json',
          'generation_config.json'} <= set(hub.ALLOW_PATTERNS)


def tiny_config(teacher):
  c = small_config(steps=2)
  c.stages = 'init'
  c.teacher.path, c.teacher.tokenizer = teacher, ''
  c.mla.r_kv, c.mla.r_q = 6, 16  # the tiny model: dim 32, 4 heads of 8 (d_qk 4 + d_r 4)
  return c


def test_init_stage_runs_from_an_id_and_records_its_commit(offline_cache, tiny_model, tmp_path):
  snap = place(offline_cache, REPO, tiny_model, commit_of('a'))
  w = str(tmp_path / 'w')
  pipeline.run(tiny_config(REPO), w)
  record = json.loads((tmp_path / 'w' / 'config.json').read_text())
  assert record['teacher']['path'] == REPO
  assert record['resolved']['teacher.path']['commit'] == commit_of('a')
  assert real(wd.checkpoints(w, 'init').read_meta()['teacher']) == real(snap)
  # refs/main moves to another commit: resuming would mix two models, unless pinned to the first.
  place(offline_cache, REPO, tiny_model, commit_of('b'))
  with pytest.raises(UsageError, match=f'at commit {commit_of("a")}, which now resolves to '
                                       f'{commit_of("b")}: set teacher.path={REPO}@'):
    pipeline.run(tiny_config(REPO), w)
  pipeline.run(tiny_config(f'{REPO}@{commit_of("a")}'), w)  # init: already done


def test_validate_takes_ids_for_both_teachers(offline_cache, tiny_model, tmp_path):
  place(offline_cache, REPO, tiny_model, commit_of('a'))
  place(offline_cache, 'org/tiny-kd', tiny_model, commit_of('k'))
  text = tmp_path / 'train.txt'
  text.write_text('w3 w4 w5\n')
  c = tiny_config(REPO)
  c.data.train_path, c.data.format = str(text), 'text'
  c.distill.teacher_path = 'org/tiny-kd'
  resolved = pipeline.validate(c, ['init', 'distill'])
  assert [resolved[f]['commit'] for f in hub.FIELDS] == [commit_of('a'), commit_of('k')]
  c.distill.teacher_path = 'org/absent'
  with pytest.raises(UsageError, match='distill.teacher_path=org/absent is not a local path'):
    pipeline.validate(c, ['init', 'distill'])


def test_planner_reads_the_cache_and_never_downloads(offline_cache, tiny_model):
  place(offline_cache, REPO, tiny_model, commit_of('a'))
  llama, where = shapes.model_llama(REPO, 'teacher.path')
  assert llama.dim == 32 and 'Hugging Face cache' in where and where.endswith('config.json')
  llama, where = shapes.model_llama('meta-llama/Llama-3.1-8B-Instruct', 'teacher.path')
  assert llama.dim == 4096 and where.startswith('named shape Llama-3.1-8B-Instruct')
  with pytest.raises(UsageError, match='not in the Hugging Face cache .* matches no known shape'):
    shapes.model_llama('org/unknown', 'teacher.path')


def test_llama_configs_name_hub_ids_or_local_directories(monkeypatch):
  from configs import r_kv_64
  monkeypatch.delenv('XECOMLA_MODELS', raising=False)

  def paths(arg):
    c = r_kv_64.get_config(arg)
    return c.teacher.path, c.distill.teacher_path

  assert paths('teacher=8b') == ('meta-llama/Llama-3.2-1B-Instruct',
                                 'meta-llama/Llama-3.1-8B-Instruct')
  assert paths('teacher=3b')[1] == 'meta-llama/Llama-3.2-3B-Instruct'
  monkeypatch.setenv('XECOMLA_MODELS', '/models')
  assert paths('teacher=8b') == ('/models/Llama-3.2-1B-Instruct', '/models/Llama-3.1-8B-Instruct')
