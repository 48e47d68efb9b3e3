"""Orbax checkpoints that a crash or a corrupt file cannot break, and the non-finite loss stop.

Layout of `directory`: one folder per step (`<dir>/<step>/`, an orbax composite checkpoint with
the items `state`, `data` and `config`) and, once every file of it is written, a commit manifest
`<dir>/<step>/dlax_manifest.json` listing each file's size and SHA-256. A step folder without a
valid manifest (a save cut short, a truncated, garbled or missing file) is never restored:
`restore_latest` warns and falls back to the newest good one.

    checkpointer = Checkpointer.from_config(config.checkpoint)
    restored = checkpointer.restore_latest(abstract_state)     # None on a fresh run
    ...
    checkpointer.save(step, state, data_state=loader_state, config=config)   # every N steps
    checkpointer.close()

`state` is any pytree of arrays: the loop's params, optimizer state, step and RNG key. Saves are
asynchronous (orbax copies the arrays off the devices, then writes in a background thread); the
manifest is written and old steps pruned (keeping the latest `keep`) in a background thread too.
On several hosts, process 0 writes manifests and prunes; every process verifies on restore.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import threading
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from dlax_training.config import CheckpointConfig, TrainConfig, to_dict

MANIFEST = "dlax_manifest.json"
ORBAX_TMP = ".orbax-checkpoint-tmp"   # orbax's suffix for folders still being written
_READ_CHUNK = 1 << 24


class CheckpointError(RuntimeError):
  """No usable checkpoint, or one that cannot be restored into the requested state."""


class CorruptCheckpointWarning(UserWarning):
  """A checkpoint was skipped because it is incomplete or corrupt."""


class Restored(NamedTuple):
  step: int
  state: Any              # the pytree saved, laid out (and sharded) like `abstract_state`
  data_state: Any         # the data-iterator state as given to `save` (dict, list, bytes or None)
  config: dict | None     # the resolved config as a plain dict (`dlax_training.config.to_dict`)


def _is_primary() -> bool:
  return jax.process_index() == 0


def _files(folder: epath.Path, prefix: str = "") -> list[str]:
  """Relative paths of all files under `folder`, sorted."""
  names = []
  for entry in folder.iterdir():
    if entry.is_dir():
      names += _files(entry, f"{prefix}{entry.name}/")
    else:
      names.append(f"{prefix}{entry.name}")
  return sorted(names)


def _digest(path: epath.Path) -> dict[str, Any]:
  sha, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    while chunk := f.read(_READ_CHUNK):
      sha.update(chunk)
      size += len(chunk)
  return {"size": size, "sha256": sha.hexdigest()}


def write_manifest(folder: epath.Path, step: int) -> None:
  """Commits a finished step folder: the manifest is written to a temporary name, then renamed."""
  files = {name: _digest(folder / name) for name in _files(folder) if name != MANIFEST}
  tmp = folder / f"{MANIFEST}.tmp"
  tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
  tmp.rename(folder / MANIFEST)


def verify(folder: epath.Path) -> str | None:
  """Why the step folder cannot be used (no manifest, a missing, resized or altered file), or
  None if every file matches its manifest."""
  try:
    files = json.loads((folder / MANIFEST).read_text())["files"]
  except FileNotFoundError:
    return f"no {MANIFEST}: the save did not complete"
  except (ValueError, KeyError, TypeError) as error:
    return f"unreadable {MANIFEST} ({error})"
  for name, expected in files.items():
    path = folder / name
    if not path.exists():
      return f"{name} is missing"
    actual = _digest(path)
    if actual["size"] != expected["size"]:
      return f"{name} has {actual['size']} bytes, expected {expected['size']}"
    if actual["sha256"] != expected["sha256"]:
      return f"{name} does not match its checksum"
  return None


def _encode_data_state(data_state) -> dict:
  if isinstance(data_state, bytes):
    return {"bytes": base64.b64encode(data_state).decode("ascii")}
  return {"json": data_state}


def _decode_data_state(stored: dict):
  if "bytes" in stored:
    return base64.b64decode(stored["bytes"])
  return stored["json"]


class Checkpointer:
  """Saves every `every_steps` steps into `directory`, keeps the latest `keep` committed steps,
  and restores the newest intact one (see the module docstring)."""

  def __init__(self, directory, *, every_steps: int = 1000, keep: int = 3,
               async_save: bool = True):
    if every_steps < 1 or keep < 1:
      raise ValueError(f"every_steps and keep must be >= 1, got {every_steps}, {keep}")
    self.directory = epath.Path(os.path.abspath(directory))   # orbax rejects relative paths
    self.every_steps, self.keep, self.async_save = every_steps, keep, async_save
    handler = ocp.CompositeCheckpointHandler()
    self._orbax = ocp.AsyncCheckpointer(handler) if async_save else ocp.Checkpointer(handler)
    self._commit: threading.Thread | None = None
    self._commit_error: BaseException | None = None
    self._saved: set[int] = set()    # steps saved by this instance

  @classmethod
  def from_config(cls, config: CheckpointConfig) -> Checkpointer:
    if config.dir is None:
      raise ValueError("checkpoint.dir is not set")
    return cls(config.dir, every_steps=config.every_steps, keep=config.keep,
               async_save=config.async_save)

  # Step folders.

  def _folder(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def _step_folders(self) -> list[int]:
    """Steps that have a folder (committed or not), newest first."""
    if not self.directory.exists():
      return []
    steps = [int(entry.name) for entry in self.directory.iterdir()
             if entry.name.isdigit() and entry.is_dir()]
    return sorted(steps, reverse=True)

  def steps(self) -> list[int]:
    """Committed steps (manifest written; not re-verified), newest first."""
    self.wait()
    return [step for step in self._step_folders() if (self._folder(step) / MANIFEST).exists()]

  # Saving.

  def should_save(self, step: int) -> bool:
    return step > 0 and step % self.every_steps == 0

  def save(self, step: int, state, *, data_state=None, config: TrainConfig | dict | None = None,
           force: bool = False) -> bool:
    """Starts saving `state` (a pytree of arrays), the data-iterator state (JSON-able data or
    bytes) and the resolved config as step `step`, if `should_save(step)` or `force`.

    Returns whether a save started. An intact step is not saved again; a corrupt or incomplete
    folder of the same step (left by an earlier run) is moved aside to `<step>.corrupt`.
    """
    if not (force or self.should_save(step)):
      return False
    self.wait()
    if not self._saved and _is_primary():
      self._remove_leftovers()
    folder = self._folder(step)
    if step in self._saved or (folder.exists() and verify(folder) is None):
      return False
    if folder.exists() and _is_primary():
      self._move_aside(folder)
    config = to_dict(config) if isinstance(config, TrainConfig) else config
    self._orbax.save(folder, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(_encode_data_state(data_state)),
        config=ocp.args.JsonSave({"config": config})))
    self._saved.add(step)
    if self.async_save:
      self._commit = threading.Thread(target=self._finish, args=(step,), daemon=True,
                                      name=f"dlax-checkpoint-{step}")
      self._commit.start()
    else:
      self._finish(step)
      self._raise_commit_error()
    return True

  def _remove_leftovers(self) -> None:
    """Removes the temporary folders of saves cut short by a crash (the writer of `directory`
    does this before its first save; readers never do, as a writer may be at work)."""
    self.directory.mkdir(parents=True, exist_ok=True)
    for entry in self.directory.iterdir():
      if ORBAX_TMP in entry.name:
        entry.rmtree()

  def _finish(self, step: int) -> None:
    """Waits for orbax, commits the step with its manifest and prunes old steps."""
    try:
      if self.async_save:
        self._orbax.wait_until_finished()
      if _is_primary():
        write_manifest(self._folder(step), step)
        committed = [s for s in self._step_folders() if (self._folder(s) / MANIFEST).exists()]
        for old in committed[self.keep:]:
          self._folder(old).rmtree()
    except BaseException as error:   # re-raised in the training thread by `wait`
      self._commit_error = error

  def _raise_commit_error(self) -> None:
    error, self._commit_error = self._commit_error, None
    if error is not None:
      raise CheckpointError(f"saving a checkpoint in {self.directory} failed: {error}") from error

  def _move_aside(self, folder: epath.Path) -> None:
    target, n = folder.parent / f"{folder.name}.corrupt", 1
    while target.exists():
      target, n = folder.parent / f"{folder.name}.corrupt{n}", n + 1
    folder.rename(target)

  def wait(self) -> None:
    """Blocks until the last save is written and committed; raises if it failed."""
    if self._commit is not None:
      self._commit.join()
      self._commit = None
    self._raise_commit_error()

  def close(self) -> None:
    self.wait()
    self._orbax.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # Restoring.

  def restore(self, step: int, abstract_state) -> Restored:
    """Step `step`, after checking it against its manifest. `abstract_state` gives the tree,
    shapes, dtypes and target shardings (`jax.ShapeDtypeStruct` leaves, or arrays)."""
    self.wait()
    folder = self._folder(step)
    problem = verify(folder) if folder.exists() else "no such step"
    if problem is not None:
      raise CheckpointError(f"checkpoint {folder} is unusable: {problem}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      items = self._orbax.restore(folder, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore()))
    except Exception as error:
      raise CheckpointError(f"checkpoint {folder} passed its integrity check but does not restore "
                            f"into the given state: {error}") from error
    return Restored(step, items["state"], _decode_data_state(items["data"]),
                    items["config"]["config"])

  def restore_latest(self, abstract_state) -> Restored | None:
    """The newest intact checkpoint, or None if `directory` has none at all. Incomplete or
    corrupt newer steps are skipped with a `CorruptCheckpointWarning`; `CheckpointError` if no
    step is intact."""
    self.wait()
    steps = self._step_folders()
    problems = []
    for step in steps:
      problem = verify(self._folder(step))
      if problem is None:
        return self.restore(step, abstract_state)
      problems.append(f"step {step}: {problem}")
      warnings.warn(f"checkpoint {self._folder(step)} is unusable ({problem}); falling back to "
                    "the previous one", CorruptCheckpointWarning, stacklevel=2)
    if problems:
      raise CheckpointError(f"no usable checkpoint in {self.directory}: {'; '.join(problems)}")
    return None


# Non-finite losses.


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradient norm) became NaN or inf; `nonfinite` names the offending leaves."""

  def __init__(self, message: str, *, step: int, loss: float,
               nonfinite: dict[str, list[str]]):
    super().__init__(message)
    self.step, self.loss, self.nonfinite = step, loss, nonfinite


def nonfinite_leaves(tree) -> list[str]:
  """Paths (`a/b/c`) of the floating-point leaves of `tree` holding a NaN or inf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [jax.tree_util.keystr(path, simple=True, separator="/") for path, leaf in leaves
          if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
          and not bool(jnp.isfinite(leaf).all())]


def check_finite(loss, step: int, *, grad_norm=None, grads=None, params=None,
                 max_names: int = 8) -> float:
  """Returns `float(loss)`; raises `NonFiniteLossError` if the loss or `grad_norm` is not finite,
  naming the non-finite gradient and parameter leaves when `grads` / `params` are given. The loop
  then stops without saving, so the last checkpoint stays the last good one."""
  loss, norm = float(loss), None if grad_norm is None else float(grad_norm)
  if math.isfinite(loss) and (norm is None or math.isfinite(norm)):
    return loss
  parts = [f"non-finite training loss at step {step}: loss={loss}"
           + ("" if norm is None else f", grad_norm={norm}")]
  nonfinite = {}
  for name, tree in (("gradients", grads), ("parameters", params)):
    if tree is None:
      continue
    nonfinite[name] = bad = nonfinite_leaves(tree)
    more = f" (+{len(bad) - max_names} more)" if len(bad) > max_names else ""
    parts.append(f"non-finite {name}: {', '.join(bad[:max_names])}{more}" if bad
                 else f"all {name} finite")
  parts.append("stopping; the last saved checkpoint is the last good one")
  raise NonFiniteLossError("; ".join(parts), step=step, loss=loss, nonfinite=nonfinite)
