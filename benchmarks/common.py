"""What every benchmark prints: the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
import time

import jax


def machine() -> dict:
  cpu = platform.processor()
  try:
    for line in open('/proc/cpuinfo'):
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  mem = None
  try:
    mem = round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30, 1)
  except (ValueError, OSError):
    pass
  gpu = None
  try:
    gpu = subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'],
                         capture_output=True, text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    pass
  return {'cpu': cpu, 'cores': os.cpu_count(), 'memory_gib': mem, 'gpu': gpu,
          'jax': jax.__version__, 'backend': jax.default_backend(),
          'devices': [str(d) for d in jax.devices()]}


def print_machine() -> dict:
  m = machine()
  print('machine:', ', '.join(f'{k}={v}' for k, v in m.items() if k != 'devices'),
        f'devices={len(m["devices"])}')
  return m


def timed(fn, n: int) -> list[float]:
  """Wall seconds of each of n calls of fn()."""
  out = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out
