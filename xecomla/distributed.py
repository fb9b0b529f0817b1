"""Several processes, one job: `jax.distributed` set up before any other jax call, and who writes.

  python -m xecomla.main ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I

With the three flags, process I of N joins the job whose process 0 serves the coordinator at
HOST:PORT. Without them, jax's own cluster detection (`jax._src.clusters`: Cloud TPU VMs through
their metadata or TPU_WORKER_HOSTNAMES, SLURM through SLURM_JOB_ID / SLURM_NTASKS / SLURM_PROCID
..., Open MPI through OMPI_MCA_orte_hnp_uri) decides: `jax.distributed.initialize()` is called
only when a cluster with more than one process is detected, so a single-process run is unchanged.

When one process dies, the coordination service misses its heartbeats for `heartbeat_timeout`
seconds and the others end with jax's "another task died" error instead of waiting for it in a
collective (tests/test_multihost.py measures the time to exit). `initialization_timeout` bounds
the wait for every process to join.

Only process 0 writes reports, metrics, TensorBoard, results and exports (`is_writer`); orbax
checkpoints are written collectively: every process calls save and restore.
"""

from __future__ import annotations

import dataclasses
import os

from xecomla.cli import UsageError

CPU_COLLECTIVES = 'gloo'  # cross-process collectives of the CPU backend (tests, CPU clusters)


@dataclasses.dataclass(frozen=True)
class Options:
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout: int = 300   # seconds for every process to join
  heartbeat_timeout: int = 60         # seconds without a heartbeat before a process counts as dead
  shutdown_timeout: int = 60          # seconds a finishing process waits for the others at exit


def check(o: Options) -> None:
  """The flags together, or none of them; each in range."""
  given = [o.coordinator_address is not None, o.num_processes is not None,
           o.process_id is not None]
  if any(given) and not all(given):
    raise UsageError('--coordinator_address, --num_processes and --process_id go together: give '
                     'all three, or none (Cloud TPU VMs and SLURM are detected by jax).')
  if o.coordinator_address is not None:
    host, _, port = o.coordinator_address.rpartition(':')
    if not host or not port.isdigit():
      raise UsageError(f'--coordinator_address={o.coordinator_address!r} is not HOST:PORT: give '
                       'e.g. 10.0.0.1:1234 (process 0 serves it).')
    if o.num_processes < 1 or not 0 <= o.process_id < o.num_processes:
      raise UsageError(f'--process_id={o.process_id} must be in 0..{o.num_processes - 1} and '
                       f'--num_processes={o.num_processes} at least 1: fix them.')
  for name in ('initialization_timeout', 'heartbeat_timeout', 'shutdown_timeout'):
    if getattr(o, name) < 1:
      raise UsageError(f'--{name}={getattr(o, name)} must be at least 1 second: raise it.')


def detected_cluster() -> str | None:
  """The name of the cluster jax would initialise from with no arguments (several processes
  only), or None. Opt-in methods (mpi4py) are not tried, as jax does not try them either."""
  from jax._src import clusters
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if env.opt_in_only_method:
      continue
    try:
      if env.is_env_present() and env.get_process_count() > 1:
        return env.__name__
    except Exception:  # noqa: BLE001 - a half-present environment is not a cluster to join
      continue
  return None


def initialize(o: Options = Options()) -> bool:
  """Joins the job (before any other jax call); returns whether there are several processes."""
  check(o)
  import jax
  explicit = o.coordinator_address is not None
  if (not explicit and detected_cluster() is None) or o.num_processes == 1:
    return False  # one process: unchanged
  if 'JAX_CPU_COLLECTIVES_IMPLEMENTATION' not in os.environ:
    jax.config.update('jax_cpu_collectives_implementation', CPU_COLLECTIVES)
  jax.distributed.initialize(o.coordinator_address, o.num_processes, o.process_id,
                             initialization_timeout=o.initialization_timeout,
                             heartbeat_timeout_seconds=o.heartbeat_timeout,
                             shutdown_timeout_seconds=o.shutdown_timeout)
  return jax.process_count() > 1


def is_writer() -> bool:
  """Whether this process writes the run's files (reports, metrics, results, exports): process
  0 only. Checkpoints are not guarded by this: orbax writes them with every process."""
  import jax
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all arrive (no-op with one process): e.g. after process 0
  wrote a file the others read."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
