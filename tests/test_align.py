"""Stage `align` on the real stories260K model: each student attention fitted to the teacher's on
the teacher's own hidden states; only attention weights move; distill starts from its student."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tests.conftest import f32_bound, forward_ops, max_abs, small_config, within
from xecomla import pipeline, workdir as wd
from xecomla.convert import hf
from xecomla.models import transformer
from xecomla.train import loss_fns


def batch(seq=32):
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, 512, (2, seq)), jnp.int32)
  seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 12], 2, 0), jnp.int32)
  pos = jnp.asarray(np.repeat([list(range(20)) + list(range(12))], 2, 0), jnp.int32)
  return {'tokens': tokens, 'positions': pos, 'segment_ids': seg}


def test_teacher_attention_io_follows_the_teacher_forward(init_dir):
  llama, params = hf.load_llama(os.path.join(init_dir, 'teacher_hf'))
  teacher = transformer.from_params(llama, params)
  b = batch()
  _, inputs, outputs = loss_fns.teacher_attention_io(teacher, b)
  _, _, hidden = teacher(b['tokens'], b['positions'], b['segment_ids'], return_hidden=True)
  x = teacher.embed(b['tokens'])
  bound = f32_bound(max_abs(hidden), forward_ops(llama, 32))
  for l, block in enumerate(teacher.layers):
    within(max_abs(inputs[l] - block.attn_norm(x)), bound)
    x = x + outputs[l]
    x = x + block.mlp(block.mlp_norm(x))
    within(max_abs(x - hidden[l]), bound)  # the block's output, rebuilt from the recorded pieces


def test_align_trains_attention_only_and_distill_starts_from_it(init_dir, tmp_path):
  w = str(tmp_path / 'w')
  shutil.copytree(init_dir, w)
  c = small_config(steps=2)
  c.stages = 'align'
  c.align.steps = 6
  c.align.lr = 3e-3
  out = pipeline.run(c, w)['align']
  assert out['steps'] == 6 and len(out['relative_mse']) == 5
  _, before, _ = wd.load_student_from(w, 'init')
  _, after, _ = wd.load_student_from(w, 'align')
  flat_b, flat_a = traverse_util.flatten_dict(before), traverse_util.flatten_dict(after)
  for k in flat_b:
    same = np.array_equal(flat_b[k], flat_a[k])
    assert same == ('attn' not in k), k  # attention moved, nothing else did

  # the objective on held-aside rows is lower after alignment than at the SVD start
  llama, teacher = hf.load_llama(os.path.join(w, 'teacher_hf'))
  cfg = wd.load_student_from(w, 'init')[0]
  fn = loss_fns.align_loss_fn(transformer.graphdef(cfg), transformer.graphdef(llama))
  b = batch()
  t_out = fn.prepare(teacher, b)
  assert float(fn.loss(after, t_out, b)[0]) < float(fn.loss(before, t_out, b)[0])

  c.stages = 'distill'
  pipeline.run(c, w)
  assert wd.checkpoints(w, 'distill').read_meta()['start'] == 'align'
  assert wd.latest_student(w)[0] == 'distill'
  assert wd.latest_student(w, before='distill')[0] == 'align'
