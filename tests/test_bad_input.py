"""Every bad input is refused clearly: one 'error: <what>: <fix>' line on stderr, exit status 2, no
traceback, and nothing written: an existing work directory is byte-identical afterwards, a new one
is not created.

Most cases run in-process through the CLI's error path (cli.fail_cleanly around pipeline.run);
a few run `python -m xecomla.main` to prove the whole path (flag parsing included)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.conftest import STORIES_BIN, STORIES_CONFIG, make_hf_llama, require_shared_data, small_config
from xecomla import pipeline
from xecomla.cli import fail_cleanly


def snapshot(directory):
  """Every file's bytes and every directory of `directory` (None if it does not exist)."""
  if not os.path.exists(directory):
    return None
  out = {}
  for root, dirs, files in os.walk(directory):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), directory) + '/'] = None
    for f in files:
      with open(os.path.join(root, f), 'rb') as fh:
        out[os.path.relpath(os.path.join(root, f), directory)] = fh.read()
  return out


def refuse(capsys, fn, workdir):
  """Runs fn() through the CLI's error path; checks exit 2, one error line, no traceback and an
  unchanged `workdir`; returns the error line."""
  before = snapshot(workdir)
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    fail_cleanly(lambda argv: fn())([])
  err = capsys.readouterr().err
  assert e.value.code == 2, err
  assert 'Traceback' not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith('error: ') and ': ' in last[len('error: '):], last
  assert snapshot(workdir) == before
  return last


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  """A tiny Hugging Face Llama (vocab 97, dim 32, head_dim 8), single-file and sharded."""
  base = tmp_path_factory.mktemp('hf')
  single, sharded = str(base / 'single'), str(base / 'sharded')
  make_hf_llama(single)
  make_hf_llama(sharded, shard_size='20KB')
  return single, sharded


@pytest.fixture
def workdir(init_dir, tmp_path):
  d = str(tmp_path / 'w')
  shutil.copytree(init_dir, d)
  return d


def run_config(capsys, workdir, edit, stages='init'):
  c = small_config(steps=2)
  c.stages = stages
  edit(c)
  return refuse(capsys, lambda: pipeline.run(c, workdir), workdir)


def setter(**fields):
  def edit(c):
    for k, v in fields.items():
      section, name = k.split('__')
      c[section][name] = v
  return edit


@pytest.mark.parametrize('fields,message', [
    (dict(mla__r_kv=65), 'mla.r_kv=65 is outside 1..64, the full rank of the 64 x 128 matrix'),
    (dict(mla__r_q=65), 'mla.r_q=65 is outside 1..64, the full rank of the 64 x 64 query'),
    (dict(mla__d_r=3, mla__d_qk=5), 'mla.d_r=3 must be even'),
    (dict(mla__d_r=0, mla__d_qk=8), 'mla.d_r=0 must be even'),
    (dict(mla__d_r=10, mla__d_qk=-2), 'at most the teacher head_dim 8'),
    (dict(mla__d_qk=5), 'mla.d_qk + mla.d_r = 5 + 4 must equal the teacher head_dim 8'),
    (dict(mla__kv_energy=1.5), 'mla.kv_energy=1.5 is outside (0, 1]'),
    (dict(mla__kv_energy=0.0), 'mla.kv_energy=0.0 is outside (0, 1]'),
    (dict(mla__q_energy=-0.1), 'mla.q_energy=-0.1 is outside (0, 1]'),
    (dict(mla__kv_budget=0.07), 'below one chunk (mla.round_to=1) per layer plus the RoPE key'),
    (dict(mla__kv_budget=0.15, mla__round_to=8), '(5 x (8 + 4) = 60)'),
    (dict(mla__rope_dims='middle'), "mla.rope_dims='middle'"),
])
def test_mla_settings_that_do_not_fit_the_teacher(capsys, workdir, fields, message):
  assert message in run_config(capsys, workdir, setter(**fields))


@pytest.mark.parametrize('fields,stages,message', [
    (dict(model__attention='flash'), 'init', "model.attention='flash' is not known"),
    (dict(train__remat='some'), 'init', "train.remat='some' is not known"),
    (dict(train__frozen_dtype='float16'), 'init', "train.frozen_dtype 'float16' is not supported"),
    (dict(eval__max_len=0), 'init', 'eval.max_len=0 must be at least 1'),
    (dict(distill__loss_chunk=-1), 'distill', 'distill.loss_chunk'),
    (dict(eval__cache_dtype='int4'), 'eval', "eval.cache_dtype='int4' is not one of"),
    (dict(distill__divergence='kl'), 'distill', "distill.divergence='kl' is not known"),
    (dict(distill__divergence='jsd', distill__jsd_beta=1.0), 'distill',
     'distill.jsd_beta=1.0 must be in (0, 1)'),
    (dict(distill__policy_fraction=1.0), 'distill', 'distill.policy_fraction=1.0 must be in [0, 1)'),
    (dict(distill__policy_fraction=0.1, mesh__data=2, mesh__tensor=4), 'distill',
     'the on-policy rows (distill.policy_fraction x batch)=1 is not divisible'),
    (dict(data__teacher_stories=-1), 'distill', 'data.teacher_stories=-1 is negative'),
    (dict(data__teacher_stories=8, data__teacher_fraction=0.0), 'align',
     'data.teacher_fraction=0.0 must be in (0, 1]'),
    (dict(data__teacher_stories=8, data__teacher_temperature=0.0), 'distill',
     'data.teacher_temperature=0.0 must be positive'),
    (dict(data__teacher_stories=8, data__teacher_max_len=513), 'distill',
     'data.teacher_max_len=513 is outside 2..512'),
    (dict(align__steps=0), 'align', 'align.steps=0 must be at least 1'),
    (dict(align__lr=0.0), 'align', 'align.lr=0.0 must be positive'),
])
def test_scale_settings_that_are_not_known(capsys, workdir, fields, stages, message):
  assert message in run_config(capsys, workdir, setter(**fields), stages)


def test_kd_teacher_with_another_vocabulary(capsys, workdir, hf_dirs):
  last = run_config(capsys, workdir, setter(distill__teacher_path=hf_dirs[0]), 'distill')
  assert 'has a vocabulary of 97 tokens, the student 512: choose a teacher' in last


def edit_config_json(directory, **fields):
  path = os.path.join(directory, 'config.json')
  cfg = json.load(open(path))
  cfg.update(fields)
  json.dump(cfg, open(path, 'w'))


def add_tensor(directory, name):
  path = os.path.join(directory, 'model.safetensors')
  tensors = load_file(path)
  tensors[name] = np.ones((8,), np.float32)
  save_file(tensors, path, metadata={'format': 'pt'})


@pytest.mark.parametrize('case,message', [
    ('model_type', "model_type 'mistral' is not supported"),
    ('attention_bias', 'attention_bias=true is not supported by the conversion'),
    ('qk_norm', 'QK-norm (qk_norm=true) is not supported'),
    ('use_qk_norm', 'QK-norm (use_qk_norm=true) is not supported'),
    ('q_norm_tensor', 'QK-norm (tensor model.layers.0.self_attn.q_norm.weight)'),
    ('bias_tensor', 'attention bias (tensor model.layers.1.self_attn.k_proj.bias)'),
    ('sliding_window', 'sliding-window attention (sliding_window=4096) is not supported'),
    ('use_sliding_window', 'sliding-window attention'),
    ('yarn', "rope_type 'yarn' is not supported"),
    ('linear', "rope_type 'linear' is not supported"),
    ('dynamic', "rope_type 'dynamic' is not supported"),
    ('longrope', "rope_type 'longrope' is not supported"),
])
def test_hugging_face_teacher_with_unsupported_features(capsys, workdir, hf_dirs, tmp_path,
                                                       case, message):
  d = str(tmp_path / 'hf')
  shutil.copytree(hf_dirs[0], d)
  if case == 'model_type':
    edit_config_json(d, model_type='mistral')
  elif case in ('attention_bias', 'qk_norm', 'use_qk_norm', 'use_sliding_window'):
    edit_config_json(d, **{case: True})
  elif case == 'sliding_window':
    edit_config_json(d, sliding_window=4096)
  elif case == 'q_norm_tensor':
    add_tensor(d, 'model.layers.0.self_attn.q_norm.weight')
  elif case == 'bias_tensor':
    add_tensor(d, 'model.layers.1.self_attn.k_proj.bias')
  else:
    edit_config_json(d, rope_parameters={'rope_type': case, 'rope_theta': 10000.0, 'factor': 2.0})
  last = run_config(capsys, workdir, setter(teacher__path=d))
  assert message in last and ('give a Hugging Face Llama' in last or 'xecomla converts' in last)


def cut(path, keep):
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:keep if keep >= 1 else int(len(data) * keep)])


@pytest.mark.parametrize('case,message', [
    ('missing_shard', 'listed in model.safetensors.index.json is missing: download all shards'),
    ('header_cut', 'is truncated: its header needs'),
    ('data_cut', 'is truncated: its tensor data ends at byte'),
    ('tiny_file', 'is truncated (5 bytes, no safetensors header)'),
    ('wrong_shape', "tensor 'model.layers.0.self_attn.k_proj.weight' has shape (3, 32)"),
    ('misplaced', 'which does not hold it'),
])
def test_missing_truncated_or_mismatched_shards(capsys, workdir, hf_dirs, tmp_path, case, message):
  d = str(tmp_path / 'hf')
  shutil.copytree(hf_dirs[1], d)
  index = json.load(open(os.path.join(d, 'model.safetensors.index.json')))
  shards = sorted(set(index['weight_map'].values()))
  last_shard = os.path.join(d, shards[-1])
  if case == 'missing_shard':
    os.remove(last_shard)
  elif case == 'header_cut':
    cut(last_shard, 40)
  elif case == 'data_cut':
    cut(last_shard, 0.7)
  elif case == 'tiny_file':
    cut(last_shard, 5)
  elif case in ('wrong_shape', 'misplaced'):
    name = 'model.layers.0.self_attn.k_proj.weight'
    shard = os.path.join(d, index['weight_map'][name])
    tensors = load_file(shard)
    if case == 'wrong_shape':
      tensors[name] = np.zeros((3, 32), np.float32)
    else:
      del tensors[name]
    save_file(tensors, shard, metadata={'format': 'pt'})
  assert message in run_config(capsys, workdir, setter(teacher__path=d))


def write(path, text):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return str(path)


GOOD_CHAT = json.dumps({'messages': [{'role': 'user', 'content': 'hi'},
                                     {'role': 'assistant', 'content': 'hello'}]})
GOOD_PAIR = json.dumps({'prompt': 'hi', 'chosen': 'hello', 'rejected': 'go away'})


@pytest.mark.parametrize('case,stages,message', [
    ('train_empty', 'distill', 'data.train_path={p} holds no document (empty)'),
    ('train_separators', 'distill', 'data.train_path={p} holds no document (3 blank or separator'),
    ('chat_bad_json', 'distill', '{p}:2 is not valid JSON'),
    ('chat_bad_role', 'distill', "{p}:1: chat message {{'role': 'robot'"),
    ('chat_empty', 'distill', 'data.train_path={p} holds no conversation'),
    ('prefs_bad_line', 'dpo', '{p}:3: a preference row needs either'),
    ('prefs_bad_json', 'dpo', '{p}:2 is not valid JSON'),
    ('eval_empty', 'eval', 'eval.path={p} holds no document (empty)'),
    ('mc_bad_row', 'eval', 'eval.mc_paths: {p}:1: a multiple-choice row needs'),
])
def test_empty_or_malformed_data_files(capsys, workdir, tmp_path, case, stages, message):
  p = tmp_path / 'data.jsonl'
  if case == 'train_empty':
    edit = setter(data__train_path=write(p, ''))
  elif case == 'train_separators':
    edit = setter(data__train_path=write(p, '<|endoftext|>\n  \n<|endoftext|><|endoftext|>\n'))
  elif case.startswith('chat'):
    text = {'chat_bad_json': GOOD_CHAT + '\n{"messages": [\n',
            'chat_bad_role': json.dumps({'messages': [{'role': 'robot', 'content': 'x'}]}) + '\n',
            'chat_empty': '\n\n'}[case]
    edit = setter(data__train_path=write(p, text), data__format='chat')
  elif case.startswith('prefs'):
    lines = [GOOD_PAIR] * 50
    if case == 'prefs_bad_line':
      lines[2] = json.dumps({'prompt': 'hi'})
    else:
      lines[1] = 'not json'
    edit = setter(dpo__path=write(p, '\n'.join(lines) + '\n'), dpo__max_len=64,
                  dpo__max_prompt_len=32)
  elif case == 'eval_empty':
    edit = setter(eval__path=write(p, ''))
  else:
    edit = setter(eval__mc_paths=write(p, json.dumps({'context': 'a', 'choices': []}) + '\n'))
  assert message.format(p=p) in run_config(capsys, workdir, edit, stages)


@pytest.mark.parametrize('case,message', [
    ('r_kv', "holds a run with other settings (mla.r_kv 6 -> 8): refusing to resume it; use a new "
             "--workdir, or delete"),
    ('r_kv_init_only', 'holds a student made with other mla settings (mla.r_kv 6 -> 8)'),
    ('teacher', 'holds a run with other settings (teacher.path'),
])
def test_work_directory_of_another_run(capsys, workdir, tmp_path, case, message):
  if case == 'r_kv_init_only':
    os.remove(os.path.join(workdir, 'config.json'))
  if case == 'teacher':
    other = str(tmp_path / 'other.bin')
    shutil.copy(STORIES_BIN, other)
    edit = setter(teacher__path=other)
  else:
    edit = setter(mla__r_kv=8)
  assert message in run_config(capsys, workdir, edit, 'init,distill')


def test_export_target_that_is_not_empty(capsys, workdir, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  last = run_config(capsys, workdir, setter(export__out=str(out)), 'export')
  assert f'export directory {out} exists and is not empty: set export.out to a new' in last
  assert (out / 'notes.txt').read_text() == 'mine'
  from xecomla.stages.export import export_latest
  last = refuse(capsys, lambda: export_latest(workdir, str(out)), str(out))
  assert f'export directory {out} exists and is not empty: choose a new one' in last


def test_fresh_work_directory_is_not_created(capsys, tmp_path):
  require_shared_data()
  w = str(tmp_path / 'fresh')
  assert 'mla.r_kv=65' in run_config(capsys, w, setter(mla__r_kv=65))
  assert not os.path.exists(w)


# ----------------------------------------------------------------------------------------------
# The whole path: python -m xecomla.main
# ----------------------------------------------------------------------------------------------

def run_main(*args):
  r = subprocess.run([sys.executable, '-m', 'xecomla.main', STORIES_CONFIG,
                      *args], capture_output=True, text=True)
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), last
  return last


def test_cli_unknown_config_field(tmp_path):
  w = tmp_path / 'w'
  last = run_main(f'--workdir={w}', '--config.mla.no_such_field=1')
  assert last == ("error: unknown config field 'mla.no_such_field' (from "
                  "--config.mla.no_such_field=1): fix its name; --show_config lists every field")
  assert not w.exists()
  last = run_main(f'--workdir={w}', '--config.mesh.fsdpp=1')  # a near miss: ml_collections' hint
  assert last == ("error: unknown config field 'mesh.fsdpp' (from --config.mesh.fsdpp=1): fix its "
                  'name (Did you mean "fsdp" instead of "fsdpp"?); --show_config lists every field')


def test_cli_truncated_safetensors_teacher(tmp_path, hf_dirs, workdir):
  d = str(tmp_path / 'hf')
  shutil.copytree(hf_dirs[0], d)
  cut(os.path.join(d, 'model.safetensors'), 0.5)
  before = snapshot(workdir)
  last = run_main(f'--workdir={workdir}', f'--config.teacher.path={d}')
  assert 'model.safetensors is truncated: its tensor data ends at byte' in last
  assert 're-download or re-save the checkpoint' in last
  assert snapshot(workdir) == before


def test_cli_existing_work_directory_of_another_rank(workdir):
  before = snapshot(workdir)
  last = run_main(f'--workdir={workdir}', '--config.mla.r_kv=8', '--config.stages=init,distill')
  assert 'holds a run with other settings (mla.r_kv 6 -> 8)' in last
  assert snapshot(workdir) == before
