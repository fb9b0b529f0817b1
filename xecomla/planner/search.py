"""Meshes and micro-batches that fit: every (data / fsdp / tensor split, accum) of the device
count and batch is ranked with the analytic model, calibrated on the compiler's figure for the
given mesh, and the best few are confirmed by compiling them. Candidates with the given tensor
size come first; other tensor sizes come after (the only way to split a batch smaller than the
device count).

Calibration: the exact terms (parameters, optimiser, gradients, frozen model, batch) are kept and
the activation estimate is scaled by (compiler total - exact terms) / estimate at the given mesh,
so a candidate's prediction is exact terms + scale * its activation estimate (activations scale
with rows per device, the exact terms with 1 / fsdp). Ranking: the given tensor size first
(then the smallest other), then most rows per data x fsdp shard per micro-step (fewest
accumulation steps), then the smallest fsdp (least communication).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from xecomla.planner import analytic

MARGIN = 0.95   # a prediction must leave 5% of the limit free to be tried


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def candidates(n_devices: int, rows: int, accum_free: bool) -> list[tuple[dict, int]]:
  """(mesh sizes, accum) pairs whose micro-batch divides over data x fsdp, for every tensor size;
  accum stays 1 where accum_free is False."""
  out = []
  for tensor in divisors(n_devices):
    for fsdp in divisors(n_devices // tensor):
      mesh = {'data': n_devices // tensor // fsdp, 'fsdp': fsdp, 'tensor': tensor}
      for accum in divisors(rows) if accum_free else [1]:
        if (rows // accum) % (mesh['data'] * fsdp) == 0:
          out.append((mesh, accum))
  return out


def activation_sum(terms: dict[str, int]) -> int:
  return terms['total'] - analytic.static_bytes(terms)


def calibration(terms: dict[str, int], measured_total: int | None) -> float:
  """The factor that makes the activation estimate match the compiler's total (1 without one)."""
  act = activation_sum(terms)
  if measured_total is None or act <= 0:
    return 1.0
  return max(measured_total - analytic.static_bytes(terms), 0) / act


def rank(shape: analytic.StepShape, n_devices: int, tensor: int, limit: int, scale: float,
         accum_free: bool) -> list[dict[str, Any]]:
  """Candidates predicted to fit, best first, each {'mesh', 'accum', 'micro_batch',
  'rows_per_device', 'predicted_total', 'analytic'}."""
  found = []
  for mesh, accum in candidates(n_devices, shape.rows, accum_free):
    s = dataclasses.replace(shape, accum=accum)
    terms = analytic.breakdown(s, mesh)
    predicted = int(analytic.static_bytes(terms) + scale * activation_sum(terms))
    if predicted <= MARGIN * limit:
      micro = shape.rows // accum
      found.append({'mesh': mesh, 'accum': accum, 'micro_batch': micro,
                    'rows_per_device': micro // (mesh['data'] * mesh['fsdp']),
                    'predicted_total': predicted, 'analytic': terms})
  return sorted(found, key=lambda c: (c['mesh']['tensor'] != tensor, c['mesh']['tensor'],
                                      -c['rows_per_device'], c['mesh']['fsdp'], c['accum']))


def suggest(shape: analytic.StepShape, n_devices: int, tensor: int, limit: int,
            given_terms: dict[str, int], measured_total: int | None, accum_free: bool,
            confirm: Callable[[dict, int], dict] | None, tries: int) -> dict[str, Any] | None:
  """The best candidate that fits: with `confirm` ((mesh, accum) -> compile result), the first of
  the ranked ones whose compile fits, trying at most `tries`; else the best prediction.
  `given_terms` is the analytic breakdown at the given mesh, `measured_total` the compiler's."""
  ranked = rank(shape, n_devices, tensor, limit, calibration(given_terms, measured_total),
                accum_free)
  if not ranked:
    return None
  if confirm is None or tries <= 0:
    return {**ranked[0], 'confirmed': False}
  tried = []
  for c in ranked[:tries]:
    result = confirm(c['mesh'], c['accum'])
    total = result['per_device_bytes']['total']
    fits = bool(result.get('compiled')) and total is not None and total <= limit
    tried.append({'mesh': c['mesh'], 'accum': c['accum'], 'total': total, 'fits': fits})
    if fits:
      return {**c, 'confirmed': True, 'compile': result, 'tried': tried}
  return {**ranked[0], 'confirmed': False, 'tried': tried}

