"""Distillation throughput: tokens/s and step time of the jit-compiled KD step (teacher forward +
student forward/backward + AdamW), for the real stories260K student and for random students of
Llama-3.2-1B width with as many layers as the machine holds.

  python -m benchmarks.train_throughput --model=stories260k
  python -m benchmarks.train_throughput --model=llama1b --layers=4 --batch=1 --seq_len=512

Step times exclude the first (compiling) step; the median of --steps timed steps is reported.
The step is built as the distill stage builds it from configs/common.py's defaults (attention
kernel, layer scan, KD loss chunking, frozen-teacher dtype); model-FLOPs utilisation is the model
FLOPs of the step (benchmarks/flops.py) per second against this machine's measured float32 matmul
peak, taken in the same run.
"""

from __future__ import annotations

import json
import resource
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import print_machine
from benchmarks.flops import kd_step_flops, matmul_peak
from configs.common import base_config
from xecomla import sharding, workdir as wd
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig
from xecomla.train import optim, steps

_MODEL = flags.DEFINE_enum('model', 'stories260k', ['stories260k', 'llama1b'], 'Which student.')
_LAYERS = flags.DEFINE_integer('layers', 4, 'Layers of the Llama-3.2-1B-width model.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per sequence.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps.')
_REMAT = flags.DEFINE_enum('remat', 'none', list(wd.REMAT), 'Remat policy of each block.')
_ATTENTION = flags.DEFINE_string('attention', 'auto', 'Attention kernel (model.attention).')
_SCAN = flags.DEFINE_bool('scan_layers', False, 'One scan over identical layers (model.scan_layers).')
_DATA = flags.DEFINE_string('stories', '../shared/data/stories260K', 'stories260K folder.')
_OUT = flags.DEFINE_string('out', '', 'Append the result as a JSON line to this file.')


def models():
  if _MODEL.value == 'stories260k':
    import tempfile
    from xecomla.convert import hf, llama2c
    d = tempfile.mkdtemp() + '/hf'
    llama2c.convert(f'{_DATA.value}/stories260K.bin', f'{_DATA.value}/tok512.bin', d)
    teacher, params = hf.load_llama(d)
    opts = InitOptions(r_kv=8, r_q=None, d_r=2, round_to=1)
  else:
    teacher = LlamaConfig(vocab_size=128256, dim=2048, n_layers=_LAYERS.value, n_heads=32,
                          n_kv_heads=8, head_dim=64, hidden_dim=8192, max_seq_len=2048,
                          tie_embeddings=True, rope_theta=500000.0)
    params = transformer.init_params(teacher, 0)
    opts = InitOptions(r_kv=64, r_q=1424, d_r=32)
  student, student_params, _ = upcycle(teacher, params, opts)
  return teacher, params, student, student_params


def main(argv):
  del argv
  info = print_machine()
  teacher, t_params, student, s_params = models()
  n_params = sum(x.size for x in jax.tree.leaves(s_params))
  mesh = sharding.make_mesh(-1, 1, 1)
  config = base_config()
  config.model.attention, config.model.scan_layers = _ATTENTION.value, _SCAN.value
  config.train.remat = _REMAT.value
  loss = steps.kd_loss_fn(transformer.graphdef(student, **wd.model_kwargs(config, train=True)),
                          transformer.graphdef(teacher, **wd.model_kwargs(config)),
                          steps.KDOptions(chunk=config.distill.loss_chunk))
  trainer = steps.make_trainer(loss, optim.adamw(lr=1e-4, steps=100), model_config=student,
                               frozen_config=teacher, mesh=mesh,
                               frozen_dtype=wd.frozen_dtype(config))
  t_params = jax.tree.map(lambda x: np.asarray(x).astype(wd.frozen_dtype(config)), t_params)
  state = trainer.init_state(jax.device_put(s_params, trainer.param_shardings))
  frozen = jax.device_put(t_params, trainer.frozen_shardings)
  del s_params, t_params
  b, t = _BATCH.value, _SEQ.value
  rng = np.random.default_rng(0)
  batch = jax.device_put({'tokens': rng.integers(0, teacher.vocab_size, (b, t)).astype(np.int32),
                          'positions': np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                          'segment_ids': np.ones((b, t), np.int32)}, trainer.batch_sharding)
  t0 = time.perf_counter()
  state, m = trainer.step(state, frozen, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, m = trainer.step(state, frozen, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  flops = kd_step_flops(student, teacher, b, t)
  peak = matmul_peak()
  result = {'model': _MODEL.value, 'layers': student.n_layers, 'student_params': int(n_params),
            'batch': b, 'seq_len': t, 'remat': _REMAT.value, 'attention': _ATTENTION.value,
            'scan_layers': _SCAN.value, 'first_step_s': round(compile_s, 2),
            'step_s': round(step_s, 4), 'tokens_per_s': round(b * t / step_s, 1),
            'model_flops_per_step': flops, 'matmul_peak_flops': round(peak),
            'mfu': round(flops / step_s / peak, 4),
            'peak_rss_gib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
            'loss': float(m['loss']), 'machine': info}
  print(json.dumps({k: v for k, v in result.items() if k != 'machine'}))
  if _OUT.value:
    with open(_OUT.value, 'a') as f:
      f.write(json.dumps(result) + '\n')


if __name__ == '__main__':
  app.run(main)
