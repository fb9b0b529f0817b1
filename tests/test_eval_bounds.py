"""Evaluation and calibration rows are bounded by eval.max_len / mla.calib_len, not by the model's
maximum length (131,072 for Llama-3.x); below the bound nothing changes."""

import json
import shutil

import pytest

from tests.conftest import (TRAIN_TEXT, VALID_NLL_200, VALID_TEXT, VALID_TOKENS_200, make_hf_llama,
                            small_config, within)
from tests.test_stories260k import nll_bound
from xecomla import eval as evaluation, pipeline
from xecomla.convert import calib, hf
from xecomla.models import transformer
from xecomla.stages import evaluate, init
from xecomla.tokenizer import Tokenizer


@pytest.fixture(scope='module')
def long_llama(stories_dir, tmp_path_factory):
  """A random tiny Llama allowing 131,072 positions, with stories260K's tokenizer (vocab 512)."""
  d = str(tmp_path_factory.mktemp('long') / 'hf')
  make_hf_llama(d, vocab=512, max_pos=131072)
  shutil.copy(f'{stories_dir}/tokenizer.json', d)
  return d


def model_lengths(monkeypatch) -> list[int]:
  """Records the sequence length of every batch that reaches a Transformer (traced or eager)."""
  seen = []
  original = transformer.Transformer.__call__

  def recording(self, tokens, *args, **kwargs):
    seen.append(tokens.shape[1])
    return original(self, tokens, *args, **kwargs)

  monkeypatch.setattr(transformer.Transformer, '__call__', recording)
  return seen


def eval_config(max_len, mc_path=''):
  c = small_config()
  c.eval.max_docs = 4
  c.eval.max_len = max_len
  c.eval.mc_paths = mc_path
  c.eval.sample_tokens = 0
  return c


def test_evaluation_of_a_long_context_model_predicts_at_most_eval_max_len(long_llama, tmp_path,
                                                                          monkeypatch):
  llama, params = hf.load_llama(long_llama)
  assert llama.max_seq_len == 131072
  tok = Tokenizer(long_llama)
  context = ' '.join(evaluation.read_documents(VALID_TEXT, 3))  # ~600 tokens, cut on the left
  mc = tmp_path / 'mc.jsonl'
  mc.write_text(json.dumps({'context': context, 'choices': ['dog', 'cat'], 'label': 0}) + '\n')
  seen = model_lengths(monkeypatch)
  out = evaluate.evaluate_model(transformer.from_params(llama, params), tok,
                                eval_config(64, str(mc)), llama)
  docs = evaluation.read_documents(VALID_TEXT, 4)
  predicted = sum(min(len(ids) + 1, 65) - 1 for ids in tok.encode_batch(docs))
  assert out['eval_tokens'] == predicted and out['tasks']['mc.jsonl']['n'] == 1
  # Text rows of eval.max_len + 1 tokens; multiple-choice requests cut to 65 tokens and padded to
  # loglikelihoods' bucket of 64, i.e. 128.
  assert len(context) > 1000 and seen == [65, 128], seen


def test_a_model_shorter_than_eval_max_len_evaluates_as_before(stories_dir, monkeypatch):
  """stories260K (512 positions) under the default eval.max_len 2048: rows of 513 tokens as
  before, the documented 68,490 predicted tokens and held-out NLL of the first 200 stories."""
  llama, params = hf.load_llama(stories_dir)
  config = eval_config(2048)
  config.eval.max_docs = 200
  seen = model_lengths(monkeypatch)
  out = evaluate.evaluate_model(transformer.from_params(llama, params), Tokenizer(stories_dir),
                                config, llama)
  assert set(seen) == {llama.max_seq_len + 1} and out['eval_tokens'] == VALID_TOKENS_200
  within(abs(out['nll'] - VALID_NLL_200), nll_bound(stories_dir))


def calibrate(teacher_dir, calib_len, workdir, monkeypatch):
  seen = model_lengths(monkeypatch)
  grams = []
  original = calib.attention_input_grams
  monkeypatch.setattr(calib, 'attention_input_grams',
                      lambda *a, **k: grams.append(original(*a, **k)) or grams[-1])
  c = small_config()
  c.teacher.path, c.teacher.tokenizer = teacher_dir, ''
  c.mla.init, c.mla.calib_path, c.mla.calib_len, c.mla.calib_tokens = (
      'activation', TRAIN_TEXT, calib_len, 1024)
  c.mla.r_kv, c.mla.r_q, c.mla.d_r, c.mla.d_qk = 4, 8, 4, 4
  init.run(c, str(workdir))
  return seen, grams[0]


def test_calibration_rows_are_bounded_by_calib_len(long_llama, tmp_path, monkeypatch):
  seen, _ = calibrate(long_llama, 48, tmp_path / 'w', monkeypatch)
  assert set(seen) == {48}  # (the last batch of rows is smaller)


def test_calibration_of_a_model_shorter_than_calib_len_is_unchanged(tmp_path, stories_dir,
                                                                    monkeypatch):
  short = str(tmp_path / 'short')
  make_hf_llama(short, vocab=512, max_pos=128)
  shutil.copy(f'{stories_dir}/tokenizer.json', short)
  seen, grams = calibrate(short, 2048, tmp_path / 'w', monkeypatch)
  assert set(seen) == {128}
  llama, params = hf.load_llama(short)
  seqs = calib.calibration_seqs(Tokenizer(short), TRAIN_TEXT, llama.bos_id, llama.max_seq_len,
                                64, 1024)
  before = calib.attention_input_grams(llama, params, seqs, llama.max_seq_len)
  assert all((a == b).all() for a, b in zip(grams, before))


def test_bad_lengths_are_refused(stories_dir):
  from xecomla.cli import UsageError
  with pytest.raises(UsageError, match='eval.max_len=0'):
    pipeline.validate(eval_config(0), ['eval'])
  c = small_config()
  c.mla.init, c.mla.calib_len = 'activation', 1
  with pytest.raises(UsageError, match='mla.calib_len=1'):
    init.check_mla(c, hf.read_llama_config(stories_dir))
