"""The one train loop (distillation and DPO alike): init or restore, step, log, evaluate, save.

Stage directory layout: ckpt/<step>/ (orbax: params, opt, data, meta), metrics.jsonl (one line
per logged step), tb/ (TensorBoard). A rerun with the same directory resumes from the latest
checkpoint, data order included; a finished stage returns its final parameters at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from xecomla import ckpt, data
from xecomla.models import transformer
from xecomla.train.steps import Trainer


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  steps: int
  log_every: int = 10
  eval_every: int = 0
  ckpt_every: int = 200
  keep: int = 2
  tokens_per_step: int = 0   # positions per step (batch x seq_len), for throughput
  stop_after: int = 0        # end this run (with a checkpoint) once this step is reached; 0 = never


class Progress:
  """One status line: a live bar on a terminal, a plain line per log step otherwise."""

  def __init__(self, name: str, total: int, start: int):
    self.name, self.total, self.start = name, total, start
    self.t0 = time.perf_counter()
    self.tty = sys.stderr.isatty()

  def update(self, step: int, text: str) -> None:
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / max(done, 1) * (self.total - step)
    width = 24
    bar = '#' * int(width * step / max(self.total, 1))
    line = (f'[{self.name}] {step}/{self.total} [{bar:<{width}}] {text} | '
            f'ETA {int(eta // 60)}m{int(eta % 60):02d}s')
    if self.tty:
      sys.stderr.write('\r' + line[:200])
      if step >= self.total:
        sys.stderr.write('\n')
    else:
      sys.stderr.write(line + '\n')
    sys.stderr.flush()


class MetricsLog:
  """metrics.jsonl (rewritten up to the resumed step, so a resumed run has no duplicates) and
  TensorBoard scalars."""

  def __init__(self, stage_dir: str, resume_step: int):
    self.path = os.path.join(stage_dir, 'metrics.jsonl')
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [l for l in f if l.strip() and json.loads(l).get('step', 0) <= resume_step]
    with open(self.path, 'w') as f:
      f.writelines(kept)
    self._tb = None
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(stage_dir, 'tb'))
    except ImportError:  # TensorBoard logging is optional
      logging.warning('tensorboardX is not installed: no TensorBoard logs')

  def write(self, step: int, values: dict[str, float]) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **values}) + '\n')
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def run(*, name: str, stage_dir: str, trainer: Trainer, model_config, params: Any, frozen: Any,
        dataset, spec: LoopSpec, meta: dict[str, Any], lr_fn: Callable[[int], float] | None = None,
        evaluate: Callable[[Any], dict[str, float]] | None = None) -> tuple[Any, dict[str, Any]]:
  """Trains `params` for spec.steps steps (or resumes); returns (final params, summary)."""
  os.makedirs(stage_dir, exist_ok=True)
  checkpoints = ckpt.StageCheckpoints(os.path.join(stage_dir, 'ckpt'), keep=spec.keep)
  latest = checkpoints.latest_step()
  abstract_params = ckpt.abstract_like(transformer.abstract_params(model_config),
                                       trainer.param_shardings)
  iterator: Iterator = iter(dataset)
  if latest is not None:
    abstract_state = jax.eval_shape(trainer.init_state, transformer.abstract_params(model_config))
    abstract_opt = ckpt.abstract_like({'step': abstract_state['step'],
                                       'opt_state': abstract_state['opt_state']},
                                      {'step': trainer.state_shardings['step'],
                                       'opt_state': trainer.state_shardings['opt_state']})
    items = ('params', 'opt', 'data', 'meta') if latest < spec.steps else ('params', 'meta')
    restored = checkpoints.restore(latest, abstract={'params': abstract_params, 'opt': abstract_opt},
                                   items=items)
    if latest >= spec.steps:
      logging.info('%s: already finished (step %d)', name, latest)
      checkpoints.close()
      return restored['params'], restored['meta'].get('summary', {'steps': latest})
    logging.info('%s: resuming from step %d', name, latest)
    state = {'step': restored['opt']['step'], 'params': restored['params'],
             'opt_state': restored['opt']['opt_state']}
    iterator.set_state(restored['data'])
    start = latest
  else:
    state = trainer.init_state(jax.device_put(params, trainer.param_shardings))
    start = 0
  frozen = jax.device_put(frozen, trainer.frozen_shardings)

  log = MetricsLog(stage_dir, start)
  progress = Progress(name, spec.steps, start)
  timed_steps, timed_seconds = 0, 0.0
  last, logged = {}, start
  t_prev = time.perf_counter()
  for step in range(start, spec.steps):
    batch = data.global_batch(next(iterator), trainer.batch_sharding)
    state, metrics = trainer.step(state, frozen, batch)
    done = step + 1
    final = done == spec.steps
    interrupted = done == spec.stop_after and not final
    eval_now = (evaluate is not None and spec.eval_every > 0
                and (done % spec.eval_every == 0 or final))
    if done % spec.log_every == 0 or final or interrupted or eval_now:
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.perf_counter()
      interval, n_steps = now - t_prev, done - logged
      if logged > start:  # the first interval includes compilation: not timed
        timed_steps += n_steps
        timed_seconds += interval
      t_prev, logged = now, done
      values['step_s'] = interval / n_steps
      if spec.tokens_per_step:
        values['tokens_per_s'] = spec.tokens_per_step * n_steps / interval
      if lr_fn is not None:
        values['lr'] = float(lr_fn(step))
      if eval_now:
        values.update({f'eval_{k}': v for k, v in evaluate(state['params']).items()})
        t_prev = time.perf_counter()
      log.write(done, values)
      last = values
      shown = ' '.join(f'{k} {values[k]:.4g}' for k in ('loss', 'eval_nll', 'reward_accuracy')
                       if k in values)
      speed = f" | {values['tokens_per_s'] / 1e3:.1f}k tok/s" if 'tokens_per_s' in values else ''
      progress.update(done, shown + speed)
    if done % spec.ckpt_every == 0 or final or interrupted:
      summary = {'steps': done, 'last': last, 'interrupted': interrupted,
                 'mean_step_s': timed_seconds / timed_steps if timed_steps else None,
                 'tokens_per_s': (spec.tokens_per_step * timed_steps / timed_seconds
                                  if timed_steps and spec.tokens_per_step else None)}
      checkpoints.save(done, params=state['params'],
                       opt={'step': state['step'], 'opt_state': state['opt_state']},
                       data=iterator.get_state(), meta={**meta, 'summary': summary})
    if interrupted:
      logging.info('%s: stopping at step %d (train.stop_after)', name, done)
      break
  checkpoints.close()
  log.close()
  final_params = jax.tree.map(np.asarray, state['params'])
  return final_params, summary
