"""Accelerator topologies by name, their chips, and (for TPUs) the devices to compile for.

  v5e:4x4, v6e:2x2           TPU v5e / v6e slices, chips as a 2D grid (hosts of 2x2 chips)
  v5p:2x2x1, v4:2x2x2        TPU v5p / v4 slices, chips as a 3D grid (hosts of 2x2x1 chips)
  h100:8, h200:8             GPUs (no compiler here: the analytic breakdown only)

TPU devices come from libtpu's compile-only client (`jax.experimental.topologies`): nothing runs
on a TPU and none is needed. One device per chip: v5e/v6e chips have one TensorCore, v5p and v4
chips are used as one megacore device (JAX's default on them).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re

from xecomla.cli import UsageError

GiB = 2 ** 30
GB = 10 ** 9

# Per-chip HBM: Google Cloud's TPU system-architecture pages (v4 32 GiB, v5e 16 GiB, v5p 95 GiB,
# v6e 32 GiB); NVIDIA's data sheets (H100 SXM 80 GB, H200 141 GB).
CHIPS = {
    'v4': dict(hbm=32 * GiB, dims=3, chip_config='megacore', kind='TPU v4', cores=2),
    'v5e': dict(hbm=16 * GiB, dims=2, chip_config='default', kind='TPU v5 lite', cores=1),
    'v5p': dict(hbm=95 * GiB, dims=3, chip_config='default', kind='TPU v5', cores=2),
    'v6e': dict(hbm=32 * GiB, dims=2, chip_config='default', kind='TPU v6 lite', cores=1),
    'h100': dict(hbm=80 * GB, kind='NVIDIA H100 80GB'),
    'h200': dict(hbm=141 * GB, kind='NVIDIA H200'),
}
FORMS = 'v5e:AxB, v6e:AxB, v5p:AxBxC, v4:AxBxC (chips) or h100:N, h200:N (GPUs)'


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str            # as given, e.g. 'v5e:4x4'
  generation: str      # a key of CHIPS
  shape: tuple[int, ...]  # chips per grid axis (GPUs: (N,))
  hbm_bytes: int       # per chip (= per device)
  kind: str

  @property
  def platform(self) -> str:
    return 'gpu' if self.generation.startswith('h') else 'tpu'

  @property
  def n_devices(self) -> int:
    return math.prod(self.shape)

  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host, as libtpu wants it: 2x2(x1), or fewer when the slice is smaller."""
    x, y = (min(2, s) for s in self.shape[:2])
    return (x, y, 1)

  def accelerator_type(self) -> str:
    """The Cloud TPU accelerator-type name (v5litepod-16, v5p-8, ...): counts chips on v5e/v6e,
    TensorCores on v5p/v4."""
    if self.generation == 'v5e':
      return f'v5litepod-{self.n_devices}'
    return f'{self.generation}-{self.n_devices * CHIPS[self.generation]["cores"]}'


def parse(name: str) -> Topology:
  """'v5e:4x4' -> Topology; an unknown or malformed name is bad input."""
  m = re.fullmatch(r'([a-z0-9]+):([0-9x]+)', (name or '').strip().lower())
  gen = m.group(1) if m else None
  if gen not in CHIPS:
    raise UsageError(f'--topology={name!r} is not known: give one of {FORMS}, e.g. v5e:4x4.')
  sizes = m.group(2).split('x')
  want = CHIPS[gen].get('dims', 1)
  if len(sizes) != want or not all(s.isdigit() and int(s) > 0 for s in sizes):
    form = {1: 'N', 2: 'AxB', 3: 'AxBxC'}[want]
    raise UsageError(f'--topology={name!r}: {gen} takes {form} with positive sizes (e.g. '
                     f'{gen}:{"x".join(["2"] * want) if want > 1 else "8"}).')
  return Topology(name=name, generation=gen, shape=tuple(int(s) for s in sizes),
                  hbm_bytes=CHIPS[gen]['hbm'], kind=CHIPS[gen]['kind'])


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def _compile_only_env(topo: Topology) -> None:
  """libtpu looks for a Cloud TPU VM's metadata and warns (TPU_ACCELERATOR_TYPE,
  TPU_WORKER_HOSTNAMES) when there is none, and takes a lock file (/tmp/libtpu_lockfile) that
  makes a second process using libtpu fail; this process only compiles, so say it is alone and
  needs no lock. Values already set are kept."""
  for key, value in (('TPU_SKIP_MDS_QUERY', '1'), ('TPU_WORKER_ID', '0'),
                     ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'),
                     ('TPU_WORKER_HOSTNAMES', 'localhost'),
                     ('TPU_ACCELERATOR_TYPE', topo.accelerator_type()),
                     ('GRPC_VERBOSITY', 'ERROR'), ('TF_CPP_MIN_LOG_LEVEL', '2')):
    os.environ.setdefault(key, value)


@functools.lru_cache(maxsize=None)
def _devices(topo: Topology) -> tuple:
  from jax.experimental import topologies
  _compile_only_env(topo)
  desc = topologies.get_topology_desc(
      platform='tpu', topology_name=f'{topo.generation}:{"x".join(str(s) for s in topo.shape)}',
      chip_config_name=CHIPS[topo.generation]['chip_config'],
      chips_per_host_bounds=topo.host_bounds(), num_slices=1)
  return tuple(desc.devices)


def devices(topo: Topology) -> list:
  """The TPU devices of a topology (libtpu's compile-only client)."""
  if topo.platform != 'tpu':
    raise UsageError(f'{topo.name} is not a TPU topology: there is no compiler for it here.')
  if not libtpu_available():
    raise UsageError(f'compiling for {topo.name} needs libtpu: pip install libtpu==0.0.42.1 (the '
                     'test extra of setup.cfg), or plan a GPU topology (analytic only).')
  try:
    found = list(_devices(topo))
  except UsageError:
    raise
  except Exception as e:  # noqa: BLE001 - libtpu refuses shapes it does not know
    msg = ' '.join(str(e).split())[:200]
    raise UsageError(f'--topology={topo.name}: libtpu cannot build it ({msg}): give a slice '
                     f'shape that exists for {topo.generation}, e.g. {topo.generation}:'
                     f'{"x".join(["2"] * len(topo.shape))}.') from e
  if len(found) != topo.n_devices:
    raise UsageError(f'--topology={topo.name} gave {len(found)} devices for {topo.n_devices} '
                     'chips: this generation is not one device per chip here.')
  return found


_LIMIT = re.compile(r'exceeds available HBM \(([0-9.]+)([KMGT])\)')
_NEEDED = re.compile(r'required for [^(]*\(([0-9.]+)([KMGT])\)')
_UNITS = {'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def parse_oom(message: str) -> tuple[int | None, int | None]:
  """(bytes required, bytes available) from the TPU compiler's RESOURCE_EXHAUSTED message, e.g.
  '... total memory required for HLO temporaries (41.64G) exceeds available HBM (15.75G).'
  The 'required' figure is the whole program's (arguments + outputs + temporaries: checked by
  compiling an argument of 6 GiB with 12 GiB of temporaries, reported as 18.00G), in GiB with two
  decimals; None where the message has no figure."""
  out = []
  for pattern in (_NEEDED, _LIMIT):
    m = pattern.search(message)
    out.append(int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None)
  return out[0], out[1]


@functools.lru_cache(maxsize=None)
def compiler_limit(topo: Topology) -> int | None:
  """The HBM the TPU compiler lets one program use per device (v5e: 15.75 GiB of 16), measured by
  compiling a program that needs twice the chip's HBM and reading the figure it refuses with."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(devices(topo)[:1]), ('x',))
  try:
    jax.jit(lambda: jnp.zeros((2 * topo.hbm_bytes,), jnp.int8),
            out_shardings=NamedSharding(mesh, P())).lower().compile()
  except Exception as e:  # noqa: BLE001 - the refusal is the measurement
    return parse_oom(str(e))[1]
  return None
