"""Stage `align`: layer-wise alignment of the init student before end-to-end distillation (W/align).

Every MLA layer is fitted to its teacher layer: the teacher runs over a batch once, and each
student attention gets the teacher's own normed hidden state at that layer as input and the
teacher attention's output as target (MSE per token, summed over layers: loss_fns.align_loss_fn).
Since no layer's input depends on another student layer, all layers train at once and
independently. Only attention weights train (train.trainable = attention, whatever the config
says); the rest of the student is the teacher's. align.steps steps at peak lr align.lr, with the
train section's batch, sequence length, warmup, cosine decay, AdamW and clipping, on the data
distill reads (data.train_path or the teacher's stories). Distill then starts from this student.

The teacher is the model the student was made from (teacher.path), whose layers the student's
mirror; a larger KD teacher (distill.teacher_path) is used by distill only.
"""

from __future__ import annotations

import json
from typing import Any

from xecomla import data, teacher_data, workdir as wd
from xecomla.cli import UsageError
from xecomla.convert import hf
from xecomla.models import transformer
from xecomla.models.config import MLAConfig
from xecomla.stages import distill
from xecomla.tokenizer import Tokenizer
from xecomla.train import loop, loss_fns, steps


def validate(config, workdir: str | None, teacher, stages: list[str]) -> None:
  a = config.align
  if a.steps < 1:
    raise UsageError(f'align.steps={a.steps} must be at least 1: raise it, or leave align out of '
                     'config.stages.')
  if a.lr <= 0:
    raise UsageError(f'align.lr={a.lr} must be positive: raise it (e.g. 1e-3).')
  distill.check_training(config, workdir, teacher, stages, 'init,align,distill,...')


def run(config, workdir: str) -> dict[str, Any]:
  if not wd.has_checkpoint(workdir, 'init'):
    raise UsageError(f'no student in {wd.stage_dir(workdir, "init")}: run the init stage first '
                     '(config.stages=init,align,distill,...).')
  student_cfg = MLAConfig.from_dict(wd.peek_meta(workdir, 'init')['model'])
  source_dir = wd.teacher_dir(config, workdir)
  teacher_cfg, teacher_params = hf.load_llama(source_dir)
  t, a = config.train, config.align
  mesh = distill.mesh_of(config)
  model_kw = wd.model_kwargs(config)
  tx, lr_fn = distill.optimizer(config, a.lr, a.steps)
  loss_fn = loss_fns.align_loss_fn(transformer.graphdef(student_cfg, **wd.model_kwargs(config, train=True)),
                                   transformer.graphdef(teacher_cfg, **model_kw))
  trainer = steps.make_trainer(loss_fn, tx, model_config=student_cfg, frozen_config=teacher_cfg,
                               mesh=mesh, accum=t.accum, trainable='attention',
                               frozen_dtype=wd.frozen_dtype(config))
  docs = teacher_data.for_config(config, workdir, distill.kd_teacher_dir(config, workdir), mesh)
  dataset = data.train_dataset(config, Tokenizer(source_dir), student_cfg.llama.bos_id, docs)
  spec = loop.LoopSpec(steps=a.steps, log_every=t.log_every, ckpt_every=t.ckpt_every, keep=t.keep,
                       tokens_per_step=t.batch_size * t.seq_len, max_nonfinite=t.max_nonfinite)
  meta = {'stage': 'align', 'model': student_cfg.to_dict(), 'teacher': source_dir,
          'config': json.loads(config.to_json_best_effort())}

  def params(shardings):
    return wd.load_student_from(workdir, 'init', shardings=shardings)[1]

  _, summary = loop.run(name='align', stage_dir=wd.stage_dir(workdir, 'align'), trainer=trainer,
                        model_config=student_cfg, params=params, frozen=teacher_params,
                        dataset=dataset, spec=spec, meta=meta, lr_fn=lr_fn)
  last = summary.get('last', {})
  layers = sorted(int(k[4:]) for k in last if k.startswith('mse_'))
  summary['relative_mse'] = [last[f'mse_{l}'] / last[f'target_{l}'] for l in layers
                             if last.get(f'target_{l}')]
  return summary
