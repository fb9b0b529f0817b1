"""Checkpoints of one stage (orbax CheckpointManager): parameters, optimiser state, the data
iterator's state and a JSON `meta` (model architecture, run config, stage facts).

Items are saved side by side, so the parameters of a training checkpoint can be read without its
optimiser state (`restore(..., items=('params', 'meta'))`). Saves are asynchronous; a save of a
step that already exists is skipped. Parameters are always restored into an abstract tree (shapes,
dtypes and, when given, shardings) built from the saved architecture.

Damaged checkpoints. Every save records a manifest (MANIFEST: the size of every file of every
item) inside the step directory before orbax commits it (orbax's post-finalization callback runs
before the atomic rename), so a committed step always carries its manifest. `restore()` of the
latest step checks a step before reading it: the commit marker is there, every manifest file is
there with its size, every wanted item is there; then orbax reads it (its own checks: metadata,
array shapes, OCDBT manifests). A step that fails either is named in a one-line warning and the
previous one is tried; with none left, NoValidCheckpoint (a FileNotFoundError: exit status 2 on
the command line) names them all. Sizes, not hashes: truncation, half-written saves and missing
items change sizes or existence, which costs a stat per file; a sha256 would also catch same-size
bit rot but reads every byte twice (save and restore), minutes for a multi-GB optimiser state.
Orphaned orbax tmp directories (a save that never finished) are ignored, with a warning.

Paths. `directory` may be a gs:// URI: orbax writes and reads it itself (tensorstore), and it is
passed to orbax unchanged (a local path is made absolute; a URI never is, which would turn
'gs://b/w' into a local folder './gs:/b/w'). This module's own listing, tmp-directory cleanup
and manifest go through etils.epath. orbax 0.12.8 lists the steps of a gs:// directory only with
`google-cloud-storage` installed (it asks the bucket whether it has a hierarchical namespace).
"""

from __future__ import annotations

import fnmatch
import os
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint
from absl import logging
from jax.experimental import multihost_utils

from xecomla import faults, fileio
from xecomla.ckpt_manifest import COMMIT, MANIFEST, check_step_dir, manifest_of  # noqa: F401

JSON_ITEMS = ('meta', 'data')
TMP = '.orbax-checkpoint-tmp'


class NoValidCheckpoint(FileNotFoundError):
  """A stage directory holds checkpoints, but none of them can be read."""


def _quiet_closed_loop_callbacks() -> None:
  """After orbax fails to read a damaged array, tensorstore completes the step's other reads into
  orbax's event loop, already closed: each prints a 'RuntimeError: Event loop is closed'
  traceback through sys.excepthook, long after the failure was handled. Drop just those."""
  previous = sys.excepthook
  if getattr(previous, 'xecomla_quiet', False):
    return

  def hook(kind, value, tb):
    if not (kind is RuntimeError and str(value) == 'Event loop is closed'):
      previous(kind, value, tb)

  hook.xecomla_quiet = True
  sys.excepthook = hook


class StageCheckpoints:

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    directory = os.fspath(directory)
    self.directory = os.path.abspath(directory) if fileio.is_local(directory) else directory
    self._saving: int | None = None
    self._async = async_save
    self._warned: set[str] = set()
    self._json_data = False  # whether 'data' is (restored, so saved) as JSON, not grain's item
    async_options = (ocp.AsyncOptions(post_finalization_callback=self._before_commit)
                     if async_save else None)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save,
                                             async_options=async_options))

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _matching(self, pattern: str, under: str | None = None) -> list[str]:
    """Sorted paths of the entries of `under` (default the stage directory) whose names match
    `pattern` (as glob.glob, hidden names too only for a pattern starting with '.'), through
    epath: one listing, also on gs://."""
    d = epath.Path(under or self.directory)
    if not d.is_dir():
      return []
    hidden = pattern.startswith('.')
    return sorted(os.fspath(p) for p in d.iterdir()
                  if fnmatch.fnmatch(p.name, pattern) and (hidden or not p.name.startswith('.')))

  def latest_step(self) -> int | None:
    """The newest committed step, damaged or not (see latest_valid_step)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """Steps with a step directory (orbax's, plus any without a commit marker)."""
    on_disk = [int(p.name) for p in epath.Path(self.directory).iterdir() if p.name.isdigit()]
    return sorted(set(self._manager.all_steps()) | set(on_disk))

  def check(self, step: int, items: tuple[str, ...] = ()) -> str | None:
    return check_step_dir(self.step_dir(step), items)

  def latest_valid_step(self, items: tuple[str, ...] = ()) -> int | None:
    return next((s for s in reversed(self.all_steps()) if self.check(s, items) is None), None)

  # -- saving ------------------------------------------------------------------------------------

  def _before_commit(self) -> None:
    """orbax's post-finalization callback: every item is written, the step not yet committed
    (renamed from its tmp directory). Records the manifest inside it, so it commits with it."""
    step = self._saving
    try:
      if step is not None and jax.process_index() == 0:
        dirs = self._matching(f'{step}{TMP}*')
        target = dirs[-1] if dirs else self.step_dir(step)
        fileio.atomic_write_json(os.path.join(target, MANIFEST), manifest_of(target))
    except OSError as e:  # never fail the save over its manifest: orbax's checks still apply
      logging.warning('checkpoint %d: no manifest written (%s)', step, e)
    if step is not None:
      faults.at('during_save', step)

  def save(self, step: int, *, params: Any, meta: dict, opt: Any = None, data: Any = None,
           force: bool = True) -> bool:
    if step in self._manager.all_steps():
      return False
    items = {'params': ocp.args.StandardSave(params), 'meta': ocp.args.JsonSave(meta)}
    if opt is not None:
      items['opt'] = ocp.args.StandardSave(opt)
    if data is not None:  # a grain iterator: one state file per process (grain's handler)
      if self._json_data and not isinstance(data, dict):  # orbax keeps an item's first handler
        data = data.get_state()
      items['data'] = (ocp.args.JsonSave(data) if isinstance(data, dict)
                       else grain_checkpoint.CheckpointSave(data))
    self._manager.wait_until_finished()
    self._saving = step
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved and not self._async:  # synchronous: already committed
      d = self.step_dir(step)
      if jax.process_index() == 0 and epath.Path(d).is_dir():
        fileio.atomic_write_json(os.path.join(d, MANIFEST), manifest_of(d))
    return saved

  def discard(self, step: int | None = None) -> None:
    """Deletes a (damaged) step and any unfinished save of it, so that it can be written again;
    with no step, every unfinished save. Only the first process deletes; all wait for it."""
    pattern = f'*{TMP}*' if step is None else f'{step}{TMP}*'
    dirs = self._matching(pattern)
    if step is not None:
      dirs.append(self.step_dir(step))
    if jax.process_index() == 0:
      for d in dirs:
        try:
          epath.Path(d).rmtree(missing_ok=True)
        except OSError as e:  # as shutil.rmtree(ignore_errors=True): orbax's reload still runs
          logging.warning('checkpoint %s could not be deleted (%s)', d, e)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'xecomla_discard_{step}')
    self._manager.reload()

  # -- restoring ---------------------------------------------------------------------------------

  def _restore_args(self, step: int, abstract: dict[str, Any] | None, items: tuple[str, ...],
                    iterator: Any = None) -> dict[str, Any]:
    args = {}
    for name in items:
      grain_files = self._matching('process_*-of-*.json', os.path.join(self.step_dir(step), name))
      if name == 'data' and iterator is not None and grain_files:
        args[name] = grain_checkpoint.CheckpointRestore(iterator)  # sets its state in place
      elif name in JSON_ITEMS:  # meta, and the data state of checkpoints from before grain's
        args[name] = ocp.args.JsonRestore()
        self._json_data = self._json_data or name == 'data'  # then saved as JSON, as they were
      else:
        if not abstract or name not in abstract:
          raise ValueError(f'restoring {name!r} needs its abstract tree')
        args[name] = ocp.args.StandardRestore(abstract[name])
    return args

  def restore(self, step: int | None = None, *, abstract: dict[str, Any] | None = None,
              items: tuple[str, ...] | Callable[[int], tuple[str, ...]] = ('params', 'meta'),
              iterator: Any = None) -> dict[str, Any]:
    """Restores `items` of `step`, or of the latest usable step (falling back past damaged ones,
    each named in a warning). `items` may be a function of the step. `abstract` maps 'params' /
    'opt' to trees of jax.ShapeDtypeStruct (with shardings) to restore into; 'data' restores into
    `iterator` (a grain iterator, its state set in place), or as a JSON dict from older steps."""
    items_of = items if callable(items) else (lambda _: items)
    for tmp in sorted(set(self._matching(f'*{TMP}*')) - self._warned):
      self._warned.add(tmp)
      logging.warning('checkpoint %s was never completed (a save that did not finish): ignored',
                      tmp)
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    problems = []
    for i, s in enumerate(steps):
      wanted = tuple(items_of(s))
      reason = self.check(s, wanted)
      if reason is None:
        args = self._restore_args(s, abstract, wanted, iterator)
        try:
          out = dict(self._manager.restore(s, args=ocp.args.Composite(**args)))
          return {**out, 'step': s}
        except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore read errors)
          _quiet_closed_loop_callbacks()
          reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
      problems.append(f'step {s}: {reason}')
      rest = steps[i + 1:]
      logging.warning('checkpoint %s is unusable (%s): %s', self.step_dir(s), reason,
                      f'trying step {rest[0]}' if rest else 'no earlier checkpoint')
    raise NoValidCheckpoint(f'no usable checkpoint in {self.directory} ({"; ".join(problems)}): '
                            'delete it to start that stage again')

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
