"""The layout of a run folder: paths, stage keys and markers, atomic JSON, and load/save of each artifact.

A workdir holds::

  config.json                   the config of the results in place
  <stage>/DONE.json             the one completion marker of a stage: its key, the fields it read, the keys
                                of its inputs, its seconds and summary
  ae/ckpt  encode/ckpt  ot/ckpt the models (Orbax; the OT solver state under its field names, see
                                :func:`save_ot_state`); ot/history.json, ot/convergence.png, ae/recon.png
  sample/<method>/              each method's codes (Orbax, committed once the method is done: an interrupted
                                sample stage reuses them); samples/<method>.png, the grids;
                                samples/methods_panel.png or samples/interpolation.png, the figure at a glance
  tensorboard/                  TensorBoard event files (log.tensorboard), one per process-0 run
  eval/methods/<method>.json    each method's metrics; eval/<method>_nn.png; metrics.json; report.{md,html}
  superseded/<stage>-<key>/     results of an earlier setting of a stage, moved here (never deleted)

Only process 0 writes (:func:`is_writer`: JSON, markers, moves); every process reads. Orbax checkpoints
coordinate their own multi-host writes. Restoring never trains. This module knows the folders of the stages
but not what the stages compute: the stage keys come from :func:`lsot_jax.config.stage_keys`.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lsot_jax import artifacts
from lsot_jax import checkpoint as checkpoint_lib
from lsot_jax import config as config_lib
from lsot_jax.checkpoint import NAMED_LAYOUT, STATE_LAYOUT_KEY, named_state, state_from_named
from lsot_jax import newton as newton_lib
from lsot_jax import train

__all__ = ["CONFIG", "DONE", "METRICS", "NAMED_LAYOUT", "STAGE_PATHS", "STATE_LAYOUT_KEY", "SUPERSEDED",
           "METHOD_STAGES", "Workdir", "is_writer", "named_state", "positional_state", "read_json", "save_ot_state",
           "state_from_named", "write_json"]

CONFIG = "config.json"
DONE = "DONE.json"
METRICS = "metrics.json"
SUPERSEDED = "superseded"
# Stages whose completion is per method of ``sample.methods`` (see Workdir.is_done).
METHOD_STAGES = ("sample", "eval")
# The paths (relative to the workdir) that hold each stage's results; superseding a stage moves them.
STAGE_PATHS = {
    "ae": ("ae",),
    "encode": ("encode",),
    "ot": ("ot",),
    "sample": ("sample", "samples"),
    "eval": ("eval", METRICS, "report.md", "report.html"),
    "report": (),
}


def is_writer() -> bool:
  """Whether this process writes the workdir's files (process 0 of a multi-host run)."""
  return jax.process_index() == 0


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.generic, jax.Array, np.ndarray)):
    arr = np.asarray(obj)
    return arr.item() if arr.ndim == 0 else arr.tolist()
  raise TypeError(f"Not JSON-serialisable: {type(obj).__name__}")


def write_json(path: pathlib.Path, payload: Any, sort_keys: bool = True) -> None:
  """Writes JSON atomically (arrays as lists), on process 0 only."""
  if not is_writer():
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  checkpoint_lib.atomic_write_json(path, payload, sort_keys=sort_keys, default=_json_default)


def read_json(path: pathlib.Path) -> Optional[Any]:
  """The parsed file, or None if it is missing or unreadable."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def positional_state(state: Any) -> Dict[str, Any]:
  """The layout of an Adam state in the ot checkpoints of versions before named keys: ``leaf_000``,
  ``leaf_001``, ... in the state's flattening order (read to resume such workdirs; never written).

  An ot checkpoint without :data:`STATE_LAYOUT_KEY` in its meta was saved by those versions: an Adam state by
  leaf position, a Newton state by field name (the keys of :func:`named_state`, which has no nesting there).
  """
  return {f"leaf_{i:03d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}


def _is_positional(template: Any, meta: Dict[str, Any]) -> bool:
  """Whether a checkpoint with ``meta`` holds ``template``'s kind of state by leaf position."""
  return meta.get(STATE_LAYOUT_KEY) != NAMED_LAYOUT and not isinstance(template, newton_lib.NewtonState)


# NewtonState fields added after ot checkpoints were first written, with the values that a checkpoint without
# them resumes with (the averaging iterate starts at the heights). A step's meta lists its state's fields
# under STATE_FIELDS_KEY since they were added.
_NEWTON_ADDED = {"h_iter": lambda saved: saved["h"], "num_averaged": lambda saved: np.zeros((), np.int32)}
STATE_FIELDS_KEY = "state_fields"


def _missing_fields(template: Any, meta: Dict[str, Any]) -> Tuple[str, ...]:
  """Fields of ``template`` that a checkpoint with ``meta`` does not hold."""
  if not isinstance(template, newton_lib.NewtonState) or STATE_FIELDS_KEY in meta:
    return ()
  return tuple(_NEWTON_ADDED)


def _checkpoint_target(template: Any, meta: Dict[str, Any]) -> Dict[str, Any]:
  if _is_positional(template, meta):
    return positional_state(template)
  missing = _missing_fields(template, meta)
  return {k: v for k, v in named_state(template).items() if k not in missing}


def save_ot_state(ckpt: checkpoint_lib.StageCheckpointer, state: Any) -> None:
  """Saves a solver state as step ``state.it`` of the ot checkpoints, under named keys (:func:`named_state`),
  replacing that step if it exists."""
  it = int(state.it)
  meta = {"it": it, "converged": bool(state.converged), STATE_LAYOUT_KEY: NAMED_LAYOUT,
          STATE_FIELDS_KEY: sorted(named_state(state))}
  ckpt.save(it, named_state(state), meta, overwrite=True)


def _fields_diff(recorded: Dict[str, Any], wanted: Dict[str, Any],
                 defaults: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
  """``(field, recorded, wanted)`` for the fields that differ; a field recorded as absent that is wanted at
  its default (the behaviour of the version that made the run) matches."""
  out = []
  for name in sorted(set(recorded) | set(wanted)):
    old, new = recorded.get(name, "<absent>"), wanted.get(name, "<absent>")
    if old != new and not (old == "<absent>" and defaults.get(name) == new):
      out.append((name, old, new))
  return out


class Workdir:
  """A run folder (see the module docstring for its layout).

  Attributes:
    root: the absolute path.
  """

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(root))))

  # ---- paths --------------------------------------------------------------------------------------------

  def path(self, *parts: str) -> pathlib.Path:
    """``root / parts``; its parent folder is made (on process 0)."""
    path = self.root.joinpath(*parts)
    if is_writer():
      path.parent.mkdir(parents=True, exist_ok=True)
    return path

  def ckpt_dir(self, *parts: str) -> str:
    """The folder of an Orbax checkpoint (made on process 0)."""
    path = self.root.joinpath(*parts)
    if is_writer():
      path.mkdir(parents=True, exist_ok=True)
    return str(path)

  @property
  def config_path(self) -> pathlib.Path:
    return self.root / CONFIG

  @property
  def metrics_path(self) -> pathlib.Path:
    return self.root / METRICS

  def grid_path(self, method: str) -> pathlib.Path:
    """The sample grid of a method (written by the sample stage)."""
    return self.path("samples", f"{method}.png")

  def nn_grid_path(self, method: str) -> pathlib.Path:
    """Samples over their nearest training images (written by the eval stage)."""
    return self.path("eval", f"{method}_nn.png")

  def method_metrics_path(self, method: str) -> pathlib.Path:
    return self.path("eval", "methods", f"{method}.json")

  # ---- markers and keys ---------------------------------------------------------------------------------

  def done(self, stage: str) -> Optional[Dict[str, Any]]:
    """The stage's completion marker, or None if it is not finished."""
    return read_json(self.root / stage / DONE)

  def is_done(self, stage: str, methods: Optional[Sequence[str]] = None) -> bool:
    """Whether the stage is finished (for the sample and eval stages with ``methods``: for those methods).

    ``sample.methods`` is in no stage key (:func:`lsot_jax.config.stage_fields`): a finished sample stage
    covers the methods whose draws it holds, so it is done for any subset of them; a finished eval stage is
    done only for the same list (it writes ``metrics.json`` for exactly the configured methods, from its
    per-method results).
    """
    done = self.done(stage) if methods is not None and stage in METHOD_STAGES else None
    if done is None:
      return (self.root / stage / DONE).is_file()
    recorded = done.get("methods")
    if recorded is None:
      return True
    if stage == "sample":
      return set(methods) <= set(recorded)
    return list(methods) == list(recorded)

  def mark_done(self, stage: str, config: ml_collections.ConfigDict, seconds: float,
                summary: Optional[Dict[str, Any]] = None) -> None:
    """Writes the stage's one completion marker: its key, the fields it read and its inputs' keys."""
    keys = config_lib.stage_keys(config)
    payload = {"stage": stage, "key": keys[stage], "fields": config_lib.stage_fields(config, stage),
               "inputs": {s: keys[s] for s in config_lib.STAGE_INPUTS[stage]}, "seconds": seconds}
    if stage == "sample":
      payload["methods"] = [m for m in config_lib.METHODS if self.samples_done(m)]
    elif stage == "eval":
      payload["methods"] = list(config.sample.methods)
    if summary is not None:
      payload["summary"] = summary
    write_json(self.root / stage / DONE, payload)

  def _present(self, stage: str) -> bool:
    return any((self.root / rel).exists() for rel in STAGE_PATHS[stage])

  def superseded(self) -> List[str]:
    """Names of the superseded results (``<stage>-<key>``), oldest first."""
    folder = self.root / SUPERSEDED
    if not folder.is_dir():
      return []
    return sorted((p.name for p in folder.iterdir() if p.is_dir()),
                  key=lambda name: (folder / name).stat().st_mtime)

  def _supersede(self, stage: str, key: str, log: Callable[[str], None]) -> None:
    """Moves a stage's results to ``superseded/<stage>-<key>/`` (a numbered suffix if that exists)."""
    target = self.root / SUPERSEDED / f"{stage}-{key}"
    suffix = 1
    while target.exists():
      target = self.root / SUPERSEDED / f"{stage}-{key}.{suffix}"
      suffix += 1
    if not is_writer():
      return
    target.mkdir(parents=True)
    for rel in STAGE_PATHS[stage]:
      if (self.root / rel).exists():
        shutil.move(str(self.root / rel), str(target / rel))
    log(f"{stage}: the results of its earlier setting (key {key}) are kept in {target}")

  def prepare(self, config: ml_collections.ConfigDict, overwrite: bool, log: Callable[[str], None]) -> None:
    """Creates the workdir, or matches its results to ``config`` stage by stage.

    A stage whose key (:func:`lsot_jax.config.stage_keys`) matches is kept. A finished stage of
    :data:`lsot_jax.config.REFIT_STAGES` (a trained model) whose key differs refuses the run, naming the
    fields, unless ``overwrite`` (which moves the whole workdir aside to ``<workdir>.old-<timestamp>``). Any
    other stage whose key differs (a later stage, or an unfinished one) is moved to ``superseded/``. Then
    ``config.json`` is (re)written. A stage finished before markers held keys gets the key of the stored
    ``config.json``.

    Raises:
      PipelineError: the path is a file, or stage folders without a ``config.json``.
      ConfigMismatchError: a finished model stage of another setting.
    """
    root = self.root
    if root.exists() and not root.is_dir():
      raise config_lib.PipelineError(f"--workdir {root} exists and is not a directory.")
    if overwrite and root.exists() and any(root.iterdir()) and is_writer():
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
      aside = root.with_name(f"{root.name}.old-{stamp}")
      suffix = 1
      while aside.exists():
        aside = root.with_name(f"{root.name}.old-{stamp}-{suffix}")
        suffix += 1
      shutil.move(str(root), str(aside))
      log(f"--overwrite: moved the previous run in {root} to {aside}")
    if is_writer():
      root.mkdir(parents=True, exist_ok=True)
    plain = config_lib.as_plain(config)
    if not self.config_path.exists():
      stale = [s for s in config_lib.STAGES if (root / s).exists()]
      if stale:
        raise config_lib.PipelineError(
            f"--workdir {root} holds stage folders {stale} but no {CONFIG}, so their config is unknown. Use a "
            "new --workdir, or --overwrite to move them aside.")
      write_json(self.config_path, plain)
      return
    moves, stored = self._plan(config)
    for stage, key in moves:
      self._supersede(stage, key, log)
    if plain != stored:
      write_json(self.config_path, plain)

  def check(self, config: ml_collections.ConfigDict) -> None:
    """Raises as :meth:`prepare` would, writing nothing.

    Raises:
      PipelineError: an unreadable ``config.json``.
      ConfigMismatchError: a finished model stage of another setting.
    """
    self._plan(config)

  def _plan(self, config: ml_collections.ConfigDict) -> Tuple[List[Tuple[str, str]], Dict[str, Any]]:
    """``([(stage, old key)] to supersede, the stored config)``; raises on a refused stage."""
    root = self.root
    stored = read_json(self.config_path)
    if stored is None:
      raise config_lib.PipelineError(
          f"{self.config_path} is unreadable; restore it, or use --overwrite (the old run is moved aside, not "
          "deleted) or a new --workdir.")
    stored_config = config_lib.config_from_dict(stored)
    stored_flat = config_lib.flatten(stored)
    if "ot" in stored and "solver" not in stored["ot"]:
      stored_flat["ot.solver"] = "adam"  # The behaviour before ``ot.solver`` existed.
    defaults = config_lib.flatten(config_lib.as_plain(config_lib.default_config()))
    old_keys, new_keys = config_lib.stage_keys(stored_config), config_lib.stage_keys(config)
    refused: Dict[str, List[Tuple[str, Any, Any]]] = {}
    moves = []
    for stage in config_lib.STAGES:
      if not self._present(stage):
        continue
      done = self.done(stage)
      key = (done or {}).get("key") or old_keys[stage]
      if key == new_keys[stage]:
        continue
      if done is not None and stage in config_lib.REFIT_STAGES:
        wanted = config_lib.stage_fields(config, stage)
        recorded = done.get("fields") or {k: stored_flat.get(k, "<absent>") for k in wanted}
        refused[stage] = _fields_diff(recorded, wanted, defaults)
      else:
        moves.append((stage, key))
    if refused:
      diff = sorted({d[0]: d for ds in refused.values() for d in ds}.values())
      shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:10])
      more = f" (and {len(diff) - 10} more)" if len(diff) > 10 else ""
      stages = ", ".join(repr(s) for s in refused)
      raise config_lib.ConfigMismatchError(
          f"--workdir {root} holds finished stage(s) {stages} made with a different config; differing fields: "
          f"{shown or 'upstream of them'}{more}. Use a new --workdir, or --overwrite to move the old run aside.",
          [k for k, _, _ in diff])
    return moves, stored

  # ---- artifacts ------------------------------------------------------------------------------------------

  def load_autoencoder(self, config: ml_collections.ConfigDict) -> artifacts.Autoencoder:
    """The trained autoencoder of a finished ae stage (the identity for ``ae.kind='identity'``).

    Raises:
      PipelineError: the ae stage is not finished or its checkpoint is unreadable.
    """
    if config.ae.kind == "identity":
      return artifacts.Autoencoder()
    try:
      graphdef, params = train.restore_autoencoder(str(self.root / "ae" / "ckpt"))
    except checkpoint_lib.CheckpointError as e:
      raise config_lib.PipelineError(f"The ae checkpoint of {self.root} cannot be restored: {e}; run the ae "
                                     "stage (--stage ae) first.") from e
    return artifacts.Autoencoder(graphdef, params)

  def save_codes(self, codes: artifacts.Codes) -> Dict[str, Any]:
    meta = {"num_examples": int(codes.codes.shape[0]), "latent_dim": int(codes.codes.shape[1]),
            "num_codes": int(codes.index.shape[0])}
    state = {"codes": np.asarray(codes.codes, np.float32), "index": np.asarray(codes.index, np.int32)}
    with checkpoint_lib.StageCheckpointer(self.ckpt_dir("encode", "ckpt"), max_to_keep=1) as ckpt:
      ckpt.save(0, state, meta, overwrite=True)
    return meta

  def load_codes(self) -> artifacts.Codes:
    """The encode stage's codes.

    Raises:
      PipelineError: no finished encode stage.
    """
    folder = self.root / "encode" / "ckpt"
    if not self.is_done("encode") or not folder.is_dir():
      raise config_lib.PipelineError(f"No finished encode stage in {self.root / 'encode'}; run --stage encode "
                                     "first.")
    with checkpoint_lib.StageCheckpointer(str(folder), max_to_keep=1) as ckpt:
      step = ckpt.latest_step()
      if step is None:
        raise config_lib.PipelineError(f"The encode checkpoint in {folder} is empty; rerun --stage encode.")
      meta = ckpt.meta(step)
      target = {"codes": jax.ShapeDtypeStruct((meta["num_examples"], meta["latent_dim"]), jnp.float32),
                "index": jax.ShapeDtypeStruct((meta["num_codes"],), jnp.int32)}
      _, state, _ = ckpt.restore(target)
    return artifacts.Codes(np.asarray(state["codes"]), np.asarray(state["index"]))

  def ot_checkpointer(self) -> checkpoint_lib.StageCheckpointer:
    """The ot stage's solver-state checkpoints (every ``ot.checkpoint_every`` steps, the last one final)."""
    return checkpoint_lib.StageCheckpointer(self.ckpt_dir("ot", "ckpt"), max_to_keep=2)

  def restore_ot_state(self, template: Any) -> Any:
    """The latest checkpointed solver state (``template`` if there is none), from named keys or, for a
    workdir of the versions before them, the Adam state's leaf positions; a Newton state saved before its
    averaging fields existed gets their starting values."""
    with self.ot_checkpointer() as ckpt:
      if ckpt.latest_step() is None:
        return template
      _, saved, meta = ckpt.restore(target_of=lambda meta: _checkpoint_target(template, meta))
    if _is_positional(template, meta):
      treedef = jax.tree.structure(template)
      return jax.tree.unflatten(treedef, [jnp.asarray(saved[k]) for k in positional_state(template)])
    for name in _missing_fields(template, meta):
      saved[name] = _NEWTON_ADDED[name](saved)
    return state_from_named(template, saved)

  def samples_meta(self, method: str) -> Dict[str, Any]:
    """The meta of a method's saved draws (``info``, ``decoder``, shapes)."""
    with checkpoint_lib.StageCheckpointer(str(self.root / "sample" / method), max_to_keep=1) as ckpt:
      return ckpt.meta(ckpt.latest_step())

  def samples_done(self, method: str) -> bool:
    """Whether a method's draws are saved (a ``vae`` draw of an older version, without its decoder, is not)."""
    folder = self.root / "sample" / method
    if not folder.is_dir():
      return False
    with checkpoint_lib.StageCheckpointer(str(folder), max_to_keep=1) as ckpt:
      step = ckpt.latest_step()
      if step is None:
        return False
      meta = ckpt.meta(step)
    return meta.get("decoder") != "vae" or bool(meta.get("stored_decoder"))

  def save_samples(self, samples: artifacts.Samples) -> None:
    state: Dict[str, Any] = {"codes": np.asarray(samples.codes, np.float32)}
    meta = {"method": samples.method, "num_seeds": int(samples.codes.shape[0]),
            "num_samples": int(samples.codes.shape[1]), "latent_dim": int(samples.codes.shape[2]),
            "info": samples.info, "decoder": "ae" if samples.decoder is None else "vae"}
    if samples.decoder is not None:
      state["decoder"] = samples.decoder.params
      meta["stored_decoder"] = True
    with checkpoint_lib.StageCheckpointer(self.ckpt_dir("sample", samples.method), max_to_keep=1) as ckpt:
      ckpt.save(0, state, meta, overwrite=True)

  def load_samples(self, method: str, vae: Optional[Tuple[Any, Any]] = None) -> artifacts.Samples:
    """A method's draws.

    Args:
      method: the method.
      vae: ``(graphdef, params)`` of an initialised VAE, the template its stored decoder is restored into
        (needed for ``vae`` draws).

    Raises:
      PipelineError: the method has no saved draws.
    """
    if not self.samples_done(method):
      raise config_lib.PipelineError(f"No samples for {method!r} in {self.root / 'sample'}; run --stage sample "
                                     "first.")
    with checkpoint_lib.StageCheckpointer(str(self.root / "sample" / method), max_to_keep=1) as ckpt:
      meta = ckpt.meta(ckpt.latest_step())
      shape = (meta["num_seeds"], meta["num_samples"], meta["latent_dim"])
      target: Dict[str, Any] = {"codes": jax.ShapeDtypeStruct(shape, jnp.float32)}
      if meta.get("stored_decoder"):
        if vae is None:
          raise ValueError(f"Restoring the {method!r} draws needs the VAE template.")
        target["decoder"] = vae[1]
      _, state, _ = ckpt.restore(target)
    decoder = artifacts.Autoencoder(vae[0], state["decoder"]) if "decoder" in target else None
    return artifacts.Samples(method, np.asarray(state["codes"]), meta["info"], decoder)
