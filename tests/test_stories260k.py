"""The real pre-trained stories260K (llama2.c, GQA): conversion, greedy ids, held-out NLL, tokenizer.

Figures to match come from ../shared/data/README.md (an independent numpy reader).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import (GREEDY_IDS, STORIES_BIN, STORIES_TOK, VALID_NLL_200, VALID_TEXT,
                            VALID_TOKENS_200, EPS32, f64_bound, forward_ops,
                            require_shared_data, within)
from xecomla import eval as evaluation
from xecomla import generate
from xecomla.convert import hf
from xecomla.convert.tokenizer import LlamaC2Tokenizer
from xecomla.models import transformer
from xecomla.tokenizer import Tokenizer


def nll_bound(stories_dir):
  """How far a mean NLL may sit from the README's 1.2832.

  That figure is rounded to 4 decimals (5e-5). Each token's NLL is a float32 forward whose logits
  are at most L = sqrt(dim) * max |final norm scale| * max ||embedding row|| (~112: tied head,
  normed hidden state); over a 512-token context forward_ops is ~7700, so the worst case
  (f32_bound) would be 0.2, useless as a check. A mean over 68490 tokens is a statistical
  quantity, so the probabilistic bound of Higham & Mary (SIAM J. Sci. Comput. 2019) is used
  instead: a length-n computation is within lambda * sqrt(n) * eps/2 (relative) with probability
  >= 1 - 2 exp(-lambda^2 / 2) per operation; lambda = 6. Log-softmax moves by at most twice the
  logits' error; the float32 sum of a batch's 16 * 513 token NLLs adds its own term.
  """
  config, params = hf.load_llama(stories_dir)
  logit_max = (np.sqrt(config.dim) * np.abs(params['final_norm']['scale']).max() *
               np.linalg.norm(params['embed']['embedding'], axis=1).max())
  lam, u = 6.0, EPS32 / 2
  forward = 2 * logit_max * lam * np.sqrt(forward_ops(config, config.max_seq_len)) * u
  batch_sum = VALID_NLL_200 * lam * np.sqrt(16 * (config.max_seq_len + 1)) * u
  return 5e-5 + forward + batch_sum


@pytest.fixture(scope='module')
def model_and_tok(stories_dir):
  config, params = hf.load_llama(stories_dir)
  return config, transformer.from_params(config, params), Tokenizer(stories_dir)


def test_converted_config(stories_dir):
  config = hf.read_llama_config(stories_dir)
  assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim,
          config.hidden_dim, config.vocab_size, config.max_seq_len) == (64, 5, 8, 4, 8, 172, 512, 512)
  assert config.tie_embeddings and config.norm_eps == 1e-5


def test_xecomla_greedy_decodes_the_documented_ids(model_and_tok):
  config, model, tok = model_and_tok
  out = generate.generate(model, [[1]], 40)
  assert [1] + out['tokens'][0] == GREEDY_IDS
  assert tok.decode(GREEDY_IDS).startswith('Once upon a time, there was a little girl named Lily.')


def test_transformers_greedy_decodes_the_documented_ids(stories_dir):
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
  out = model.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False)
  assert out[0].tolist() == GREEDY_IDS


def test_xecomla_heldout_nll(model_and_tok, stories_dir):
  config, model, tok = model_and_tok
  r = evaluation.evaluate_text(model, tok, VALID_TEXT, max_docs=200, bos_id=1,
                               max_len=config.max_seq_len)
  assert r['tokens'] == VALID_TOKENS_200 and r['docs'] == 200
  within(abs(r['nll'] - VALID_NLL_200), nll_bound(stories_dir))


def test_transformers_heldout_nll_by_the_same_definition(stories_dir):
  """transformers (PyTorch) on the converted directory, documents one at a time."""
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
  tok = transformers.AutoTokenizer.from_pretrained(stories_dir)
  docs = evaluation.read_documents(VALID_TEXT, 200)
  total, count = 0.0, 0
  with torch.no_grad():
    for d in docs:
      ids = tok(d)['input_ids'][:513]  # the tokenizer prepends BOS itself
      assert ids[0] == 1
      logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
      total -= logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
      count += len(ids) - 1
  assert count == VALID_TOKENS_200
  within(abs(total / count - VALID_NLL_200), nll_bound(stories_dir))


def test_fast_tokenizer_equals_llama2c_encoding_on_heldout_text(stories_dir):
  ref = LlamaC2Tokenizer.load(STORIES_TOK)
  tok = Tokenizer(stories_dir)
  docs = evaluation.read_documents(VALID_TEXT, 300)
  fast = tok.encode_batch(docs)
  for d, ids in zip(docs, fast):
    assert ids == ref.encode(d), d[:80]
    assert tok.decode(ids) == d


@pytest.mark.parametrize('text', ['', ' ', 'a', '  two leading spaces', 'tab\there\nnewline',
                                  'Ünïcödé → emoji 🙂 and 中文', 'trailing space ', 'looks like a byte <0x41> <x>'])
def test_fast_tokenizer_edge_cases(stories_dir, text):
  ref = LlamaC2Tokenizer.load(STORIES_TOK)
  tok = Tokenizer(stories_dir)
  assert tok.encode(text) == ref.encode(text)
  assert tok.decode(tok.encode(text)) == text


def test_special_token_text_is_the_special_token(stories_dir):
  # As in Hugging Face's Llama tokenizers, the literal text '<s>' is the BOS token.
  assert Tokenizer(stories_dir).encode('<s>') == [1]


def test_transformers_autotokenizer_agrees(stories_dir):
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(stories_dir)
  ref = LlamaC2Tokenizer.load(STORIES_TOK)
  text = 'Lily and Ben went to the park. They saw a big dog!'
  assert tok(text)['input_ids'] == ref.encode(text, bos=True)
  assert tok.decode(tok(text)['input_ids'], skip_special_tokens=True) == text
  assert tok.bos_token_id == 1 and tok.eos_token_id == 2


def test_llama2c_rows_permuted_to_rotate_half():
  """Interleaved-pair RoPE on the original rows == rotate-half RoPE on the permuted rows."""
  from xecomla.convert.llama2c import interleaved_to_rotate_half
  rng = np.random.default_rng(0)
  n_heads, d_h, dim = 2, 8, 16
  w = rng.normal(size=(n_heads * d_h, dim))
  x = rng.normal(size=dim)
  theta = 10000.0 ** (-np.arange(0, d_h, 2) / d_h) * 7.0  # position 7
  q = (w @ x).reshape(n_heads, d_h)
  z = (q[:, 0::2] + 1j * q[:, 1::2]) * np.exp(1j * theta)  # llama2.c: pairs (0,1), (2,3), ...
  q2 = (interleaved_to_rotate_half(w, n_heads) @ x).reshape(n_heads, d_h)
  a, b = q2[:, :d_h // 2], q2[:, d_h // 2:]
  rot = np.concatenate([a * np.cos(theta) - b * np.sin(theta), b * np.cos(theta) + a * np.sin(theta)], 1)
  # float64 throughout: products of length 16, a rotation; scale |w| |x|.
  within(np.abs(rot - np.concatenate([z.real, z.imag], 1)).max(),
         f64_bound(np.abs(w).sum(1).max() * np.abs(x).max(), 16 + 4))


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'xecomla.tools.llama2c', *args],
                        capture_output=True, text=True)


def test_cli_writes_a_directory_and_refuses_to_overwrite(tmp_path):
  require_shared_data()
  out = str(tmp_path / 'hf')
  r = run_cli(f'--checkpoint={STORIES_BIN}', f'--tokenizer={STORIES_TOK}', f'--out={out}')
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors', 'special_tokens_map.json',
                                     'tokenizer.json', 'tokenizer_config.json']
  before = os.path.getmtime(os.path.join(out, 'model.safetensors'))
  r = run_cli(f'--checkpoint={STORIES_BIN}', f'--tokenizer={STORIES_TOK}', f'--out={out}')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith('error: output directory')
  assert os.path.getmtime(os.path.join(out, 'model.safetensors')) == before


@pytest.mark.parametrize('case', ['missing_bin', 'truncated_bin', 'wrong_tokenizer'])
def test_cli_bad_input_fails_cleanly_and_writes_nothing(tmp_path, case):
  require_shared_data()
  ckpt, tok = STORIES_BIN, STORIES_TOK
  if case == 'missing_bin':
    ckpt = str(tmp_path / 'nope.bin')
  elif case == 'truncated_bin':
    ckpt = str(tmp_path / 'cut.bin')
    with open(STORIES_BIN, 'rb') as f, open(ckpt, 'wb') as g:
      g.write(f.read()[:50000])
  else:
    tok = str(tmp_path / 'tok.bin')
    with open(tok, 'wb') as g:
      g.write(b'\x07\x00\x00\x00garbage')
  out = str(tmp_path / 'hf')
  r = run_cli(f'--checkpoint={ckpt}', f'--tokenizer={tok}', f'--out={out}')
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'Traceback' not in r.stderr
  assert not os.path.exists(out) and not os.path.exists(out + '.tmp')
