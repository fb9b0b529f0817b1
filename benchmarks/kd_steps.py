"""The two KD steps `train_throughput --torch` compares, built without absl flags (so tests can
import them beside other benchmarks): xecomla's, as the distill stage builds it, and the same
step in PyTorch (benchmarks/torch_kd.py)."""

from __future__ import annotations

import os

from xecomla import workdir as wd
from xecomla.models import transformer
from xecomla.stages import distill
from xecomla.train import steps


def xecomla_trainer(config, teacher, student, mesh):
  """xecomla's KD step as the distill stage builds it from `config` (optimiser, KD loss, model
  options), and the learning-rate schedule."""
  tx, schedule = distill.optimizer(config, config.train.lr, config.train.steps)
  d = config.distill
  loss = steps.kd_loss_fn(transformer.graphdef(student, **wd.model_kwargs(config, train=True)),
                          transformer.graphdef(teacher, **wd.model_kwargs(config)),
                          steps.KDOptions(kl_weight=d.kl_weight, ce_weight=d.ce_weight,
                                          temperature=d.temperature, chunk=d.loss_chunk))
  trainer = steps.make_trainer(loss, tx, model_config=student, frozen_config=teacher, mesh=mesh,
                               frozen_dtype=wd.frozen_dtype(config))
  trainer.loss_fn = loss
  return trainer, schedule


def torch_side(tmp, hf_dir, student, s_params, config, schedule, *, attention='sdpa',
               adamw='fused', threads=None):
  """(the PyTorch KD step on the teacher's HF directory and an export of the student, its
  threads, torch's measured matmul peak)."""
  from benchmarks import torch_kd
  threads = torch_kd.set_threads(threads)
  kd = torch_kd.TorchKD(torch_kd.exported_student(os.path.join(tmp, 'student_hf'), student,
                                                  s_params),
                        torch_kd.hf_teacher(hf_dir, attention), config.train, config.distill,
                        schedule, adamw=adamw)
  return kd, threads, torch_kd.matmul_peak()
