"""Shared fixtures. 8 host CPU devices are forced before jax is imported, for the mesh tests."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

from configs.common import DATA  # noqa: E402

STORIES_BIN = os.path.join(DATA, 'stories260K', 'stories260K.bin')
STORIES_TOK = os.path.join(DATA, 'stories260K', 'tok512.bin')
VALID_TEXT = os.path.join(DATA, 'text', 'tinystories_valid_1000.txt')
TRAIN_TEXT = os.path.join(DATA, 'text', 'tinystories_train_2MiB.txt')
SHAKESPEARE = os.path.join(DATA, 'text', 'tinyshakespeare.txt')
PREFS = os.path.join(DATA, 'prefs', 'orca_dpo_pairs_284.jsonl')
# Facts from ../shared/data/README.md (measured with an independent numpy reader).
GREEDY_IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338,
              401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328,
              432, 358, 394, 261, 370, 432, 352]
VALID_NLL_200 = 1.2832
VALID_TOKENS_200 = 68490


def require_shared_data():
  """Skips when ../shared/data is absent, except under CI (CI=true), where that is a failure."""
  if os.path.exists(STORIES_BIN):
    return
  msg = (f'the real data {DATA} is missing (expected {STORIES_BIN}); place ../shared beside the '
         'project or set XECOMLA_DATA')
  if os.environ.get('CI', '').lower() == 'true':
    pytest.fail(msg)
  pytest.skip(msg)


@pytest.fixture(scope='session')
def stories_dir(tmp_path_factory):
  """The real stories260K converted to a Hugging Face directory (once per session)."""
  require_shared_data()
  from xecomla.convert import llama2c
  out = str(tmp_path_factory.mktemp('stories') / 'hf')
  llama2c.convert(STORIES_BIN, STORIES_TOK, out)
  return out


def make_hf_llama(directory, *, n_kv_heads=2, tie=False, rope_scaling=None, head_dim=8,
                  dtype='float32', seed=0, shard_size=None, vocab=97, layers=2, n_heads=4, dim=32,
                  max_pos=128):
  """A random tiny Hugging Face Llama saved with transformers (torch) into `directory`."""
  import torch
  import transformers
  torch.manual_seed(seed)
  rope = {'rope_type': 'default', 'rope_theta': 10000.0}
  if rope_scaling:
    rope = {'rope_theta': 500000.0, **rope_scaling}
  cfg = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=dim, intermediate_size=48, num_hidden_layers=layers,
      num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
      max_position_embeddings=max_pos, rms_norm_eps=1e-5, rope_parameters=rope,
      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # non-trivial norms, so that a wrongly mapped scale shows
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.uniform_(0.5, 1.5)
  if dtype != 'float32':
    model = model.to(getattr(torch, dtype))
  kwargs = {'max_shard_size': shard_size} if shard_size else {}
  model.save_pretrained(directory, **kwargs)
  return model


@pytest.fixture
def hf_llama(tmp_path):
  """Factory: hf_llama(**kwargs) -> (directory, torch model)."""
  counter = [0]

  def make(**kwargs):
    counter[0] += 1
    d = str(tmp_path / f'hf{counter[0]}')
    return d, make_hf_llama(d, **kwargs)

  return make
