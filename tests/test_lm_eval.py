"""lm-evaluation-harness, run for real on an export of the real stories260K MLA student: its `hf`
model loads the export through the remote code (trust_remote_code), scores a local
multiple-choice task (a YAML file over a JSONL of story-completion rows from the held-out
stories), and xecomla's own scorer gives the same acc and acc_norm on the same rows."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import VALID_TEXT, f32_bound, forward_ops, max_abs, small_config, within
from xecomla import eval as evaluation
from xecomla import pipeline, story_mc
from xecomla.export import import_hf
from xecomla.models import transformer
from xecomla.tokenizer import Tokenizer

TASK = 'xecomla_story_mc'
ITEMS, CHOICES = 30, 4


@pytest.fixture(scope='module')
def export_dir(init_dir, tmp_path_factory):
  """The SVD-initialised stories260K student (the session's init work directory) exported by the
  pipeline's own export stage (remote-code MLA directory)."""
  d = str(tmp_path_factory.mktemp('lm_eval') / 'w')
  shutil.copytree(init_dir, d)
  c = small_config()
  c.stages = 'export'
  return pipeline.run(c, d)['export']['path']


LM_EVAL = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
model_dir, tasks, out = sys.argv[1:]
# include_defaults=False: only the local task is indexed, not lm-eval's ~13,000 task files (7 s)
r = lm_eval.simple_evaluate(
    model='hf', model_args=f'pretrained={model_dir},trust_remote_code=True,dtype=float32',
    tasks=['%s'], task_manager=TaskManager(include_path=tasks, include_defaults=False),
    batch_size=8, device='cpu', log_samples=True)
json.dump({'results': r['results']['%s'], 'samples': r['samples']['%s']}, open(out, 'w'), default=str)
""" % (TASK, TASK, TASK)


def run_lm_eval(model_dir, rows, tmp_path):
  """lm-evaluation-harness's `hf` model (lm_eval.simple_evaluate, what `lm_eval --model hf
  --include_path` runs) on `rows` as a local YAML task, in a subprocess of its own: its results
  and per-document samples (the log-likelihood of each choice)."""
  data, tasks, out = tmp_path / 'rows.jsonl', tmp_path / 'tasks', tmp_path / 'out.json'
  data.write_text(story_mc.to_jsonl(rows), encoding='utf-8')
  tasks.mkdir()
  (tasks / f'{TASK}.yaml').write_text(story_mc.lm_eval_task(TASK, str(data)))
  env = dict(os.environ, HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_OFFLINE='1',
             HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
  r = subprocess.run([sys.executable, '-c', LM_EVAL, model_dir, str(tasks), str(out)],
                     capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.load(open(out))
  return got['results'], sorted(got['samples'], key=lambda s: s['doc_id'])


def test_lm_eval_on_the_export_gives_xecomla_acc_and_acc_norm(export_dir, tmp_path, monkeypatch):
  # the held-out stories of at most 500 characters (45 of the 1000; ~200 tokens each), to keep
  # the two scorers' forward passes short
  short = [s for s in evaluation.read_documents(VALID_TEXT) if len(s) <= 500]
  rows = story_mc.build_rows(short, items=ITEMS, choices=CHOICES)
  theirs, samples = run_lm_eval(export_dir, rows, tmp_path)
  assert theirs['sample_len'] == ITEMS and [s['doc'] for s in samples] == rows
  their_ll = np.array([[float(resp[0][0]) for resp in s['resps']] for s in samples])

  cfg, params = import_hf(export_dir)  # the very weights lm-eval loaded (read back bit-exactly)
  model, tok = transformer.from_params(cfg, params), Tokenizer(export_dir)
  path = str(tmp_path / 'rows.jsonl')
  seen = []  # the log-likelihoods xecomla's scorer computes, recorded on their way to it
  score = evaluation.loglikelihoods

  def recording(*args, **kwargs):
    seen.extend(score(*args, **kwargs))
    return list(seen)

  monkeypatch.setattr(evaluation, 'loglikelihoods', recording)
  ours = evaluation.multiple_choice(model, tok, path, bos_id=cfg.llama.bos_id)
  reqs = evaluation.continuation_requests(tok, rows, cfg.llama.bos_id, cfg.llama.max_seq_len)
  our_ll = np.array(seen)
  assert our_ll.shape == (ITEMS * CHOICES,) and len(reqs) == ITEMS * CHOICES

  # Same log-likelihoods from torch and from XLA, float32: each logit rounds within f32_bound of
  # the largest logit over the forward's reduction lengths (the longest request, the latent
  # products), a log-softmax adds the logsumexp's error (at most the largest logit error) and a sum
  # over the vocabulary, and a choice sums n_cont of them.
  longest = max(len(s) for _, _, s, _ in reqs)
  tokens, seg = evaluation.right_padded([s for _, _, s, _ in reqs], len(reqs), longest)
  logits, _ = model(jnp.asarray(tokens), None, jnp.asarray(seg))
  scale = max_abs(np.asarray(logits)[seg == 1])
  per_token = (2 * f32_bound(scale, forward_ops(cfg.llama, longest, max(cfg.r_kv) + max(cfg.r_q)))
               + f32_bound(scale, cfg.llama.vocab_size))
  for (i, j, _, n), ll in zip(reqs, our_ll):
    within(abs(ll - their_ll[i, j]), n * per_token + f32_bound(abs(ll), n))

  # acc and acc_norm: the same per-document results and counts over the same 30 items, exactly
  # (lm-eval normalises by len(choice) in characters, as xecomla does; both take numpy's argmax,
  # the first of equal scores). An argmax could differ only on an item whose two best scores are
  # closer than the two scorers' difference; the message gives the smallest gaps if that happens.
  lengths = np.array([[len(c) for c in r['choices']] for r in rows], np.float64)
  labels = np.array([r['label'] for r in rows])
  scores = {'acc': our_ll.reshape(ITEMS, CHOICES), 'acc_norm': our_ll.reshape(ITEMS, CHOICES) / lengths}
  gaps = {k: float(np.diff(np.sort(x, axis=1)[:, -2:], axis=1).min()) for k, x in scores.items()}
  note = f'smallest top-2 gaps {gaps}, largest |ll difference| {np.abs(our_ll - their_ll.ravel()).max():.2e}'
  for name, x in scores.items():
    per_doc = (np.argmax(x, axis=1) == labels).astype(float)
    assert per_doc.tolist() == [s[name] for s in samples], note
    assert ours[name] == theirs[f'{name},none'] == per_doc.mean(), note
  assert ours['acc'] != ours['acc_norm']  # the two metrics are told apart on these items
