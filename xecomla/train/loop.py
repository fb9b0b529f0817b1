"""The one train loop (distillation and DPO alike): init or restore, step, log, evaluate, save.

Stage directory layout: ckpt/<step>/ (orbax: params, opt, data, meta), metrics.jsonl (one line
per logged step), tb/ (TensorBoard). A rerun with the same directory resumes from the latest
usable checkpoint (damaged ones are named in a warning, skipped and deleted), data order
included, so a run killed at any moment ends bit-identical to an uninterrupted one; a finished
stage returns its final parameters at once.

Faults: SIGTERM finishes the current step, writes its checkpoint and raises cli.Preempted (exit
75); a step with a non-finite loss or gradient is not applied (steps.py) and, after
spec.max_nonfinite of them in a row, cli.NonFiniteLoss (exit 3) with no checkpoint written
after the last good step.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from etils import epath

from xecomla import ckpt, console, data, faults, sharding
from xecomla.cli import NonFiniteLoss, Preempted
from xecomla.models import transformer
from xecomla.train.logs import MetricsLog, Progress
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
  max_nonfinite: int = 3     # stop after this many non-finite (skipped) steps in a row


def _resume(name: str, checkpoints: ckpt.StageCheckpoints, trainer: Trainer,
            abstract_params, steps: int, iterator) -> dict[str, Any] | None:
  """The latest usable checkpoint (items for resuming, or only params and meta when finished), or
  None; damaged checkpoints newer than it are deleted, so that their steps can be saved again."""
  if not checkpoints.all_steps():
    checkpoints.discard()  # saves that never finished
    return None
  abstract_state = jax.eval_shape(trainer.init_state, abstract_params)
  abstract_opt = ckpt.abstract_like({'step': abstract_state['step'],
                                     'opt_state': abstract_state['opt_state']},
                                    {'step': trainer.state_shardings['step'],
                                     'opt_state': trainer.state_shardings['opt_state']})
  try:
    restored = checkpoints.restore(
        abstract={'params': ckpt.abstract_like(abstract_params, trainer.param_shardings),
                  'opt': abstract_opt},
        items=lambda s: ('params', 'opt', 'data', 'meta') if s < steps else ('params', 'meta'),
        iterator=iterator)
  except ckpt.NoValidCheckpoint:
    logging.warning('%s: no usable checkpoint in %s: starting the stage from its input', name,
                    checkpoints.directory)
    restored = None
  for s in checkpoints.all_steps():
    if restored is None or s > restored['step']:
      logging.warning('%s: deleting unusable checkpoint %s', name, checkpoints.step_dir(s))
      checkpoints.discard(s)
  checkpoints.discard()  # saves that never finished
  return restored


def _nonfinite_message(streak: list[int], meta: dict, checkpoints: ckpt.StageCheckpoints) -> str:
  where = f'step {streak[0]}' if len(streak) == 1 else f'steps {streak[0]}-{streak[-1]}'
  section = 'dpo' if meta.get('stage') == 'dpo' else 'train'
  lr = meta.get('config', {}).get(section, {}).get('lr')
  lr_text = f' ({section}.lr={lr:g})' if isinstance(lr, (int, float)) else ''
  checkpoints.wait()
  good = checkpoints.latest_valid_step()
  last = (f'the last good checkpoint is step {good}' if good is not None else
          'no checkpoint was written: a rerun starts the stage from its input')
  return (f'non-finite loss at {where} ({len(streak)} in a row): the learning rate{lr_text} is '
          f'likely too high, or the data holds a bad batch; {last}')


def run(*, name: str, stage_dir: str, trainer: Trainer, model_config, params: Any, frozen: Any,
        dataset, spec: LoopSpec, meta: dict[str, Any], lr_fn: Callable[[int], float] | None = None,
        evaluate: Callable[[Any], dict[str, float]] | None = None,
        extend: Callable[[Any, Any, int], Any] | None = None) -> tuple[Any, dict[str, Any]]:
  """Trains `params` (a tree, or a function of the parameter shardings that reads them into
  those, called only when not resuming) for spec.steps steps (or resumes); returns (final params,
  summary). `extend(params, batch, step)`, when given, turns each data batch into the step's
  batch (on-policy distillation adds rows sampled from the current parameters)."""
  epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)  # also a gs:// work directory
  checkpoints = ckpt.StageCheckpoints(os.path.join(stage_dir, 'ckpt'), keep=spec.keep)
  abstract_params = (trainer.abstract_params if trainer.abstract_params is not None
                     else transformer.abstract_params(model_config))
  iterator: Iterator = iter(dataset)
  restored = _resume(name, checkpoints, trainer, abstract_params, spec.steps, iterator)
  if restored is not None and restored['step'] >= spec.steps:
    console.say('%s: already finished (step %d)', name, restored['step'])
    checkpoints.close()
    return restored['params'], restored['meta'].get('summary', {'steps': restored['step']})
  if restored is not None:
    start = restored['step']
    console.say('%s: resuming from step %d', name, start)
    state = {'step': restored['opt']['step'], 'params': restored['params'],
             'opt_state': restored['opt']['opt_state']}
    if isinstance(restored['data'], dict):  # a checkpoint from before grain's handler
      iterator.set_state(restored['data'])
  else:
    if callable(params):  # reads the parameters straight into their shardings
      params = params(trainer.param_shardings)
    state = trainer.init_state(sharding.put(params, trainer.param_shardings))
    start = 0
  frozen = trainer.put_frozen(frozen)  # in its storage dtype, cast on the host

  log = MetricsLog(stage_dir, start)
  progress = Progress(name, spec.steps, start)
  guard = faults.NonFiniteGuard(spec.max_nonfinite)
  timed_steps, timed_seconds = 0, 0.0
  last, logged, summary = {}, start, {'steps': start}
  t_prev = time.perf_counter()

  def log_step(step: int, metrics, eval_now: bool) -> None:
    nonlocal timed_steps, timed_seconds, t_prev, logged, last
    done = step + 1
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

  def diverged() -> NonFiniteLoss:
    message = _nonfinite_message(guard.streak, meta, checkpoints)  # waits for a save in flight
    checkpoints.close()
    log.close()
    return NonFiniteLoss(message)

  with faults.Preemption() as preemption:
    for step in range(start, spec.steps):
      batch = data.global_batch(next(iterator), trainer.batch_sharding)
      if extend is not None:
        batch = extend(state['params'], batch, step)
      state, metrics = trainer.step(state, frozen, batch)
      done = step + 1
      faults.at('inside_step', done)
      guard.push(done, metrics['skipped'])
      if guard.settle(done - 1):  # the previous step's flag, read while this one runs
        raise diverged()
      final = done == spec.steps
      interrupted = done == spec.stop_after and not final
      eval_now = (evaluate is not None and spec.eval_every > 0
                  and (done % spec.eval_every == 0 or final))
      log_now = done % spec.log_every == 0 or final or interrupted or eval_now
      if log_now:
        if guard.settle(done):
          raise diverged()
        log_step(step, metrics, eval_now)
      faults.at('after_step', done)
      preempted = preemption.requested()
      if preempted and not log_now:
        log_step(step, metrics, False)
      if done % spec.ckpt_every == 0 or final or interrupted or preempted:
        if guard.settle(done):
          raise diverged()
        summary = {'steps': done, 'last': last, 'interrupted': interrupted,
                   'mean_step_s': timed_seconds / timed_steps if timed_steps else None,
                   'tokens_per_s': (spec.tokens_per_step * timed_steps / timed_seconds
                                    if timed_steps and spec.tokens_per_step else None)}
        if guard.last_skipped and not (final or interrupted or preempted):
          logging.warning('%s: step %d was not finite: its checkpoint is not written', name, done)
        else:
          checkpoints.save(done, params=state['params'],
                           opt={'step': state['step'], 'opt_state': state['opt_state']},
                           data=iterator, meta={**meta, 'summary': summary})
      if preempted:
        checkpoints.close()
        log.close()
        raise Preempted(f'preempted at step {done}; rerun the same command to resume')
      if interrupted:
        console.say('%s: stopping at step %d (train.stop_after)', name, done)
        break
  checkpoints.close()
  log.close()
  if jax.process_count() > 1:  # global arrays: no process holds them whole
    return state['params'], summary
  return jax.tree.map(np.asarray, state['params']), summary
