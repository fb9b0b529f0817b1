"""Compile time and step time of the KD step, blocks as a Python loop or under one lax.scan, for a
random MLA student of Llama-3.2-1B width (dim 2048, 32 query / 8 KV heads of 64, MLP 8192; r_kv 64,
r_q 1424, d_qk 32, d_r 32) and a teacher of the same shape, with a small tied vocabulary.

  python -m benchmarks.compile_time --layers=16 --scan_layers=false --steps=0   # compile only
  python -m benchmarks.compile_time --layers=4 --scan_layers=true --steps=5     # and step time
  python -m benchmarks.compile_time --topology=v5e:2x2 --dtype=bfloat16        # TPU compiler (libtpu)

Compilation is ahead of time from abstract inputs (`jax.jit(step).lower(...).compile()`, nothing
allocated), so any depth compiles here, also for a TPU topology through libtpu on a CPU host (the
step sharded fsdp over all its chips); step time needs the real parameters, optimiser state and
teacher in memory (about 30 bytes per student parameter), so fewer layers. The median of --steps
timed steps is reported, after one untimed step.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import print_machine
from xecomla import sharding
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig, MLAConfig
from xecomla.train import optim, steps

_LAYERS = flags.DEFINE_integer('layers', 16, 'Layers of student and teacher.')
_VOCAB = flags.DEFINE_integer('vocab', 2048, 'Vocabulary (tied embeddings).')
_BATCH = flags.DEFINE_integer('batch', 1, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per sequence.')
_SCAN = flags.DEFINE_bool('scan_layers', True, 'One lax.scan over the blocks (else a Python loop).')
_REMAT = flags.DEFINE_enum('remat', 'full', list(transformer.REMAT_POLICIES), 'Student remat policy.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_STEPS = flags.DEFINE_integer('steps', 0, 'Timed steps (0: compile only).')
_TOPOLOGY = flags.DEFINE_string('topology', '', 'Compile for this TPU topology (e.g. v5e:2x2).')
_OUT = flags.DEFINE_string('out', 'benchmarks/results/compile_time.jsonl', 'Append JSON here.')


def configs(layers: int, vocab: int) -> tuple[LlamaConfig, MLAConfig]:
  teacher = LlamaConfig(vocab_size=vocab, dim=2048, n_layers=layers, n_heads=32, n_kv_heads=8,
                        head_dim=64, hidden_dim=8192, max_seq_len=2048, tie_embeddings=True,
                        rope_theta=500000.0)
  student = MLAConfig(llama=teacher, r_kv=(64,) * layers, r_q=(1424,) * layers, d_r=32, d_qk=32,
                      d_v=64, rope_pairs=(None,) * layers)
  return teacher, student


def mesh_for(topology: str):
  if not topology:
    return sharding.make_mesh(-1, 1, 1)
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(platform='tpu', topology_name=topology,
                                         chip_config_name='default', chips_per_host_bounds=(2, 2, 1),
                                         num_slices=1).devices
  return sharding.make_mesh(1, len(devices), 1, devices=devices)


def main(argv):
  del argv
  info = print_machine()
  teacher, student = configs(_LAYERS.value, _VOCAB.value)
  dtype = jnp.dtype(_DTYPE.value)
  kw = {'dtype': dtype, 'scan_layers': _SCAN.value}
  loss = steps.kd_loss_fn(transformer.graphdef(student, remat=_REMAT.value, **kw),
                          transformer.graphdef(teacher, **kw), steps.KDOptions())
  trainer = steps.make_trainer(loss, optim.adamw(lr=1e-4, steps=100), model_config=student,
                               frozen_config=teacher, mesh=mesh_for(_TOPOLOGY.value))
  b, t = _BATCH.value, _SEQ.value
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  batch_abs = {'tokens': tokens, 'positions': tokens, 'segment_ids': tokens}
  state_abs = jax.eval_shape(trainer.init_state, transformer.abstract_params(student))
  t0 = time.perf_counter()
  lowered = trainer.step.lower(state_abs, transformer.abstract_params(teacher), batch_abs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  result = {'layers': _LAYERS.value, 'vocab': _VOCAB.value, 'batch': b, 'seq_len': t,
            'scan_layers': _SCAN.value, 'remat': _REMAT.value, 'dtype': _DTYPE.value,
            'topology': _TOPOLOGY.value or None,
            'lower_s': round(t1 - t0, 2), 'compile_s': round(t2 - t1, 2),
            'temp_gib': round(mem.temp_size_in_bytes / 2 ** 30, 3),
            'argument_gib': round(mem.argument_size_in_bytes / 2 ** 30, 3)}
  if _STEPS.value and not _TOPOLOGY.value:
    state = trainer.init_state(jax.device_put(transformer.init_params(student, 0),
                                              trainer.param_shardings))
    frozen = jax.device_put(transformer.init_params(teacher, 1), trainer.frozen_shardings)
    rng = np.random.default_rng(0)
    batch = jax.device_put({'tokens': rng.integers(0, teacher.vocab_size, (b, t)).astype(np.int32),
                            'positions': np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                            'segment_ids': np.ones((b, t), np.int32)}, trainer.batch_sharding)
    state, m = compiled(state, frozen, batch)  # untimed: first-touch allocations
    jax.block_until_ready(m)
    times = []
    for _ in range(_STEPS.value):
      t0 = time.perf_counter()
      state, m = compiled(state, frozen, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    result.update(step_s=round(statistics.median(times), 3), steps=len(times),
                  loss=float(m['loss']))
  result['load_avg_1m'] = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
  print(json.dumps(result))
  if _OUT.value:
    with open(_OUT.value, 'a') as f:
      f.write(json.dumps({**result, 'machine': info}) + '\n')


if __name__ == '__main__':
  app.run(main)
