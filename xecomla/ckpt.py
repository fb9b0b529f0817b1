"""Checkpoints of one stage (orbax CheckpointManager): parameters, optimiser state, the data
iterator's state and a JSON `meta` (model architecture, run config, stage facts).

Items are saved side by side, so the parameters of a training checkpoint can be read without its
optimiser state (`restore(..., items=('params', 'meta'))`). Saves are asynchronous; a save of a
step that already exists is skipped. Parameters are always restored into an abstract tree (shapes,
dtypes and, when given, shardings) built from the saved architecture.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

JSON_ITEMS = ('meta', 'data')


class StageCheckpoints:

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, *, params: Any, meta: dict, opt: Any = None, data: dict | None = None,
           force: bool = True) -> bool:
    if step in self._manager.all_steps():
      return False
    items = {'params': ocp.args.StandardSave(params), 'meta': ocp.args.JsonSave(meta)}
    if opt is not None:
      items['opt'] = ocp.args.StandardSave(opt)
    if data is not None:
      items['data'] = ocp.args.JsonSave(data)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int | None = None, *, abstract: dict[str, Any] | None = None,
              items: tuple[str, ...] = ('params', 'meta')) -> dict[str, Any]:
    """Restores `items` of `step` (default latest). `abstract` maps 'params' / 'opt' to trees of
    jax.ShapeDtypeStruct (with shardings) to restore into."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    args = {}
    for name in items:
      if name in JSON_ITEMS:
        args[name] = ocp.args.JsonRestore()
      else:
        if not abstract or name not in abstract:
          raise ValueError(f'restoring {name!r} needs its abstract tree')
        args[name] = ocp.args.StandardRestore(abstract[name])
    out = dict(self._manager.restore(step, args=ocp.args.Composite(**args)))
    out['step'] = step
    return out

  def read_meta(self, step: int | None = None) -> dict:
    return self.restore(step, items=('meta',))['meta']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs), with `shardings` if given."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
