"""Distillation throughput: tokens/s and step time of the jit-compiled KD step (teacher forward +
student forward/backward + AdamW), for the real stories260K student and for random students of
Llama-3.2-1B width with as many layers as the machine holds.

  python -m benchmarks.train_throughput --model=stories260k
  python -m benchmarks.train_throughput --model=llama1b --layers=4 --batch=1 --seq_len=512

  python -m benchmarks.train_throughput --model=stories260k --torch     # and the PyTorch step

Step times exclude the first (compiling) step; the median of --steps timed steps is reported.
With --torch the same KD step in PyTorch (benchmarks/torch_kd.py: transformers' Llama teacher,
the exported student's own modeling file, AdamW) runs on the same batch from the same weights:
both first-step losses are recorded (they must agree: tests/test_torch_kd.py), then --rounds
rounds of --steps timed steps per side alternate (the order flips each round), so drift of a
shared machine hits both; medians over all timed steps of each side (and the fastest step of
each, less sensitive to other jobs on a shared machine).
The step is built as the distill stage builds it from configs/common.py's defaults (attention
kernel, layer scan, KD loss chunking, frozen-teacher dtype); model-FLOPs utilisation is the model
FLOPs of the step (benchmarks/flops.py) per second against this machine's measured float32 matmul
peak, taken in the same run.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import print_machine, timed
from benchmarks.kd_steps import torch_side, xecomla_trainer
from benchmarks.flops import kd_step_flops, matmul_peak
from configs.common import base_config
from xecomla import sharding, workdir as wd
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig

_MODEL = flags.DEFINE_enum('model', 'stories260k', ['stories260k', 'llama1b'], 'Which student.')
_LAYERS = flags.DEFINE_integer('layers', 4, 'Layers of the Llama-3.2-1B-width model.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per sequence.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps.')
_REMAT = flags.DEFINE_enum('remat', 'none', list(wd.REMAT), 'Remat policy of each block.')
_ATTENTION = flags.DEFINE_string('attention', 'auto', 'Attention kernel (model.attention).')
_SCAN = flags.DEFINE_bool('scan_layers', False, 'One scan over identical layers (model.scan_layers).')
_PARTS = flags.DEFINE_bool('parts', False, "Also profile each step's parts (benchmarks/kd_profile).")
_CHUNK = flags.DEFINE_integer('loss_chunk', -1, 'distill.loss_chunk (-1: the config default).')
_DATA = flags.DEFINE_string('stories', '../shared/data/stories260K', 'stories260K folder.')
_OUT = flags.DEFINE_string('out', '', 'Append the result as a JSON line to this file.')
_TORCH = flags.DEFINE_bool('torch', False, 'Also time the PyTorch KD step, interleaved.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'With --torch: alternating rounds of --steps per side.')
_THREADS = flags.DEFINE_integer('threads', 0, 'torch intra-op threads (0: all cores).')
_ADAMW = flags.DEFINE_enum('torch_adamw', 'fused', ['fused', 'foreach', 'loop'],
                           'torch AdamW implementation (fused: one kernel over all tensors).')
_TORCH_ATTN = flags.DEFINE_enum('torch_attention', 'sdpa', ['sdpa', 'eager'],
                                "The transformers teacher's attention.")


def models(tmp: str):
  """(teacher config, its params, student config, SVD-initialised student params, the teacher's
  Hugging Face directory or None)."""
  from xecomla.convert import hf, llama2c
  d = os.path.join(tmp, 'teacher_hf')
  if _MODEL.value == 'stories260k':
    llama2c.convert(f'{_DATA.value}/stories260K.bin', f'{_DATA.value}/tok512.bin', d)
    teacher, params = hf.load_llama(d)
    opts = InitOptions(r_kv=8, r_q=None, d_r=2, round_to=1)
  else:
    teacher = LlamaConfig(vocab_size=128256, dim=2048, n_layers=_LAYERS.value, n_heads=32,
                          n_kv_heads=8, head_dim=64, hidden_dim=8192, max_seq_len=2048,
                          tie_embeddings=True, rope_theta=500000.0)
    params = transformer.init_params(teacher, 0)
    opts = InitOptions(r_kv=64, r_q=1424, d_r=32)
    if _TORCH.value:
      hf.save_llama(d, teacher, params)
  student, student_params, _ = upcycle(teacher, params, opts)
  return teacher, params, student, student_params, d if os.path.isdir(d) else None


def main(argv):
  del argv
  info = print_machine()
  load_start = os.getloadavg()
  tmp = tempfile.mkdtemp()
  teacher, t_params, student, s_params, hf_dir = models(tmp)
  n_params = sum(x.size for x in jax.tree.leaves(s_params))
  mesh = sharding.make_mesh(-1, 1, 1)
  config = base_config()
  config.model.attention, config.model.scan_layers = _ATTENTION.value, _SCAN.value
  config.train.remat = _REMAT.value
  if _CHUNK.value >= 0:
    config.distill.loss_chunk = _CHUNK.value
  trainer, schedule = xecomla_trainer(config, teacher, student, mesh)
  kd = torch_side(tmp, hf_dir, student, s_params, config, schedule, attention=_TORCH_ATTN.value,
                  adamw=_ADAMW.value, threads=_THREADS.value or None) if _TORCH.value else None
  state = trainer.init_state(jax.device_put(s_params, trainer.param_shardings))
  frozen = trainer.put_frozen(t_params)
  del s_params, t_params
  b, t = _BATCH.value, _SEQ.value
  rng = np.random.default_rng(0)
  host = {'tokens': rng.integers(0, teacher.vocab_size, (b, t)).astype(np.int32),
          'positions': np.tile(np.arange(t, dtype=np.int32), (b, 1)),
          'segment_ids': np.ones((b, t), np.int32)}
  batch = jax.device_put(host, trainer.batch_sharding)
  box = {'state': state}

  def xecomla_step():
    box['state'], box['m'] = trainer.step(box['state'], frozen, batch)
    jax.block_until_ready(box['m'])

  compile_s = timed(xecomla_step, 1)[0]
  first = {'xecomla': float(box['m']['loss'])}
  sides = {'xecomla': xecomla_step}
  if kd:
    t0 = time.perf_counter()
    first['torch'] = kd[0].step(host)
    torch_first_s = time.perf_counter() - t0
    sides['torch'] = lambda: kd[0].step(host)
  times = {k: [] for k in sides}
  for r in range(_ROUNDS.value if kd else 1):
    for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
      times[name] += timed(sides[name], _STEPS.value)
  step_s = statistics.median(times['xecomla'])
  flops = kd_step_flops(student, teacher, b, t)
  peak = matmul_peak()
  result = {'model': _MODEL.value, 'layers': student.n_layers, 'student_params': int(n_params),
            'batch': b, 'seq_len': t, 'remat': _REMAT.value, 'attention': _ATTENTION.value,
            'scan_layers': _SCAN.value, 'loss_chunk': config.distill.loss_chunk,
            'first_step_s': round(compile_s, 2),
            'step_s': round(step_s, 4), 'tokens_per_s': round(b * t / step_s, 1),
            'model_flops_per_step': flops, 'matmul_peak_flops': round(peak),
            'mfu': round(flops / step_s / peak, 4),
            'peak_rss_gib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
            'loss': float(box['m']['loss']), 'best_step_s': round(min(times['xecomla']), 4),
            'step_times_s': [round(x, 4) for x in times['xecomla']]}
  if _PARTS.value:
    from benchmarks import kd_profile
    result['parts'], box['state'] = kd_profile.xecomla_parts(trainer, box['state'], frozen, batch,
                                                             _STEPS.value, teacher.vocab_size)
  if kd:
    import torch
    import transformers
    t_step = statistics.median(times['torch'])
    result['torch'] = {
        'step_s': round(t_step, 4), 'tokens_per_s': round(b * t / t_step, 1),
        'best_step_s': round(min(times['torch']), 4),
        'mfu': round(flops / t_step / peak, 4), 'first_step_s': round(torch_first_s, 2),
        'threads': kd[1], 'matmul_peak_flops': round(kd[2]), 'adamw': _ADAMW.value,
        'teacher_attention': _TORCH_ATTN.value, 'torch': torch.__version__,
        'transformers': transformers.__version__,
        'step_times_s': [round(x, 4) for x in times['torch']]}
    if _PARTS.value:
      result['torch']['parts'] = kd_profile.torch_parts(kd[0], host, _STEPS.value)
    result['ratio'] = round(t_step / step_s, 3)  # xecomla's tokens/s over torch's (medians)
    result['ratio_best'] = round(min(times['torch']) / min(times['xecomla']), 3)
    result['first_loss'] = {**first, 'abs_diff': abs(first['xecomla'] - first['torch'])}
    result['rounds'] = _ROUNDS.value
  result.update(loadavg_start=load_start, loadavg_end=os.getloadavg(), machine=info)
  print(json.dumps({k: v for k, v in result.items() if k != 'machine'}))
  if _OUT.value:
    with open(_OUT.value, 'a') as f:
      f.write(json.dumps(result) + '\n')


if __name__ == '__main__':
  app.run(main)
