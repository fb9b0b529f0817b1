"""How every stage builds a model from the config: the compute dtype, the storage dtype of frozen
models, the attention kernel, the layer scan and the remat policy (one-line errors for unknown
names)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from xecomla.cli import UsageError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


REMAT = ('none', 'full', 'dots_saveable')


def compute_dtype(config) -> Any:
  if config.dtype not in DTYPES:
    raise UsageError(f'dtype {config.dtype!r} is not supported: use float32 or bfloat16.')
  return DTYPES[config.dtype]


def frozen_dtype(config) -> Any:
  """Storage dtype of a frozen model (KD teacher, DPO reference): `auto` = the compute dtype."""
  name = config.train.frozen_dtype
  if name == 'auto':
    return compute_dtype(config)
  if name not in DTYPES:
    raise UsageError(f'train.frozen_dtype {name!r} is not supported: use auto, float32 or bfloat16.')
  return DTYPES[name]


def model_kwargs(config, *, train: bool = False) -> dict[str, Any]:
  """How every stage builds a model from the config: compute dtype, attention kernel, layer scan
  and, for a trained model, the remat policy."""
  from xecomla.models import attention
  if config.model.attention not in attention.IMPLEMENTATIONS:
    raise UsageError(f'model.attention={config.model.attention!r} is not known: use one of '
                     f'{", ".join(attention.IMPLEMENTATIONS)}.')
  kwargs = {'dtype': compute_dtype(config), 'attention': config.model.attention,
            'scan_layers': bool(config.model.scan_layers)}
  if train:
    remat = {True: 'full', False: 'none'}.get(config.train.remat, config.train.remat)
    if remat not in REMAT:
      raise UsageError(f'train.remat={config.train.remat!r} is not known: use one of '
                       f'{", ".join(REMAT)}.')
    kwargs['remat'] = remat
  return kwargs
