"""A config's plan for a topology, as a JSON-ready dict: per step kind (kd, dpo) the analytic
breakdown, the compiler's per-device memory (TPU), whether it fits, and a mesh / micro-batch that
fits when the given one does not (planner.report renders it as text).

JSON fields: topology, platform, chip, devices, mesh {data, fsdp, tensor}, hbm_bytes (the chip's),
student / teacher (shapes and where they came from), notes, steps {kd, dpo}: each with analytic
(bytes per term and total), per_device_bytes {arguments, outputs, temporaries, aliased, total,
peak, generated_code} from the compiler (None on GPUs, or when the batch cannot be split; only
total, from the refusal, when it does not compile), limit_bytes (the compiler's limit, measured
per topology: 15.75 GiB on v5e; else the chip's HBM), fits, compile and lowering seconds, error,
suggestion; and the KD step's per_device_bytes, fits, limit_bytes, analytic and suggestion at
the top level (`step` says which). fits: TPU, the step compiled and total <= limit_bytes; GPU,
the analytic total <= hbm_bytes.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from xecomla import sharding, workdir as wd
from xecomla.cli import UsageError
from xecomla.models import kernels
from xecomla.planner import analytic, compile as aot, search, shapes, topology
from xecomla.train import steps

KINDS = ('kd', 'dpo')


def check_config(config, kinds) -> None:
  """What distill / dpo refuse about batch shapes whatever the mesh."""
  t, d = config.train, config.dpo
  if 'kd' in kinds and t.batch_size % t.accum:
    raise UsageError(f'train.batch_size={t.batch_size} is not divisible by '
                     f'train.accum={t.accum}: change one of them.')
  if 'dpo' in kinds and d.batch_size % d.accum:
    raise UsageError(f'dpo.batch_size={d.batch_size} is not divisible by dpo.accum={d.accum}: '
                     'change one of them.')
  if 'dpo' in kinds and d.max_prompt_len >= d.max_len:
    raise UsageError(f'dpo.max_prompt_len ({d.max_prompt_len}) must be below dpo.max_len '
                     f'({d.max_len}): lower it.')


def batch_problem(kind: str, config, mesh: dict[str, int]) -> str | None:
  """Why the step's micro-batch cannot be split over this mesh's data x fsdp (the stages refuse
  it: sharding.check_batch), or None. A plan reports it as a step that does not fit."""
  t = config.train
  rows, what = ((t.batch_size // t.accum, 'train.batch_size / train.accum') if kind == 'kd'
                else (config.dpo.batch_size // config.dpo.accum, 'dpo.batch_size / dpo.accum'))
  try:
    sharding.check_batch(rows, analytic.abstract_mesh(mesh), what)
  except UsageError as e:
    return str(e)
  return None


def attention_name(config, student, seq_len: int, platform: str, mesh: dict[str, int]) -> str:
  """The kernel `model.attention` means on the target platform (models.kernels.resolve)."""
  with jax.sharding.use_abstract_mesh(analytic.abstract_mesh(mesh)):  # as the step is traced
    return kernels.resolve(config.model.attention, wd.compute_dtype(config),
                           student.d_qk + student.d_r, seq_len, seq_len, platform=platform)


def step_shape(kind: str, config, models: dict, platform: str,
               mesh: dict[str, int]) -> analytic.StepShape:
  """What the analytic model needs of a step kind."""
  t, d = config.train, config.dpo
  seq = t.seq_len if kind == 'kd' else d.max_len
  return analytic.StepShape(
      kind=kind, student=models['student'],
      frozen=models['teacher'] if kind == 'kd' else models['student'],
      frozen_itemsize=jnp.dtype(wd.frozen_dtype(config)).itemsize,
      compute_itemsize=jnp.dtype(wd.compute_dtype(config)).itemsize,
      rows=t.batch_size if kind == 'kd' else d.batch_size,
      accum=t.accum if kind == 'kd' else d.accum,
      seq_len=seq, remat=wd.model_kwargs(config, train=True)['remat'],
      attention=attention_name(config, models['student'], seq, platform, mesh),
      chunk=config.distill.loss_chunk, trainable=t.trainable)


def _with(config, mesh: dict[str, int], kind: str, accum: int):
  c = config.copy_and_resolve_references()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh['data'], mesh['fsdp'], mesh['tensor']
  (c.train if kind == 'kd' else c.dpo).accum = accum
  return c


def _compiler(kind: str, config, models: dict, topo: topology.Topology, log):
  """(mesh sizes, accum) -> compile.compile_kind's result for this topology's devices."""
  devices = topology.devices(topo)

  def compile_fn(m, accum):
    log(f'compiling the {kind} step for {topo.name}, mesh {m}, accum {accum} ...')
    r = aot.compile_kind(kind, _with(config, m, kind, accum), models,
                         aot.make_mesh(devices, m))
    log(f'  {"compiled" if r["compiled"] else "refused"} in {r["compile_seconds"]} s '
        f'(lowering {r["lower_seconds"]} s)')
    return r

  return compile_fn


def plan_kind(kind: str, config, models: dict, topo: topology.Topology, mesh: dict[str, int],
              confirm: int, log: Callable[[str], None]) -> dict[str, Any]:
  """One step kind's entry of the plan: analytic terms, the compiler's figures (TPU), fits, and
  a suggestion when it does not fit."""
  shape = step_shape(kind, config, models, topo.platform, mesh)
  terms = analytic.breakdown(shape, mesh)
  micro = shape.rows // shape.accum
  out: dict[str, Any] = {'analytic': terms, 'attention': shape.attention, 'remat': shape.remat,
                         'batch': {'rows': shape.rows, 'accum': shape.accum,
                                   'seq_len': shape.seq_len, 'micro_batch': micro,
                                   'rows_per_device': micro // (mesh['data'] * mesh['fsdp'])}}
  limit, measured, compile_fn = topo.hbm_bytes, None, None
  problem = batch_problem(kind, config, mesh)
  if topo.platform == 'tpu':
    compile_fn = _compiler(kind, config, models, topo, log)
    limit = topology.compiler_limit(topo) or topo.hbm_bytes
  if problem:
    out.update(compiled=False, per_device_bytes=None, fits=False, error=problem)
  elif compile_fn is not None:
    result = compile_fn(mesh, shape.accum)
    limit = result.get('limit_bytes') or limit
    measured = result['per_device_bytes']['total']
    out.update({k: result[k] for k in ('compiled', 'per_device_bytes', 'lower_seconds',
                                       'compile_seconds', 'error') if k in result})
    out['fits'] = bool(result['compiled']) and measured <= limit
  else:
    out.update(compiled=False, per_device_bytes=None, fits=terms['total'] <= limit)
  out['limit_bytes'] = limit
  out['suggestion'] = None
  if not out['fits']:
    out['suggestion'] = search.suggest(shape, topo.n_devices, mesh['tensor'], limit, terms,
                                       measured, True, compile_fn, confirm)
  return out


def _model_summary(c, where: str) -> dict[str, Any]:
  llama = getattr(c, 'llama', c)
  out = {'from': where, 'layers': llama.n_layers, 'dim': llama.dim, 'vocab': llama.vocab_size,
         'heads': llama.n_heads, 'kv_heads': llama.n_kv_heads, 'head_dim': llama.head_dim,
         'tie_embeddings': llama.tie_embeddings,
         'params': shapes.n_params(analytic.trees(c)[0])}
  if hasattr(c, 'r_kv'):
    out.update(r_kv=c.r_kv[0], r_q=c.r_q[0], d_qk=c.d_qk, d_r=c.d_r,
               kv_fraction=round(c.kv_fraction(), 4))
  return out


def plan(config, topology_name: str, *, kinds=KINDS, confirm: int = 2,
         log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """The whole plan (see the module docstring); KD's figures also at the top level."""
  topo = topology.parse(topology_name)
  unknown = set(kinds) - set(KINDS)
  if unknown or not kinds:
    raise UsageError(f'--steps={",".join(kinds)}: choose from {", ".join(KINDS)}.')
  m = config.mesh
  mesh = aot.mesh_sizes(topo.n_devices, m.data, m.fsdp, m.tensor)
  steps.is_trainable(config.train.trainable)
  check_config(config, kinds)
  models = shapes.models(config)
  started = time.perf_counter()
  out: dict[str, Any] = {
      'topology': topo.name, 'platform': topo.platform, 'chip': topo.kind,
      'devices': topo.n_devices, 'mesh': mesh, 'hbm_bytes': topo.hbm_bytes,
      'student': _model_summary(models['student'], models['from']['student']),
      'teacher': _model_summary(models['teacher'], models['from']['teacher']),
      'notes': list(models['notes']), 'steps': {}}
  if topo.platform != 'tpu':
    out['notes'].append(f'{topo.kind}: no compiler for it here, the analytic breakdown only')
  for kind in kinds:
    out['steps'][kind] = plan_kind(kind, config, models, topo, mesh, confirm, log)
  first = out['steps']['kd' if 'kd' in kinds else kinds[0]]
  out.update(step=('kd' if 'kd' in kinds else kinds[0]),
             **{k: first[k] for k in ('per_device_bytes', 'fits', 'limit_bytes', 'analytic',
                                      'suggestion')})
  out['seconds'] = round(time.perf_counter() - started, 1)
  return out
