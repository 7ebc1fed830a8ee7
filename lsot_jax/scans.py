"""Hyperparameter scans of a run: the OT fit's settings and the autoencoder's training (``--scan``).

:func:`run_scan` drives :mod:`lsot_jax.scan`'s vmapped engine on a workdir's codes (OT scans) or on
autoencoders trained in memory (AE scans); the quality functions here score each setting from its ``exact``
samples, with the evaluator's metrics.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lsot_jax import config as config_lib
from lsot_jax import data as data_lib
from lsot_jax import evaluator
from lsot_jax import generate
from lsot_jax import metrics as metrics_lib
from lsot_jax import models
from lsot_jax import scan as scan_lib
from lsot_jax import solver as solver_lib
from lsot_jax import sources
from lsot_jax import stage_ot
from lsot_jax import stages
from lsot_jax import train

__all__ = ["AE_SCAN_MEMORY_SHARE", "memory_bytes", "run_scan"]

# An autoencoder scan is refused when the parameter-sized training state of its largest group (parameters,
# gradients and the two Adam moments: 4 float32 arrays per model) would take more than this share of the
# default device's memory (the host's RAM on a CPU).
AE_SCAN_MEMORY_SHARE = 0.5


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
    raise config_lib.PipelineError("Give at least one scan spec, e.g. --scan ot.learning_rate=0.1,0.3 --scan seed=0,1.")
  try:
    parsed = scan_lib.parse_scan_specs(specs) if isinstance(specs[0], str) else [
        (f, list(v)) for f, v in specs]
  except ValueError as e:
    raise config_lib.PipelineError(f"Bad --scan: {e}") from e
  scan_fields = config_lib.SCAN_FIELDS
  for field, _ in parsed:
    if field not in scan_fields:
      raise config_lib.PipelineError(
          f"Cannot scan {field!r}: --scan varies 'seed', the OT solver's fields "
          f"{', '.join(f for f in scan_fields if f.startswith('ot.'))} and the autoencoder's training fields "
          f"{', '.join(f for f in scan_fields if f.startswith('ae.'))}. Other fields (the architecture, e.g. "
          "ae.latent_dim, the data, the codes (ot.num_codes, ot.source), sampling or evaluation) change the "
          "shapes or other stages: run one workdir per value.")
  ae_scan = _is_ae_scan(parsed)
  if ae_scan and config.ae.kind == "identity":
    raise config_lib.PipelineError(
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
        raise config_lib.PipelineError(
            f"--scan {field}: value {value!r} has the wrong type for this field ({e}).") from e
    try:
      config_lib.validate_config(trial)
      if ae_scan:
        config_lib.ae_train_config(trial)
    except config_lib.PipelineError as e:
      raise config_lib.PipelineError(f"--scan setting {setting}: {e}") from e
    except ValueError as e:
      raise config_lib.PipelineError(f"--scan setting {setting}: invalid autoencoder training setting ({e}).") from e
    for j, (field, _) in enumerate(parsed):
      value = _scan_value(trial, field)
      if value not in typed[j]:
        typed[j].append(value)
  return [(field, values) for (field, _), values in zip(parsed, typed)]


def _scan_quality(ctx: stages.Context, results: stages.Results, problem: solver_lib.SemidiscreteProblem
                  ) -> Callable[[solver_lib.BrenierPotential, Dict[str, Any]], Dict[str, float]]:
  """Quality of one scanned potential from its ``exact`` samples; cheap, no training.

  ``sample.num_samples`` exact samples are drawn with the sample stage's key for ``exact`` and seed 0 (the
  same source points for every setting). Columns: ``latent_sw2``, the sliced W2 (128 directions, fixed) between
  the sampled codes and the held-out codes (the test split encoded, ``eval.num_real`` of them); for the toy
  sets ``modes``, ``high_quality`` and ``reverse_kl`` of the decoded samples (:func:`metrics.mode_coverage`);
  for images ``latent_frechet``, the Frechet distance of the same two code sets.
  """
  cfg = ctx.config
  num = int(cfg.sample.num_samples)
  key = config_lib.sample_key(cfg, "exact", 0)
  source = problem.source
  sample = jax.jit(lambda y, h: generate.generate("exact", key, source, y, h, num))
  test = ctx.dataset("test")
  real_x = test.x[:int(cfg.eval.num_real) or test.num_examples]
  if cfg.ae.kind == "identity":
    real = np.asarray(real_x, np.float32)
  else:
    real = results.autoencoder().encode(real_x)
  sw_key = config_lib.config_key(cfg, config_lib.SALT_EVAL, 0)
  sliced = jax.jit(lambda a, b: metrics_lib.sliced_wasserstein(a, b, sw_key, 128))
  real_dev = jnp.asarray(real)
  decode = results.autoencoder().decode if ctx.is_points else None
  means, std = data_lib.toy_modes(cfg.data.name) if ctx.is_points else (None, None)

  def quality(potential: solver_lib.BrenierPotential, setting: Dict[str, Any]) -> Dict[str, float]:
    del setting
    codes = sample(potential.y, potential.h)
    out: Dict[str, float] = {}
    if ctx.is_points:
      cov = metrics_lib.mode_coverage(decode(np.asarray(codes)), means, std)
      out.update(modes=float(cov["modes"]), high_quality=cov["high_quality"], reverse_kl=cov["reverse_kl"])
    out["latent_sw2"] = float(sliced(codes, real_dev))
    if not ctx.is_points:
      out["latent_frechet"] = metrics_lib.frechet_distance(np.asarray(codes), real)
    return out

  return quality


def memory_bytes() -> Optional[int]:
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


def _ae_scan_quality(ctx: stages.Context, graphdef: Any) -> Tuple[Tuple[str, ...], Callable[..., Dict[str, float]]]:
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
  cfg = ctx.config
  num = int(cfg.sample.num_samples)
  key = config_lib.sample_key(cfg, "exact", 0)
  source = sources.make_source(cfg.ot.source, int(cfg.ae.latent_dim))
  sample = jax.jit(lambda y, h: generate.generate("exact", key, source, y, h, num))
  decode = jax.jit(lambda params, z: models.decode(graphdef, params, z))
  if ctx.is_points:
    means, std = data_lib.toy_modes(cfg.data.name)
    names: Tuple[str, ...] = ("modes", "high_quality", "reverse_kl")
  else:
    test = ctx.dataset("test")
    features = evaluator.pixel_features(int(cfg.eval.pixel_pool))
    real = features(test.x[:int(cfg.eval.num_real) or test.num_examples])
    k = int(cfg.eval.k)
    prdc = jax.jit(lambda a, b: metrics_lib.precision_recall_density_coverage(a, b, k))
    names = ("pixel_frechet", "pixel_precision", "pixel_recall")

  def quality(potential: solver_lib.BrenierPotential, params: models.Params) -> Dict[str, float]:
    codes = np.asarray(sample(potential.y, potential.h))
    x = train.batched_apply(lambda z: decode(params, z), codes, batch_size=1024)
    if ctx.is_points:
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


def _run_ae_scan(ctx: stages.Context, parsed: Sequence[scan_lib.ScanSpec], log: Callable[[str], None]
                 ) -> scan_lib.ScanResult:
  """The autoencoder scan of :func:`run_scan`: vmapped trainings, per-setting codes, vmapped OT fits."""
  cfg = ctx.config
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
  train_cfgs = [config_lib.ae_train_config(t) for t in ae_trials]
  groups: Dict[Tuple[Any, ...], List[int]] = {}
  for a, tc in enumerate(train_cfgs):
    groups.setdefault((tc.epochs, tc.batch_size, tc.lr_schedule), []).append(a)

  model_cfg = config_lib.ae_model_config(cfg, ctx.dataset("train").example_shape)
  shapes = jax.eval_shape(lambda k: models.init_autoencoder(k, model_cfg)[1], jax.random.key(0))
  num_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(shapes)))
  largest = max(len(members) for members in groups.values())
  need, memory = largest * num_params * 4 * 4, memory_bytes()
  if memory is not None and need > AE_SCAN_MEMORY_SHARE * memory:
    raise config_lib.PipelineError(
        f"--scan: {largest} autoencoders of {num_params} parameters would train at once, and their "
        f"parameters, gradients and Adam moments alone take {need / 2**30:.1f} GiB, over "
        f"{AE_SCAN_MEMORY_SHARE:.0%} of this device's {memory / 2**30:.1f} GiB. Scan fewer ae settings per "
        "invocation (or a smaller model).")
  if int(cfg.ae.num_devices) != 1:
    log("scan: the autoencoders train on one device (ae.num_devices applies to the ae stage)")

  x = ctx.dataset("train").x
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
  test_x = ctx.dataset("test").x
  test_mse = np.mean(np.asarray(train.batched_apply(lambda xb: recon_error(params, xb), test_x,
                                                    batch_size=1024), np.float64), axis=0)
  ok = [bool(diverged_step[a] < 0 and np.isfinite(codes[a]).all()) for a in range(len(ae_settings))]
  for a, setting in enumerate(ae_settings):
    if not ok[a]:
      log(f"scan: the autoencoder of {setting} diverged (non-finite loss, parameters or codes"
          + (f" from step {diverged_step[a]}" if diverged_step[a] >= 0 else "") + "); its rows get NaN")

  # The OT codes: the same subset as the encode stage (the config's seed), each autoencoder's own codes.
  index = stages.ot_code_index(cfg, codes.shape[1])
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
        problems, [{name: trials[i].ot[name] for name in config_lib.SOLVER_FIELDS} for i in fitted],
        [jax.random.fold_in(jax.random.key(int(trials[i].seed)), config_lib.SALT_OT) for i in fitted],
        problem_index=[valid_ae.index(ae_of[i]) for i in fitted],
        eval_key=config_lib.config_key(cfg, config_lib.SALT_MARGINAL), num_eval_samples=int(cfg.ot.marginal_samples))
  log(f"scan: fitted in {num_calls} vmapped call(s), {time.perf_counter() - start:.1f}s")

  names, quality = _ae_scan_quality(ctx, graphdef)
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
  files = scan_lib.write_scan_outputs(rows, ctx.wd.ckpt_dir("scan"), fields)
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
      :data:`lsot_jax.config.SCAN_FIELDS`.
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
  ctx = stages.open_run(config, workdir, overwrite, log)
  if _is_ae_scan(parsed):
    return _run_ae_scan(ctx, parsed, log)
  results = stages.Results(ctx)
  try:
    for name in ("ae", "encode"):
      stages.run_stage(ctx, results, name)
  finally:
    ctx.close()
  problem = stage_ot.make_problem(config, results.codes())
  # Scans vmap the Adam solver over its fields (ot.*), whatever ot.solver the run's own OT stage uses.
  solver = config_lib.adam_solver(config)
  scanned = {field[len("ot."):] for field, _ in parsed if field != "seed"}
  base = {name: getattr(solver, name) for name in config_lib.SOLVER_FIELDS if name not in scanned}
  num_settings = int(np.prod([len(values) for _, values in parsed]))
  log(f"scan: {num_settings} settings of {', '.join(f for f, _ in parsed)} on {problem.num_targets} codes"
      + ("" if int(config.ot.num_devices) == 1 else " (one device; ot.num_devices applies to the ot stage)"))
  start = time.perf_counter()
  result = scan_lib.run_ot_scan(
      problem, base, parsed, seed=int(config.seed),
      key_fn=lambda seed: jax.random.fold_in(jax.random.key(seed), config_lib.SALT_OT),
      eval_key=config_lib.config_key(config, config_lib.SALT_MARGINAL),
      num_eval_samples=int(config.ot.marginal_samples),
      quality_fn=_scan_quality(ctx, results, problem), out_dir=ctx.wd.ckpt_dir("scan"))
  log(f"scan: {num_settings} settings in {result.num_calls} vmapped call(s), {time.perf_counter() - start:.1f}s; "
      f"wrote {result.files['csv']}, {result.files['md']}, {result.files['png']}")
  return result
