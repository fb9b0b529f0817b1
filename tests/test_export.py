"""Export to Hugging Face (remote code and native deepseek_v3), import back, multiple choice."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.conftest import f32_bound, forward_ops, max_abs, within
from xecomla import eval as evaluation
from xecomla import generate
from xecomla.convert import hf
from xecomla.convert.safetensors_io import CheckpointError
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.export import deepseek_incompatibility, export_hf, import_hf
from xecomla.models import transformer
from xecomla.tokenizer import Tokenizer


@pytest.fixture(scope='module')
def teacher(stories_dir):
  return hf.load_llama(stories_dir)


def student(teacher, **opts):
  llama, params = teacher
  cfg, p, _ = upcycle(llama, params, InitOptions(round_to=1, **opts))
  rng = np.random.default_rng(0)
  for l in range(cfg.n_layers):  # non-trivial latent norm scales
    if 'kv_norm' in p['layers'][l]['attn']:
      p['layers'][l]['attn']['kv_norm']['scale'] = rng.uniform(0.5, 1.5, cfg.r_kv[l]).astype(np.float32)
  return cfg, p


def compare(cfg, params, directory, remote=True):
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=remote,
                                                            dtype=torch.float32).eval()
  tokens = np.random.default_rng(1).integers(0, 512, (2, 128))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  ours, _ = transformer.from_params(cfg, params)(jnp.asarray(tokens))
  # Two float32 implementations (torch and XLA) of the same student, 128 positions.
  latent = max(cfg.r_kv) + max(r or 0 for r in cfg.r_q)
  within(np.abs(ref - np.asarray(ours)).max(), f32_bound(max_abs(ref), forward_ops(cfg.llama, 128, latent)))
  out = model.generate(torch.tensor([[1, 403, 407]]), max_new_tokens=24, do_sample=False)
  assert out[0, 3:].tolist() == generate.generate(transformer.from_params(cfg, params),
                                                  [[1, 403, 407]], 24)['tokens'][0]
  return model


@pytest.mark.parametrize('rope_dims', ['paper', 'high_freq', 'low_freq', 'uniform', 'norm'])
def test_remote_code_export_matches_xecomla_with_per_layer_ranks(teacher, stories_dir, tmp_path,
                                                                 rope_dims):
  cfg, params = student(teacher, d_r=4, kv_budget=0.2, rope_dims=rope_dims, r_q=48,
                        latent_norm=rope_dims == 'norm')
  assert len(set(cfg.r_kv)) > 1  # per-layer ranks
  d = export_hf(str(tmp_path / 'hf'), cfg, params, stories_dir)
  assert sorted(os.listdir(d)) == sorted(['config.json', 'model.safetensors', 'tokenizer.json',
                                          'tokenizer_config.json', 'special_tokens_map.json',
                                          'generation_config.json', 'configuration_xecomla.py',
                                          'modeling_xecomla.py'])
  model = compare(cfg, params, d)
  with torch.no_grad():  # the transformers cache holds only the latent and the shared RoPE key
    out = model(torch.tensor([[1, 5, 9, 11]]), use_cache=True)
  for l, layer in enumerate(out.cache.layers):
    assert tuple(layer.keys.shape) == (1, 1, 4, cfg.r_kv[l])
    assert tuple(layer.values.shape) == (1, 1, 4, cfg.d_r)


def test_uncompressed_query_export(teacher, stories_dir, tmp_path):
  cfg, params = student(teacher, r_kv=8, d_r=2, r_q=None)
  compare(cfg, params, export_hf(str(tmp_path / 'hf'), cfg, params, stories_dir))


def test_native_deepseek_v3_export_needs_no_remote_code(teacher, stories_dir, tmp_path):
  # d_r = 4: two RoPE pairs, so DeepSeek's interleaved order differs from xecomla's rotate-half
  cfg, params = student(teacher, r_kv=8, d_r=4, r_q=32, latent_norm=True)
  assert deepseek_incompatibility(cfg) is None
  d = export_hf(str(tmp_path / 'ds'), cfg, params, stories_dir, deepseek=True)
  written = json.load(open(os.path.join(d, 'config.json')))
  assert (written['model_type'], written['rope_interleave']) == ('deepseek_v3', True)
  assert not any(f.endswith('.py') for f in os.listdir(d))
  model = compare(cfg, params, d, remote=False)
  assert type(model).__name__ == 'DeepseekV3ForCausalLM'


def test_deepseek_export_refuses_incompatible_students(teacher, stories_dir, tmp_path):
  cfg, params = student(teacher, r_kv=8, d_r=2, latent_norm=False)
  with pytest.raises(CheckpointError, match='always normalises the latents'):
    export_hf(str(tmp_path / 'ds'), cfg, params, stories_dir, deepseek=True)
  assert not os.path.exists(tmp_path / 'ds')
  cfg, params = student(teacher, d_r=2, kv_budget=0.2, latent_norm=True)
  assert 'one r_kv' in deepseek_incompatibility(cfg)


@pytest.mark.parametrize('deepseek', [False, True])
def test_round_trip_gives_identical_parameters(teacher, stories_dir, tmp_path, deepseek):
  cfg, params = student(teacher, r_kv=8, d_r=4, r_q=40, latent_norm=True)  # 2 RoPE pairs
  d = export_hf(str(tmp_path / 'x'), cfg, params, stories_dir, deepseek=deepseek)
  cfg2, params2 = import_hf(d)
  assert cfg2 == cfg
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)


def test_export_never_overwrites(teacher, stories_dir, tmp_path):
  cfg, params = student(teacher, r_kv=8, d_r=2)
  d = export_hf(str(tmp_path / 'x'), cfg, params, stories_dir)
  with pytest.raises(CheckpointError, match='exists and is not empty'):
    export_hf(d, cfg, params, stories_dir)


def test_multiple_choice_equals_a_hand_computation_of_lm_eval_acc(stories_dir, tmp_path):
  rows = [
      {'context': 'Lily went to the park. She saw a big',
       'choices': ['dog', 'elephant in the sky', 'tree', 'dog with a red ball'], 'label': 2},
      {'context': 'Tom was sad because his toy',
       'choices': ['broke', 'was very happy and sang', 'flew', 'was broken and he cried'], 'label': 3},
      {'context': 'The sun was', 'choices': ['hot', 'shining bright in the sky', 'purple and loud'],
       'label': 1},
  ]
  path = tmp_path / 'mc.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  config, params = hf.load_llama(stories_dir)
  ours = evaluation.multiple_choice(transformer.from_params(config, params), Tokenizer(stories_dir),
                                    str(path), bos_id=1)
  # By hand with transformers: loglikelihood of ' ' + choice after the context (the continuation is
  # what the whole string's tokens add to the context's), argmax, and argmax of ll / len(choice).
  model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
  tok = transformers.AutoTokenizer.from_pretrained(stories_dir)
  acc = acc_norm = 0
  for r in rows:
    ctx = tok(r['context'], add_special_tokens=False)['input_ids']
    lls = []
    for c in r['choices']:
      whole = tok(r['context'] + ' ' + c, add_special_tokens=False)['input_ids']
      seq = [1] + whole
      n = len(whole) - len(ctx)
      with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
      lls.append(sum(logp[i - 1, seq[i]].item() for i in range(len(seq) - n, len(seq))))
    acc += int(np.argmax(lls) == r['label'])
    acc_norm += int(np.argmax(np.array(lls) / [len(c) for c in r['choices']]) == r['label'])
  assert ours['acc'] == acc / 3 and ours['acc_norm'] == acc_norm / 3  # counts over 3: the same division
  assert ours['n'] == 3
  assert ours['acc'] != ours['acc_norm']  # the fixture separates the two metrics


def test_all_rope_student_exports_and_round_trips(teacher, stories_dir, tmp_path):
  cfg, params = student(teacher, r_kv=2, d_r=8, r_q=None, rope_dims='high_freq', rope_key='fit')
  assert cfg.d_qk == 0
  d = export_hf(str(tmp_path / 'hf'), cfg, params, stories_dir)
  compare(cfg, params, d)
  cfg2, params2 = import_hf(d)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)
