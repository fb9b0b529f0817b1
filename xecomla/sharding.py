"""The device mesh (data, fsdp, tensor) and logical-axis sharding rules.

Parameters name their logical axes (`models.layers.param`); RULES map each logical axis to mesh
axes. A dimension whose size does not divide by its mesh axes, or whose mesh axes another
dimension of the same array already uses, is replicated instead, so any model runs on any mesh
(e.g. stories260K's 4 KV heads on a tensor axis of 8).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from xecomla.cli import UsageError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

RULES: tuple[tuple[str, Any], ...] = (
    ('batch', BATCH_AXES),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('head_dim', None),
    ('q_lora', None),   # sharding the MLA up-projections' rank dim over fsdp measured worse
    ('kv_lora', None),  # (v5e-16 KD step: temporaries 5.3 -> 12.4 GiB), so they are replicated
    ('qk_nope', None),
    ('qk_rope', None),
)


def mesh_shape(n: int, data: int = -1, fsdp: int = 1, tensor: int = 1) -> dict[str, int]:
  """The (data, fsdp, tensor) sizes for `n` devices: data=-1 takes what is left, and so does
  fsdp=-1 (then data=-1 means 1: every device not used by tensor shards the parameters)."""
  if tensor < 1 or (data < 1 and data != -1) or (fsdp < 1 and fsdp != -1):
    raise UsageError(f'mesh sizes must be positive (data or fsdp may be -1): got data={data}, '
                     f'fsdp={fsdp}, tensor={tensor}.')
  if fsdp == -1:
    data = 1 if data == -1 else data
    if n % (data * tensor):
      raise UsageError(f'{n} devices do not divide into data={data} x tensor={tensor}: '
                       'change mesh.data / mesh.tensor.')
    fsdp = n // (data * tensor)
  if data == -1:
    if n % (fsdp * tensor):
      raise UsageError(f'{n} devices do not divide into fsdp={fsdp} x tensor={tensor}: '
                       'change mesh.fsdp / mesh.tensor.')
    data = n // (fsdp * tensor)
  if data * fsdp * tensor != n:
    raise UsageError(f'mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} '
                     f'devices, but {n} are available: set mesh.data=-1 or sizes whose product is {n}.')
  return {'data': data, 'fsdp': fsdp, 'tensor': tensor}


def device_grid(sizes: dict[str, int], devices: Sequence[jax.Device]) -> np.ndarray:
  """The devices laid out as a (data, fsdp, tensor) grid, topology-aware (jax's mesh_utils:
  neighbouring chips on the inner axes). Devices of several slices (multislice TPU) go slice by
  slice along `data`, the only axis that crosses the slower data-centre network (DCN)."""
  from jax.experimental import mesh_utils
  shape = tuple(sizes[a] for a in MESH_AXES)
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices > 1:
    if sizes['data'] % slices:
      raise UsageError(f'{len(devices)} devices in {slices} slices: mesh.data={sizes["data"]} must '
                       f'be a multiple of {slices} (only the data axis crosses slices).')
    return mesh_utils.create_hybrid_device_mesh(
        (sizes['data'] // slices,) + shape[1:], (slices, 1, 1), devices,
        allow_split_physical_axes=True)
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:  # no physical layout for it
    logging.warning('mesh %s: no topology-aware layout (%s): devices in id order', shape, e)
    return np.asarray(sorted(devices, key=lambda d: d.id)).reshape(shape)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default all, of every process), sizes as
  `mesh_shape` gives them, laid out by `device_grid`."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(len(devices), data, fsdp, tensor)
  return jax.sharding.Mesh(device_grid(sizes, devices), MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def put(tree: Any, shardings: Any) -> Any:
  """Host (numpy) or device arrays -> global arrays with `shardings`. With several processes each
  builds only its addressable shards from its host copy (`make_array_from_callback`), instead of
  `jax.device_put`, which would compare the host data across processes leaf by leaf."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, s):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, s)  # already global: a reshard
    host = np.asarray(x)  # a local (fully addressable) array or host data: this process's copy
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(one, tree, shardings)


def _axes_size(mesh, axes) -> int:
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(shape: Sequence[int], logical: Sequence[str | None], mesh,
             rules=RULES) -> P:
  """PartitionSpec for an array of `shape` with logical axis names."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for size, name in zip(shape, logical):
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    tup = (axes,) if isinstance(axes, str) else tuple(axes)
    tup = tuple(a for a in tup if mesh.shape[a] > 1)
    if not tup or used & set(tup) or size % _axes_size(mesh, tup):
      out.append(None)
      continue
    used |= set(tup)
    out.append(tup[0] if len(tup) == 1 else tup)
  return P(*out)


def tree_shardings(abstract: Any, axes: Any, mesh, rules=RULES) -> Any:
  """NamedShardings for a tree of arrays given a tree of logical axis tuples of the same layout."""
  return jax.tree.map(lambda x, a: NamedSharding(mesh, spec_for(x.shape, a, mesh, rules)),
                      abstract, axes, is_leaf=lambda x: isinstance(x, tuple) and all(
                          isinstance(e, (str, type(None))) for e in x))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Rows over data x fsdp, the sequence axis whole."""
  axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
  return NamedSharding(mesh, P(axes if axes else None))


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
  """The rows of a global array of `shape` that this process's devices hold (one block: the mesh
  keeps each process's devices together along the batch axes)."""
  rows = [index[0].indices(shape[0])[:2] for index in
          sharding.addressable_devices_indices_map(shape).values()]
  return slice(min(r[0] for r in rows), max(r[1] for r in rows))


def batch_devices(mesh) -> int:
  """How many ways the batch axes split the rows of a batch."""
  return _axes_size(mesh, BATCH_AXES)


def check_batch(batch_size: int, mesh, what: str = 'train.batch_size') -> None:
  n = batch_devices(mesh)
  if batch_size % n:
    raise UsageError(f'{what}={batch_size} is not divisible by data x fsdp = {n} devices: '
                     'change the batch size or the mesh.')


class UnderMesh:
  """A jitted function that is traced, lowered and called under `jax.set_mesh(mesh)`, so that
  code inside it sees the mesh (e.g. Pallas attention kernels that run per device in a
  shard_map, which XLA cannot partition by itself)."""

  def __init__(self, jitted, mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)

