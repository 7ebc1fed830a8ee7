"""Orbax checkpointing for pipeline stages, with fallback past corrupt steps and a completion marker.

One :class:`StageCheckpointer` owns one directory (one training stage). Each step holds two Orbax items:
``state`` (any pytree of arrays, saved with ``StandardSave``) and ``meta`` (a JSON dict). Guarantees:

* Paths are made absolute (Orbax fails late, leaving a tmp folder, on relative ones).
* ``save`` blocks until the step is committed (``wait_until_finished``), so a process killed after ``save``
  returns leaves a complete, restorable step.
* Saving a step that already exists raises (Orbax would silently skip it) unless ``overwrite=True``.
* Every save records a SHA-256 of the state's leaves in the meta; ``restore`` verifies it and falls back to
  the previous step, with a warning, when the latest one is unreadable or does not match (a truncated or
  deleted file). If no step is valid, it raises :class:`CheckpointError` naming the directory.
* ``save_final`` / ``is_complete`` write and read a ``COMPLETE.json`` marker so a pipeline can skip finished
  stages.

States are saved under field names (:func:`named_state`: dataclass and named-tuple fields become dict keys,
e.g. an Adam state's ``count``, ``mu``, ``nu``), with ``{STATE_LAYOUT_KEY: NAMED_LAYOUT}`` in the step's meta so
that a reader can tell them from the layouts of older versions; :func:`state_from_named` puts the arrays back
into the classes of a template.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "CheckpointError",
    "NAMED_LAYOUT",
    "STATE_LAYOUT_KEY",
    "StageCheckpointer",
    "atomic_write_json",
    "named_state",
    "state_from_named",
    "tree_checksum",
]

_CHECKSUM_KEY = "_lsot_state_sha256"
_MARKER = "COMPLETE.json"
# The meta entry of a step whose state was saved by field name (:func:`named_state`); a step without it was
# saved by the versions before named keys, in the layout its reader knows (e.g. optax's tuple of states).
STATE_LAYOUT_KEY = "state_layout"
NAMED_LAYOUT = "named"


class CheckpointError(RuntimeError):
  """Raised when a checkpoint directory holds no valid step to restore."""


def tree_checksum(tree: Any) -> str:
  """SHA-256 over the key paths, dtypes, shapes and bytes of a pytree's leaves.

  Args:
    tree: a pytree of arrays (JAX or NumPy) or scalars.

  Returns:
    A hex digest string.
  """
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{arr.dtype.str}{arr.shape}".encode())
    digest.update(arr.tobytes())
  return digest.hexdigest()


def atomic_write_json(path: pathlib.Path, payload: Any, *, sort_keys: bool = True,
                      default: Optional[Callable[[Any], Any]] = None) -> None:
  """Writes ``payload`` as JSON to ``path`` atomically (a temporary file, fsynced, then renamed).

  Args:
    path: the file; its folder must exist.
    payload: JSON-serialisable data.
    sort_keys: sort the keys of dicts.
    default: ``json.dump``'s hook for objects it cannot serialise (e.g. arrays).
  """
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(payload, f, indent=1, sort_keys=sort_keys, default=default)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _is_named_tuple(value: Any) -> bool:
  return isinstance(value, tuple) and hasattr(value, "_fields")


def named_state(state: Any) -> Any:
  """A state as nested dicts keyed by field name (the layout of the ot and training checkpoints).

  Dataclass fields and named-tuple fields (the Adam moments: ``opt_state`` -> ``count``, ``mu``, ``nu``) become
  dict keys, dicts keep theirs; everything else is a leaf.

  Args:
    state: a :class:`lsot_jax.solver.SolverState`, a :class:`lsot_jax.newton.NewtonState`, a training state
      ``{"params", "opt_state", "step"}`` or another pytree of dataclasses, named tuples, dicts and arrays.

  Returns:
    Nested dicts of the same arrays.
  """
  if dataclasses.is_dataclass(state) and not isinstance(state, type):
    return {f.name: named_state(getattr(state, f.name)) for f in dataclasses.fields(state)}
  if _is_named_tuple(state):
    return {name: named_state(getattr(state, name)) for name in state._fields}
  if isinstance(state, dict):
    return {k: named_state(v) for k, v in state.items()}
  return state


def state_from_named(template: Any, tree: Any) -> Any:
  """The inverse of :func:`named_state`: the arrays of ``tree`` in the classes (and pytree structure) of
  ``template``.

  Args:
    template: a state of the wanted structure (e.g. ``solver.init(problem)``).
    tree: nested dicts as :func:`named_state` returns them.

  Raises:
    KeyError: ``tree`` lacks a field of ``template``.
  """
  if dataclasses.is_dataclass(template) and not isinstance(template, type):
    return type(template)(**{f.name: state_from_named(getattr(template, f.name), tree[f.name])
                             for f in dataclasses.fields(template)})
  if _is_named_tuple(template):
    return type(template)(*(state_from_named(getattr(template, name), tree[name]) for name in template._fields))
  if isinstance(template, dict):  # its own class: optax.named_chain's state is an OrderedDict
    return type(template)((k, state_from_named(v, tree[k])) for k, v in template.items())
  return jnp.asarray(tree)


def _abstract_leaf(leaf: Any) -> jax.ShapeDtypeStruct:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  if not isinstance(leaf, jax.Array):
    leaf = jnp.asarray(leaf)
  return ocp.utils.to_shape_dtype_struct(leaf)


class StageCheckpointer:
  """Saves and restores one stage's state in an Orbax ``CheckpointManager``.

  Args:
    directory: the stage's checkpoint folder; relative paths are resolved against the working directory.
      Created if missing.
    max_to_keep: number of most recent steps kept on disk (>= 1; 2 or more keeps a fallback).
  """

  def __init__(self, directory: os.PathLike | str, max_to_keep: int = 3):
    if int(max_to_keep) < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
    self._dir = pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(directory))))
    self._dir.mkdir(parents=True, exist_ok=True)
    self._max_to_keep = int(max_to_keep)
    options = ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(self._dir, options=options)

  @property
  def directory(self) -> pathlib.Path:
    """The absolute checkpoint directory."""
    return self._dir

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "StageCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def all_steps(self) -> List[int]:
    """Committed steps on disk, ascending (read fresh from the directory)."""
    self._manager.reload()
    return sorted(int(s) for s in self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The most recent committed step (not checked for corruption), or None if there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: Optional[Dict[str, Any]] = None, *,
           overwrite: bool = False) -> None:
    """Saves ``state`` and ``meta`` as ``step`` and blocks until the step is committed.

    Args:
      step: non-negative step number.
      state: pytree of arrays.
      meta: JSON-serialisable dict (the key ``_lsot_state_sha256`` is reserved).
      overwrite: replace an existing step instead of raising.

    Raises:
      ValueError: if the step exists and ``overwrite`` is False, or ``meta`` is not JSON-serialisable.
      RuntimeError: if Orbax declines to save.
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}.")
    meta = dict(meta or {})
    if _CHECKSUM_KEY in meta:
      raise ValueError(f"meta key {_CHECKSUM_KEY!r} is reserved.")
    try:
      json.dumps(meta)
    except (TypeError, ValueError) as e:
      raise ValueError(f"meta must be JSON-serialisable: {e}") from e
    if step in self.all_steps():
      if not overwrite:
        raise ValueError(f"Step {step} already exists in {self._dir}; pass overwrite=True to replace it.")
      self._manager.delete(step)
    meta[_CHECKSUM_KEY] = tree_checksum(state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    saved = self._manager.save(step, args=args, force=True)
    self._manager.wait_until_finished()
    if not saved:
      raise RuntimeError(f"Orbax did not save step {step} in {self._dir}.")

  def _restore_step(self, step: int, abstract: Any) -> Tuple[Any, Dict[str, Any]]:
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    state, meta = restored["state"], dict(restored["meta"])
    expected = meta.pop(_CHECKSUM_KEY, None)
    if expected is None:
      raise CheckpointError(f"step {step} has no state checksum in its meta")
    if tree_checksum(state) != expected:
      raise CheckpointError(f"step {step} state does not match its checksum")
    return state, meta

  def meta(self, step: int) -> Dict[str, Any]:
    """The JSON meta saved with ``step`` (without restoring the state, and without the checksum key).

    Raises:
      CheckpointError: the step is missing or its meta is unreadable.
    """
    if int(step) not in self.all_steps():
      raise CheckpointError(f"Step {step} not found in {self._dir}.")
    try:
      restored = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"The meta of step {step} in {self._dir} is unreadable: {e}") from e
    meta = dict(restored["meta"])
    meta.pop(_CHECKSUM_KEY, None)
    return meta

  def restore(self, target: Any = None, step: Optional[int] = None, *,
              target_of: Optional[Callable[[Dict[str, Any]], Any]] = None) -> Tuple[int, Any, Dict[str, Any]]:
    """Restores the latest valid step (or exactly ``step``).

    Steps that fail to load or fail the checksum are skipped with a ``UserWarning`` naming the step and the
    reason, and the next older step is tried.

    Args:
      target: a pytree with the structure, shapes and dtypes of the saved state (JAX or NumPy arrays,
        scalars or ``jax.ShapeDtypeStruct``).
      step: restore this step only (no fallback).
      target_of: instead of ``target``, a function of a step's meta (without the checksum key) that returns
        that step's target: for states whose layout depends on the version that saved them.

    Returns:
      ``(step, state, meta)``.

    Raises:
      ValueError: not exactly one of ``target`` and ``target_of`` given.
      CheckpointError: if no step (or the requested step) can be restored.
    """
    if (target is None) == (target_of is None):
      raise ValueError("StageCheckpointer.restore takes exactly one of target= and target_of=.")
    steps = self.all_steps()
    if step is not None:
      if int(step) not in steps:
        raise CheckpointError(f"Step {step} not found in {self._dir} (steps on disk: {steps}).")
      candidates = [int(step)]
    else:
      candidates = steps[::-1]
    if not candidates:
      raise CheckpointError(f"No checkpoint to restore in {self._dir}: the directory holds no committed step.")
    failures = []
    for s in candidates:
      try:
        abstract = jax.tree.map(_abstract_leaf, target if target_of is None else target_of(self.meta(s)))
        state, meta = self._restore_step(s, abstract)
      except Exception as e:  # pylint: disable=broad-except
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        failures.append(f"step {s}: {reason}")
        if step is None:
          warnings.warn(f"Checkpoint step {s} in {self._dir} is unreadable or corrupt ({reason}); "
                        "falling back to the previous step.", UserWarning, stacklevel=2)
        continue
      return s, state, meta
    raise CheckpointError(f"No valid checkpoint in {self._dir}; every step failed to restore:\n  "
                          + "\n  ".join(failures))

  def save_final(self, step: int, state: Any, meta: Optional[Dict[str, Any]] = None, *,
                 overwrite: bool = False) -> None:
    """Saves the last step of a stage and marks the stage complete.

    Args:
      step: the final step number.
      state: pytree of arrays.
      meta: JSON-serialisable dict; also copied into the completion marker.
      overwrite: replace an existing step instead of raising.
    """
    self.save(step, state, meta, overwrite=overwrite)
    self.mark_complete(step, meta)

  def mark_complete(self, step: int, meta: Optional[Dict[str, Any]] = None) -> None:
    """Writes the completion marker for an existing step (atomically)."""
    if int(step) not in self.all_steps():
      raise ValueError(f"Cannot mark step {step} complete: it is not in {self._dir}.")
    atomic_write_json(self._dir / _MARKER, {"step": int(step), "meta": dict(meta or {})})

  def clear_complete(self) -> None:
    """Removes the completion marker, if any (e.g. before training a stage further)."""
    marker = self._dir / _MARKER
    if marker.exists():
      marker.unlink()

  def completion(self) -> Optional[Dict[str, Any]]:
    """The completion marker ``{"step": int, "meta": dict}``, or None if the stage is not complete.

    A marker whose step is no longer on disk, or that cannot be parsed, counts as not complete.
    """
    marker = self._dir / _MARKER
    if not marker.exists():
      return None
    try:
      payload = json.loads(marker.read_text())
      step = int(payload["step"])
    except (OSError, ValueError, KeyError, TypeError):
      return None
    if step not in self.all_steps():
      return None
    return payload

  def is_complete(self) -> bool:
    """Whether the stage was finished with :meth:`save_final` (and its final step is still on disk)."""
    return self.completion() is not None
