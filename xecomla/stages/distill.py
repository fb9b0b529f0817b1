"""Stage `distill`: knowledge distillation of the init student from a frozen teacher (W/distill).

The teacher is the converted Llama (teacher.path) or a larger one (distill.teacher_path) that
shares its vocabulary. Loss: kl_weight * D(teacher, student) + ce_weight * CE per target token, D
the divergence distill.divergence (forward KL by default), plus optional per-layer hidden-state
MSE (hidden_weight; same depth and width only). Starts from the aligned student when the work
directory has one (stage align), else from init's. Data: data.train_path, or stories sampled from
the teacher (data.teacher_stories, xecomla/teacher_data.py); with distill.policy_fraction, part
of every batch is sampled from the current student (on-policy, xecomla/train/onpolicy.py).
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from xecomla import (data, data_checks, eval as evaluation, fileio, hub, sharding, teacher_data,
                     workdir as wd)
from xecomla.cli import UsageError
from xecomla.convert import hf
from xecomla.models import transformer
from xecomla.models.config import MLAConfig
from xecomla.stages import evaluate
from xecomla.tokenizer import Tokenizer
from xecomla.generate import Sampling
from xecomla.train import loop, losses, onpolicy, optim, steps


def mesh_of(config):
  return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def optimizer(config, lr: float, n_steps: int):
  t = config.train
  kwargs = dict(lr=lr, steps=n_steps, warmup=t.warmup, min_lr_ratio=t.min_lr_ratio)
  return (optim.adamw(b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                      **kwargs), optim.schedule(**kwargs))


def check_vocabulary(student_dir: str, teacher_dir: str, student_vocab: int, teacher_vocab: int,
                     tokenizers: bool = True):
  """The KD teacher must predict over the student's vocabulary, token for token."""
  if student_vocab != teacher_vocab:
    raise UsageError(f'the distillation teacher {teacher_dir} has a vocabulary of {teacher_vocab} '
                     f'tokens, the student {student_vocab}: choose a teacher of the same family.')
  paths = [os.path.join(d, 'tokenizer.json') for d in (student_dir, teacher_dir)]
  if tokenizers and student_dir != teacher_dir and all(epath.Path(p).exists() for p in paths):
    vocabs = [fileio.read_json(p)['model'].get('vocab') for p in paths]
    if vocabs[0] != vocabs[1]:
      raise UsageError(f'the distillation teacher {teacher_dir} uses a different tokenizer '
                       'vocabulary than the student: choose a teacher of the same family.')


def tokenizer_dir(path: str, workdir: str | None, name: str) -> str | None:
  return wd.converted_dir(path, workdir, name) if workdir else (path if epath.Path(path).is_dir() else None)


def check_training(config, workdir: str | None, teacher, stages: list[str], chain: str):
  """What align and distill both refuse: no student to start from, a batch the mesh cannot
  split, teacher-story settings, the training data. Returns the KD teacher's LlamaConfig."""
  if workdir and 'init' not in stages and not wd.has_checkpoint(workdir, 'init'):
    raise UsageError(f'no student in {wd.stage_dir(workdir, "init")}: run the init stage first '
                     f'(config.stages={chain}).')
  t = config.train
  if t.batch_size % t.accum:
    raise UsageError(f'train.batch_size={t.batch_size} is not divisible by train.accum={t.accum}: '
                     'change one of them.')
  sharding.check_batch(t.batch_size // t.accum, mesh_of(config), 'train.batch_size / train.accum')
  kd = teacher
  if config.distill.teacher_path:  # the KD teacher, which also draws the teacher stories
    kd = wd.check_teacher(config.distill.teacher_path, '', workdir, 'kd_teacher_hf',
                          'distill.teacher_path')
  teacher_data.check(config, kd.max_seq_len)
  if config.data.teacher_stories and config.data.teacher_fraction == 1.0:
    return kd  # no text is read
  if config.data.format == 'text':
    data_checks.check_text(config.data.train_path, 'data.train_path')
  elif config.data.format == 'chat':
    data_checks.check_chat(config.data.train_path)
  else:
    raise UsageError(f"data.format={config.data.format!r} is not known: use 'text' or 'chat'.")
  return kd


def validate(config, workdir: str | None, teacher, stages: list[str]) -> None:
  """Everything distill would refuse, from cheap facts: the student's source, the KD teacher's
  vocabulary and shape, the batch against the mesh, the training data."""
  kd = check_training(config, workdir, teacher, stages, 'init,distill,...')
  d = config.distill
  if d.teacher_path:
    paths = (hub.resolve(config.teacher.path, 'teacher.path'),  # Hub ids -> their snapshots
             hub.resolve(d.teacher_path, 'distill.teacher_path'))
    dirs = [tokenizer_dir(paths[0], workdir, 'teacher_hf'),
            tokenizer_dir(paths[1], workdir, 'kd_teacher_hf')]
    check_vocabulary(dirs[0] or paths[0], dirs[1] or paths[1],
                     teacher.vocab_size, kd.vocab_size, tokenizers=all(dirs))
  if d.hidden_weight > 0 and (kd.n_layers, kd.dim) != (teacher.n_layers, teacher.dim):
    raise UsageError('distill.hidden_weight > 0 needs a teacher of the student\'s depth and width '
                     f'({teacher.n_layers} layers, dim {teacher.dim}; this one has {kd.n_layers}, '
                     f'{kd.dim}): set it to 0 for this teacher.')
  if d.loss_chunk < 0:
    raise UsageError(f'distill.loss_chunk={d.loss_chunk} is negative: use 0 (whole rows) or a '
                     'number of positions such as 512.')
  check_policy(config)


def check_policy(config) -> int:
  """The divergence settings and on-policy rows per batch (UsageError when they cannot work)."""
  d, t = config.distill, config.train
  if d.divergence not in losses.DIVERGENCES:
    raise UsageError(f'distill.divergence={d.divergence!r} is not known: use one of '
                     f'{", ".join(losses.DIVERGENCES)}.')
  if d.divergence == 'jsd' and not 0.0 < d.jsd_beta < 1.0:
    raise UsageError(f'distill.jsd_beta={d.jsd_beta} must be in (0, 1) for the generalised JSD: '
                     'use e.g. 0.5 (symmetric).')
  rows = onpolicy.policy_rows(t.batch_size, d.policy_fraction)
  if rows:
    if config.data.format != 'text':
      raise UsageError('distill.policy_fraction > 0 samples whole documents from BOS: it needs '
                       'data.format=text; set it to 0 for chat data.')
    if d.policy_temperature <= 0 or not 0.0 < d.policy_top_p <= 1.0:
      raise UsageError(f'distill.policy_temperature={d.policy_temperature} and distill.policy_top_p='
                       f'{d.policy_top_p}: the temperature must be positive, top_p in (0, 1].')
    mesh = mesh_of(config)
    sharding.check_batch(rows, mesh, 'the on-policy rows (distill.policy_fraction x batch)')
    sharding.check_batch(t.batch_size - rows, mesh, 'the data rows (batch - on-policy rows)')
  return rows


def kd_teacher_dir(config, workdir: str) -> str:
  """The KD teacher's Hugging Face directory (distill.teacher_path, else the source teacher)."""
  if not config.distill.teacher_path:
    return wd.teacher_dir(config, workdir)
  return wd.hf_dir(config.distill.teacher_path, '', workdir, 'kd_teacher_hf', 'distill.teacher_path')


def start_stage(workdir: str) -> str:
  """Where distill's student comes from: align's when it ran, else init's."""
  return 'align' if wd.has_checkpoint(workdir, 'align') else 'init'


def run(config, workdir: str) -> dict[str, Any]:
  if not wd.has_checkpoint(workdir, 'init'):
    raise UsageError(f'no student in {wd.stage_dir(workdir, "init")}: run the init stage first '
                     '(config.stages=init,distill,...).')
  train_kw, model_kw = wd.model_kwargs(config, train=True), wd.model_kwargs(config)
  student_cfg = MLAConfig.from_dict(wd.peek_meta(workdir, 'init')['model'])

  start = start_stage(workdir)

  def params(shardings):  # read when training starts, straight into the trainer's shardings
    return wd.load_student_from(workdir, start, shardings=shardings)[1]

  source_dir, kd_dir = wd.teacher_dir(config, workdir), kd_teacher_dir(config, workdir)
  teacher_cfg, teacher_params = hf.load_llama(kd_dir)
  check_vocabulary(source_dir, kd_dir, student_cfg.llama.vocab_size, teacher_cfg.vocab_size)
  d = config.distill
  if d.hidden_weight > 0 and (teacher_cfg.n_layers, teacher_cfg.dim) != (student_cfg.n_layers,
                                                                        student_cfg.llama.dim):
    raise UsageError('distill.hidden_weight > 0 needs a teacher of the student\'s depth and width; '
                     'set it to 0 for this teacher.')
  t = config.train
  if t.batch_size % t.accum:
    raise UsageError(f'train.batch_size={t.batch_size} is not divisible by train.accum={t.accum}.')
  mesh = mesh_of(config)
  sharding.check_batch(t.batch_size // t.accum, mesh, 'train.batch_size / train.accum')
  s_graph = transformer.graphdef(student_cfg, **train_kw)
  t_graph = transformer.graphdef(teacher_cfg, **model_kw)
  tx, lr_fn = optimizer(config, t.lr, t.steps)
  kd = steps.KDOptions(kl_weight=d.kl_weight, ce_weight=d.ce_weight, temperature=d.temperature,
                       hidden_weight=d.hidden_weight, chunk=d.loss_chunk,
                       divergence=d.divergence, beta=d.jsd_beta)
  trainer = steps.make_trainer(steps.kd_loss_fn(s_graph, t_graph, kd), tx, model_config=student_cfg,
                               frozen_config=teacher_cfg, mesh=mesh, accum=t.accum,
                               trainable=t.trainable, frozen_dtype=wd.frozen_dtype(config))
  tokenizer = Tokenizer(source_dir)
  llama = student_cfg.llama
  rows = check_policy(config)
  dataset = data.train_dataset(config, tokenizer, llama.bos_id,
                               teacher_data.for_config(config, workdir, kd_dir, mesh),
                               batch_size=t.batch_size - rows)
  extend = None
  if rows:
    extend = onpolicy.make_sampler(
        student_cfg, model_kw, trainer, rows=rows, seq_len=t.seq_len, seed=config.seed,
        sampling=Sampling(temperature=d.policy_temperature, top_p=d.policy_top_p))
  evaluator = None  # held-out NLL during training (the name `evaluate` is the stage module)
  if t.eval_every and config.eval.path:
    evaluator = evaluation.nll_evaluator(
        transformer.graphdef(student_cfg, **model_kw), tokenizer, config.eval.path,
        max_docs=t.eval_docs, bos_id=llama.bos_id,
        max_len=evaluate.max_len(config, llama),
        batch_rows=config.eval.batch_rows)
  spec = loop.LoopSpec(steps=t.steps, log_every=t.log_every, eval_every=t.eval_every,
                       ckpt_every=t.ckpt_every, keep=t.keep,
                       tokens_per_step=t.batch_size * t.seq_len, stop_after=t.stop_after,
                       max_nonfinite=t.max_nonfinite)
  meta = {'stage': 'distill', 'model': student_cfg.to_dict(), 'teacher': kd_dir, 'start': start,
          'config': json.loads(config.to_json_best_effort())}
  _, summary = loop.run(name='distill', stage_dir=wd.stage_dir(workdir, 'distill'), trainer=trainer,
                        model_config=student_cfg, params=params, frozen=teacher_params,
                        dataset=dataset, spec=spec, meta=meta, lr_fn=lr_fn, evaluate=evaluator,
                        extend=extend)
  return summary
