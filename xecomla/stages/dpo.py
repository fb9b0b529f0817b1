"""Stage `dpo`: sigmoid DPO of the latest student (distill, else init) against a frozen copy of
itself, on preference pairs (W/dpo). The last dpo.eval_pairs pairs are held out for the reward
metrics reported before and after."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from flax import nnx

from xecomla import data, data_checks, sharding, workdir as wd
from xecomla.cli import UsageError
from xecomla.models import transformer
from xecomla.stages.distill import mesh_of, optimizer
from xecomla.tokenizer import Tokenizer
from xecomla.train import loop, loss_fns, losses, steps


def pair_logps_fn(graphdef):
  """(params, batch) -> summed response log-probs of chosen and rejected, [B] each (one forward
  of the [2B, T] pair batch)."""
  return jax.jit(lambda params, b: loss_fns.pair_logps(nnx.merge(graphdef, params), b))


def reward_evaluator(graphdef, ref_params, pairs: list[dict[str, np.ndarray]], beta: float,
                     batch: int = 8):
  """params -> held-out DPO metrics against the frozen reference (its log-probs computed once),
  plus `logp_accuracy`: how often the policy itself finds the chosen response more likely."""
  f = pair_logps_fn(graphdef)
  n = len(pairs) - len(pairs) % batch or len(pairs)
  batches = [data.stack(pairs[i:i + batch]) for i in range(0, n, batch)]
  refs = [f(ref_params, b) for b in batches]

  def evaluate(params):
    pc, pr, rc, rr = [], [], [], []
    for b, (c0, r0) in zip(batches, refs):
      c, r = f(params, b)
      pc.append(c), pr.append(r), rc.append(c0), rr.append(r0)
    pc, pr, rc, rr = (np.concatenate([np.asarray(x) for x in v]) for v in (pc, pr, rc, rr))
    loss, chosen, rejected = (np.asarray(x) for x in losses.dpo_losses(pc, pr, rc, rr, beta))
    return {'loss': float(loss.mean()), 'reward_accuracy': float(np.mean(chosen > rejected)),
            'margin': float(np.mean(chosen - rejected)), 'chosen_reward': float(chosen.mean()),
            'rejected_reward': float(rejected.mean()), 'logp_accuracy': float(np.mean(pc > pr))}

  return evaluate


def validate(config, workdir: str | None, teacher, stages: list[str]) -> None:
  d = config.dpo
  if (workdir and not {'init', 'distill'} & set(stages)
      and not wd.has_checkpoint(workdir, 'init') and not wd.has_checkpoint(workdir, 'distill')):
    raise UsageError(f'no student to align in {workdir}: run init (and distill) before dpo.')
  if not d.path:
    raise UsageError('dpo.path is empty: set it to a preference JSONL file.')
  if d.max_prompt_len >= d.max_len:
    raise UsageError(f'dpo.max_prompt_len ({d.max_prompt_len}) must be below dpo.max_len '
                     f'({d.max_len}): lower it.')
  if d.max_len > teacher.max_seq_len + 1:
    raise UsageError(f'dpo.max_len={d.max_len} exceeds the model\'s maximum length '
                     f'{teacher.max_seq_len}: lower it.')
  pairs = data_checks.check_preferences(d.path)
  if pairs <= d.eval_pairs + d.batch_size:
    raise UsageError(f'{d.path} has {pairs} pairs: too few for dpo.eval_pairs={d.eval_pairs} '
                     f'held out plus a batch of {d.batch_size}; lower them or add pairs.')
  if d.accum < 1 or d.batch_size % d.accum:
    raise UsageError(f'dpo.batch_size={d.batch_size} is not divisible by dpo.accum={d.accum}: '
                     'change one of them.')
  sharding.check_batch(d.batch_size // d.accum, mesh_of(config), 'dpo.batch_size / dpo.accum')


def run(config, workdir: str) -> dict[str, Any]:
  found = wd.latest_student(workdir, before='dpo')
  if found is None:
    raise UsageError('no student to align: run init (and distill) before dpo.')
  d, t = config.dpo, config.train
  if not d.path:
    raise UsageError('dpo.path is empty: set it to a preference JSONL file.')
  stage, student_cfg, params, _ = found
  train_kw, model_kw = wd.model_kwargs(config, train=True), wd.model_kwargs(config)
  llama = student_cfg.llama
  if d.max_len > llama.max_seq_len + 1:
    raise UsageError(f'dpo.max_len={d.max_len} exceeds the model\'s maximum length '
                     f'{llama.max_seq_len}: lower it.')
  tokenizer = Tokenizer(wd.teacher_dir(config, workdir))
  pairs = data.preference_examples(tokenizer, d.path, bos_id=llama.bos_id, max_len=d.max_len,
                                   max_prompt_len=d.max_prompt_len)
  if len(pairs) <= d.eval_pairs + d.batch_size:
    raise UsageError(f'{d.path} has {len(pairs)} pairs: too few for dpo.eval_pairs={d.eval_pairs} '
                     f'held out plus a batch of {d.batch_size}.')
  train_pairs, eval_pairs = pairs[:len(pairs) - d.eval_pairs], pairs[len(pairs) - d.eval_pairs:]
  mesh = mesh_of(config)
  sharding.check_batch(d.batch_size // d.accum, mesh, 'dpo.batch_size / dpo.accum')
  graphdef = transformer.graphdef(student_cfg, **train_kw)
  tx, lr_fn = optimizer(config, d.lr, d.steps)
  trainer = steps.make_trainer(steps.dpo_loss_fn(graphdef, d.beta), tx, model_config=student_cfg,
                               frozen_config=student_cfg, mesh=mesh, accum=d.accum,
                               trainable=t.trainable, frozen_dtype=wd.frozen_dtype(config))
  # The held-out rewards are measured against the reference the policy trains against: the
  # same parameters in the same storage dtype.
  reference = trainer.put_frozen(params)
  evaluate = reward_evaluator(transformer.graphdef(student_cfg, **model_kw), reference, eval_pairs,
                              d.beta) if d.eval_pairs else None
  before = evaluate(params) if evaluate else {}
  spec = loop.LoopSpec(steps=d.steps, log_every=t.log_every, eval_every=t.eval_every or d.steps,
                       ckpt_every=t.ckpt_every, keep=t.keep, stop_after=t.stop_after,
                       max_nonfinite=t.max_nonfinite)
  meta = {'stage': 'dpo', 'model': student_cfg.to_dict(), 'reference': stage,
          'config': json.loads(config.to_json_best_effort())}
  final, summary = loop.run(name='dpo', stage_dir=wd.stage_dir(workdir, 'dpo'), trainer=trainer,
                            model_config=student_cfg, params=params, frozen=params,
                            dataset=data.preference_dataset(train_pairs, batch_size=d.batch_size,
                                                            seed=config.seed),
                            spec=spec, meta=meta, lr_fn=lr_fn, evaluate=evaluate)
  return {**summary, 'heldout_before': before,
          'heldout_after': evaluate(final) if evaluate else {}, 'reference': stage,
          'pairs': {'train': len(train_pairs), 'heldout': len(eval_pairs)}}
