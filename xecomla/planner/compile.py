"""The real KD and DPO train steps, built as the distill and dpo stages build them, compiled ahead
of time for a TPU topology from abstract inputs (no weights, no TPU), and the compiler's memory.

Memory per device, from `Compiled.memory_analysis()` (jaxlib's CompiledMemoryStats in jax 0.10.2:
argument_size_in_bytes, output_size_in_bytes, temp_size_in_bytes, alias_size_in_bytes,
generated_code_size_in_bytes, peak_memory_in_bytes):
  total = arguments + outputs + temporaries - aliased
where `aliased` is the output memory that reuses donated arguments (the train state: outputs
alias it, so it is counted once). The compiler's own `peak_memory_in_bytes` is reported beside
it: on single-buffer programs the two agree (checked: 6 GiB in, 6 GiB out, donated or not); on
train steps they can differ (measured: within 1% on a 13 GB step, 27% lower on the 1B student's
10 GB step, a factor of two either way on 12 MB test steps). The figure in the compiler's
refusal (RESOURCE_EXHAUSTED, "total memory required ... (41.64G) exceeds available HBM
(15.75G)") is the same sum (an argument of 6 GiB with 12 GiB of temporaries is refused as
18.00G); it is reported as the total of a program that does not compile.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from xecomla import sharding, workdir as wd
from xecomla.models import transformer
from xecomla.planner import topology
from xecomla.stages.distill import optimizer
from xecomla.train import steps


def mesh_sizes(n: int, data: int, fsdp: int, tensor: int) -> dict[str, int]:
  """sharding.make_mesh's sizes and refusals for `n` devices, without the devices (GPU plans have
  none here)."""
  return sharding.mesh_shape(n, data, fsdp, tensor)


def make_mesh(devices: list, sizes: dict[str, int]) -> jax.sharding.Mesh:
  """sharding.make_mesh over the devices in a topology-aware order (mesh_utils: neighbouring
  chips on the innermost axes), or in id order where mesh_utils has no layout for the shape."""
  from jax.experimental import mesh_utils
  shape = tuple(sizes[a] for a in sharding.MESH_AXES)
  try:
    ordered = list(np.asarray(mesh_utils.create_device_mesh(shape, devices)).reshape(-1))
  except Exception:  # noqa: BLE001 - no physical layout known for this shape: keep id order
    ordered = list(devices)
  return sharding.make_mesh(*shape, devices=ordered)


def kd_options(config) -> steps.KDOptions:
  d = config.distill
  return steps.KDOptions(kl_weight=d.kl_weight, ce_weight=d.ce_weight, temperature=d.temperature,
                         hidden_weight=d.hidden_weight, chunk=d.loss_chunk)


def kd_trainer(config, student, teacher, mesh) -> steps.Trainer:
  """distill.run's trainer for this student, teacher and mesh."""
  t = config.train
  s_graph = transformer.graphdef(student, **wd.model_kwargs(config, train=True))
  t_graph = transformer.graphdef(teacher, **wd.model_kwargs(config))
  tx, _ = optimizer(config, t.lr, t.steps)
  return steps.make_trainer(steps.kd_loss_fn(s_graph, t_graph, kd_options(config)), tx,
                            model_config=student, frozen_config=teacher, mesh=mesh,
                            accum=t.accum, trainable=t.trainable,
                            frozen_dtype=wd.frozen_dtype(config))


def dpo_trainer(config, student, mesh) -> steps.Trainer:
  """dpo.run's trainer: the policy against a frozen copy of itself."""
  d = config.dpo
  graph = transformer.graphdef(student, **wd.model_kwargs(config, train=True))
  tx, _ = optimizer(config, d.lr, d.steps)
  return steps.make_trainer(steps.dpo_loss_fn(graph, d.beta), tx, model_config=student,
                            frozen_config=student, mesh=mesh, accum=d.accum,
                            trainable=config.train.trainable,
                            frozen_dtype=wd.frozen_dtype(config))


def batch_fields(kind: str, config) -> tuple[list[str], int, int]:
  """(field names, rows, length) of a step's global batch (xecomla/data.py's layout)."""
  if kind == 'kd':
    names = ['tokens', 'positions', 'segment_ids']
    if config.data.format == 'chat':
      names.append('loss_mask')
    return names, config.train.batch_size, config.train.seq_len
  names = [p + k for p in ('chosen_', 'rejected_')
           for k in ('tokens', 'positions', 'segment_ids', 'loss_mask')]
  return names, config.dpo.batch_size, config.dpo.max_len


def abstract_inputs(trainer: steps.Trainer, kind: str, config) -> tuple:
  """(state, frozen, batch) as ShapeDtypeStructs carrying the trainer's shardings."""
  def put(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  state = jax.eval_shape(trainer.init_state, trainer.abstract_params)
  names, rows, length = batch_fields(kind, config)
  batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=trainer.batch_sharding)
           for k in names}
  return (put(state, trainer.state_shardings),
          put(trainer.abstract_frozen, trainer.frozen_shardings), batch)


def memory(stats) -> dict[str, int]:
  out = {'arguments': int(stats.argument_size_in_bytes), 'outputs': int(stats.output_size_in_bytes),
         'temporaries': int(stats.temp_size_in_bytes), 'aliased': int(stats.alias_size_in_bytes),
         'generated_code': int(stats.generated_code_size_in_bytes)}
  out['total'] = out['arguments'] + out['outputs'] + out['temporaries'] - out['aliased']
  peak = getattr(stats, 'peak_memory_in_bytes', None)
  out['peak'] = None if peak is None else int(peak)
  return out


def compile_step(trainer: steps.Trainer, inputs: tuple, mesh) -> dict[str, Any]:
  """Lowers and compiles the step for the mesh's devices: {'compiled', 'per_device_bytes',
  'lower_seconds', 'compile_seconds'} and, when the compiler refuses it for memory, 'error' and
  the figures of its message (total required, the compiler's limit)."""
  t0 = time.perf_counter()
  # The abstract mesh tells trace-time choices (models.kernels: the attention kernel) the target
  # platform; jax.set_mesh would also place trace-time constants on the TPU devices, which this
  # compile-only client cannot hold.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    lowered = trainer.step.lower(*inputs)
  t1 = time.perf_counter()
  out: dict[str, Any] = {'lower_seconds': round(t1 - t0, 2)}
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - a refusal for memory is a result; anything else is not
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    need, limit = topology.parse_oom(str(e))
    out.update(compiled=False, compile_seconds=round(time.perf_counter() - t1, 2),
               error=' '.join(str(e).split())[:400], limit_bytes=limit,
               per_device_bytes={'arguments': None, 'outputs': None, 'temporaries': None,
                                 'total': need})
    return out
  out.update(compiled=True, compile_seconds=round(time.perf_counter() - t1, 2),
             per_device_bytes=memory(compiled.memory_analysis()))
  return out


def compile_kind(kind: str, config, models: dict, mesh) -> dict[str, Any]:
  """Builds and compiles the `kind` ('kd' | 'dpo') step of a config for a mesh."""
  student = models['student']
  trainer = (kd_trainer(config, student, models['teacher'], mesh) if kind == 'kd'
             else dpo_trainer(config, student, mesh))
  return compile_step(trainer, abstract_inputs(trainer, kind, config), mesh)
