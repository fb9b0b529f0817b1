"""Shared fixtures. 8 host CPU devices are forced before jax is imported, for the mesh tests."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# libtpu (here only to compile for TPU topologies ahead of time; no chip is used) takes
# /tmp/libtpu_lockfile per process; another jax process on the machine (a training run, a second
# test session) would make the topology tests fail with "multi-process lockfile" otherwise.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import numpy as np  # noqa: E402
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


# ----------------------------------------------------------------------------------------------
# Rounding bounds: where the tolerances of the numerical tests come from
# ----------------------------------------------------------------------------------------------

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23 ~= 1.19e-7
EPS64 = float(np.finfo(np.float64).eps)  # 2^-52 ~= 2.22e-16


def f32_bound(scale, n_ops, eps=EPS32):
  """The most that rounding alone can change a float32 result: eps * scale * n_ops.

  A sum or dot product of n terms in any order, blocking or vector width, with or without FMA,
  is within gamma_n * sum|terms| of the exact value, gamma_n ~= n * eps / 2 (Higham, Accuracy and
  Stability of Numerical Algorithms, 2nd ed., eq. 3.5); so two evaluations (another kernel, another
  CPU's instruction set, another mesh's reduction order) differ by at most n * eps * sum|terms|.
  Along a chain of operations first-order errors add, so `n_ops` is the summed reduction length on
  the path (forward_ops counts it for a transformer) and `scale` the magnitude of the values
  compared (e.g. max |logit|). This is the worst case in n; real rounding errors grow like
  sqrt(n), and the slack covers cancellation (sum|terms| > |result|) and the moderate gain between
  layers. It stays far below what a bug does: a wrong RoPE pair, a transposed or misplaced weight
  changes results by O(0.1-1) relative to `scale`.
  """
  return eps * float(scale) * n_ops


def f64_bound(scale, n_ops):
  """f32_bound for float64 arithmetic."""
  return f32_bound(scale, n_ops, EPS64)


def forward_ops(llama, seq_len, extra_per_layer=0):
  """Summed reduction length along the path to one logit of a Llama-shaped transformer.

  Per layer: RMSNorm (dim), Q/K/V (dim), scores (head_dim), softmax sum and P V (seq_len each),
  W^O (n_heads * head_dim), RMSNorm (dim), gate/up (dim), down (hidden_dim); then the final norm
  and the LM head (dim each). `extra_per_layer`: an MLA student's extra products through its
  latents (r_kv + r_q).
  """
  per_layer = (4 * llama.dim + llama.head_dim + 2 * seq_len + llama.n_heads * llama.head_dim +
               llama.hidden_dim + extra_per_layer)
  return llama.n_layers * per_layer + 2 * llama.dim


def max_abs(x):
  return float(np.max(np.abs(np.asarray(x, np.float64))))


def within(err, bound):
  """err <= bound, with both in the message; appended to $XECOMLA_TOL_LOG when set (to measure the
  margins on a machine)."""
  err, bound = float(err), float(bound)
  if os.environ.get('XECOMLA_TOL_LOG'):
    with open(os.environ['XECOMLA_TOL_LOG'], 'a') as f:
      f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{err:.3e}\t{bound:.3e}"
              f"\t{err / bound if bound else float('inf'):.3f}\n")
  assert err <= bound, f'error {err:.3e} exceeds the rounding bound {bound:.3e}'


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


# The student shape of the pipeline tests (r_kv 6 + d_r 4, pairs 0-1: the demo's until issue 13),
# pinned so that the demo's defaults can move without moving the tests' expectations.
TEST_SHAPE = 'r_kv=6,d_r=4,rope_dims=high_freq'
STORIES_CONFIG = f'--config=configs/stories260k.py:{TEST_SHAPE}'


def small_config(**train):
  """configs/stories260k.py (TEST_SHAPE) with small shapes for pipeline tests (rows of 64,
  batches of 8)."""
  from configs import stories260k
  c = stories260k.get_config(TEST_SHAPE)
  c.train.seq_len = 64
  c.train.batch_size = 8
  c.train.log_every = 2
  c.train.ckpt_every = 2
  c.eval.max_docs = 20
  c.eval.extra_paths = ''
  c.eval.sample_tokens = 8
  c.eval.story_mc = 0  # story completion is tested on its own (tests/test_story_mc.py)
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.fixture(scope='session')
def init_dir(tmp_path_factory):
  """A work directory after a real `init` of small_config() (r_kv 6 + d_r 4), made once per
  session; tests read it or copy it, never write into it."""
  require_shared_data()
  from xecomla import pipeline
  d = str(tmp_path_factory.mktemp('init') / 'w')
  c = small_config()
  c.stages = 'init'
  pipeline.run(c, d)
  return d


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
