"""Where the student's held-out NLL gap lies: inside the training rows' context or beyond it.

Distillation trains on rows of train.seq_len (256) tokens, cutting longer documents into pieces
that each start again at position 0, while evaluation predicts up to 512 tokens of every story
from its whole context; 32% of the 1000 held-out stories' predicted tokens have more than 256
tokens before them. This splits the held-out NLL (the README's definition, one story a row) by
the predicted token's context (positions < 256 and >= 256) and by story (the first 200, the
other 800), and by how hard each story is for the teacher (the quartiles of its per-story NLL;
how many of the first 200 fall in each), for the teacher and each student given:

  python -m experiments.stories260k.by_position --workdirs=runs/study/NAME[,...] [--stage=distill]

(a study run keeps its checkpoints only with --keep_checkpoints).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments.stories260k import report
from xecomla import eval as evaluation
from xecomla import workdir as wd
from xecomla.convert import hf
from xecomla.models import transformer
from xecomla.tokenizer import Tokenizer
from xecomla.train.losses import next_token_targets, token_log_probs

_WORKDIRS = flags.DEFINE_list('workdirs', [], 'Student work directories.')
_STAGE = flags.DEFINE_string('stage', 'distill', 'The stage whose latest checkpoint is the student.')
_TEACHER = flags.DEFINE_string('teacher', 'runs/study/teacher/teacher_hf', 'Converted teacher.')
_TEXT = flags.DEFINE_string('text', '../shared/data/text/tinystories_valid_1000.txt', 'Held-out text.')
CONTEXT, FIRST, ROWS = 256, 200, 16


def token_nlls(model, seqs: list[list[int]], length: int) -> np.ndarray:
  """[(story index, context end position, NLL)] of every predicted token, one story a row."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state, tokens, positions, segment_ids):
    logits, _ = nnx.merge(graphdef, state)(tokens, positions, segment_ids)
    targets, weights = next_token_targets(tokens, segment_ids)
    return -token_log_probs(logits, targets), weights

  out = []
  for i in range(0, len(seqs), ROWS):
    rows = {k: np.zeros((ROWS, length), np.int32) for k in ('tokens', 'positions', 'segment_ids')}
    for r, s in enumerate(seqs[i:i + ROWS]):
      rows['tokens'][r, :len(s)] = s
      rows['positions'][r, :len(s)] = np.arange(len(s))
      rows['segment_ids'][r, :len(s)] = 1
    nll, w = (np.asarray(x) for x in f(state, *(jnp.asarray(rows[k]) for k in rows)))
    for r in range(min(ROWS, len(seqs) - i)):
      out += [(i + r, t, nll[r, t]) for t in np.nonzero(w[r] > 0)[0]]
  return np.asarray(out, np.float64)


def split(a: np.ndarray) -> dict[str, tuple[float, int]]:
  """Mean NLL and token count of each part: all, by context, by story, and both."""
  story, pos, nll = a[:, 0], a[:, 1], a[:, 2]
  ctx = {'': True, f'context <{CONTEXT}': pos < CONTEXT, f'context >={CONTEXT}': pos >= CONTEXT}
  stories = {'': True, f'first {FIRST}': story < FIRST, 'the rest': story >= FIRST}
  out = {}
  for sn, sm in stories.items():
    for cn, cm in ctx.items():
      m = np.broadcast_to(np.asarray(sm) & np.asarray(cm), nll.shape)
      out[', '.join(x for x in (sn, cn) if x) or 'all'] = (float(nll[m].mean()), int(m.sum()))
  return out


def by_difficulty(teacher: np.ndarray, models: dict[str, np.ndarray]) -> list[list]:
  """Rows per quartile of the teacher's per-story NLL: the quartile, its stories (of them in the
  first FIRST), its tokens, then each model's token-weighted NLL there (teacher first)."""
  stories = teacher[:, 0].astype(int)
  n = np.bincount(stories)
  per_story = np.bincount(stories, teacher[:, 2]) / np.maximum(n, 1)
  quartile = np.digitize(per_story, np.quantile(per_story[n > 0], [0.25, 0.5, 0.75]))
  sums = [np.bincount(a[:, 0].astype(int), a[:, 2], len(n)) for a in models.values()]  # per story
  rows = []
  for q in range(4):
    mask = (quartile == q) & (n > 0)
    rows.append([q + 1, f'{int(mask.sum())} ({int(mask[:FIRST].sum())})', f'{int(n[mask].sum()):,}']
                + [f'{s[mask].sum() / n[mask].sum():.4f}' for s in sums])
  return rows


def main(argv):
  del argv
  llama, params = hf.load_llama(_TEACHER.value)
  seqs = evaluation.encode_documents(Tokenizer(_TEACHER.value),
                                     evaluation.read_documents(_TEXT.value), llama.bos_id,
                                     llama.max_seq_len)
  models = {'teacher': transformer.from_params(llama, params)}
  for w in _WORKDIRS.value:
    cfg, p, _ = wd.load_student_from(w, _STAGE.value)
    models[w] = transformer.from_params(cfg, p)
  nlls = {n: token_nlls(m, seqs, llama.max_seq_len + 1) for n, m in models.items()}
  res = {n: split(a) for n, a in nlls.items()}
  print(report.table(['part', 'tokens', *res], [
      [k, f'{count:,}'] + [f'{res[n][k][0]:.4f}' for n in res]
      for k, (_, count) in res['teacher'].items()]))
  print(report.table(['teacher NLL quartile (1 = easiest)', f'stories (in the first {FIRST})',
                      'tokens', *nlls], by_difficulty(nlls['teacher'], nlls)))


if __name__ == '__main__':
  app.run(main)
