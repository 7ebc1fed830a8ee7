"""The end-to-end pipeline: autoencoder -> encode -> latent OT -> sample -> eval -> report.

``run(config, workdir)`` drives the stages of :data:`STAGES` (:mod:`lsot_jax.stages`, :mod:`lsot_jax.stage_ot`),
each leaving its results in the workdir (:mod:`lsot_jax.workdir` describes the layout):

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
report     draws the figure at a glance, writes the report ``samples/methods_panel.png`` (toys) or
                                                           ``samples/interpolation.png`` (images),
                                                           ``report.md``, ``report.html``
=========  ==============================================  ===========================================

With ``log.tensorboard`` the stages also write TensorBoard event files to ``tensorboard/`` (solver
histories, training losses, final metrics, sample grids); with ``log.progress`` the OT fit logs its progress.

The run lifecycle:

* Each stage's output is keyed by the config fields it reads and the keys of the stages it consumes
  (:func:`lsot_jax.config.stage_keys`); a finished stage writes one marker, ``<stage>/DONE.json``, holding
  its key. A rerun skips every stage whose key matches and recomputes the later ones: a change of
  ``sample.*`` recomputes sample, eval and report; a change of ``eval.*`` eval and report. The results of the
  superseded setting are moved to ``superseded/<stage>-<key>/`` (never deleted); the report names the
  setting it shows. A change that would alter a finished ae, encode or ot stage (e.g. ``ae.latent_dim``)
  raises :class:`ConfigMismatchError` naming the fields, unless ``overwrite=True``, which moves the old
  workdir aside (``<workdir>.old-<timestamp>``). Location fields (``data.data_dir``, device counts, the
  classifier cache) may change freely.
* An interrupted stage resumes from its last checkpoint; every random key is ``fold_in`` of the config seed,
  a per-stage salt and the step (or the method and sample seed), so a resumed run ends with the same metrics
  as an uninterrupted one.
* The data is loaded before anything is written, so missing data fails fast and leaves no trace.
* NaN/Inf in the OT heights or energy stops the run with :class:`OTDiverged` naming the stage and step; a
  useless fit (most of the mass in one cell) with :class:`OTFitUseless`; the finished stages stay. Training
  divergence raises :class:`lsot_jax.train.TrainingDiverged`.
* Multi-host: only process 0 writes files; every process reads them.

Beyond one device: ``ot.num_devices`` shards the codes of the OT fit over a mesh and ``ae.num_devices``
trains the autoencoder data-parallel; both may change between reruns. Scans: :func:`run_scan`
(:mod:`lsot_jax.scans`).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional

import ml_collections
import numpy as np

from lsot_jax import config as config_lib
from lsot_jax import report as report_lib
from lsot_jax import solver as solver_lib
from lsot_jax import stage_ot
from lsot_jax import stages
from lsot_jax import workdir as workdir_lib
from lsot_jax.config import (AE_KINDS, BASELINE_METHODS, FEATURE_SPACES, LSOT_METHODS, METHOD_LABELS, METHODS,
                             OT_SOLVERS, SCAN_FIELDS, STAGES, ConfigMismatchError, OTDiverged, OTFitUseless,
                             PipelineError, adam_solver, config_diff, default_config, newton_solver, sample_key,
                             validate_config)
from lsot_jax.samplers import lsot_generate_kwargs
from lsot_jax.scans import run_scan

__all__ = [
    "AE_KINDS", "BASELINE_METHODS", "ConfigMismatchError", "FEATURE_SPACES", "LSOT_METHODS", "METHODS",
    "METHOD_LABELS", "OTDiverged", "OTFitUseless", "OT_SOLVERS", "PipelineError", "SCAN_FIELDS", "STAGES",
    "adam_solver", "check_run", "config_diff", "default_config", "load_encoded_codes", "load_potential",
    "lsot_generate_kwargs", "newton_solver", "run", "run_scan", "sample_key", "validate_config",
]

_LOG = logging.getLogger(__name__)


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
    PipelineError: bad config values, a workdir whose finished models were made with another config
      (:class:`ConfigMismatchError`), a missing earlier stage, OT divergence (:class:`OTDiverged`), a useless
      OT fit (:class:`OTFitUseless`).
    lsot_jax.data.DataNotFoundError: the dataset is not on this machine (the message has the command).
    lsot_jax.train.TrainingDiverged: a training loss became NaN/Inf.
  """
  log = log or _LOG.info
  if stage is not None and stage not in STAGES:
    raise PipelineError(f"Unknown stage {stage!r}; valid stages: {', '.join(STAGES)}.")
  ctx = stages.open_run(config, workdir, overwrite, log, load_data=stage != "report")
  if stage is not None:
    missing = [s for s in STAGES[:STAGES.index(stage)] if not ctx.wd.is_done(s, config.sample.methods)]
    if missing:
      raise PipelineError(f"Stage {stage!r} needs the earlier stage(s) {missing} finished first: rerun without "
                          f"--stage (or with --stage {missing[0]}).")
  selected = STAGES[:-1] if stage is None else tuple(s for s in (stage,) if s != "report")
  results = stages.Results(ctx)
  try:
    for name in selected:
      stages.run_stage(ctx, results, name)
  finally:
    ctx.close()
  if stage in (None, "eval") and ctx.wd.is_done("eval"):
    drawn = stages.draw_figures(ctx, results)
    if drawn is not None:
      log(f"report: drew {drawn}")
  if stage in (None, "eval", "report") and ctx.wd.is_done("eval") and workdir_lib.is_writer():
    md, html = report_lib.write_report(ctx.wd.root)
    log(f"report: wrote {md} and {html}")
  return workdir_lib.read_json(ctx.wd.metrics_path)


def check_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Checks, without writing anything, that ``workdir`` holds a run whose finished models ``config`` matches.

  Raises:
    PipelineError: bad config values, or no ``config.json`` in ``workdir``.
    ConfigMismatchError: a finished ae, encode or ot stage was made with other values of its fields
      (locations aside).
  """
  wd = workdir_lib.Workdir(workdir)
  if not wd.config_path.is_file():
    raise PipelineError(f"{wd.root} holds no run (no {workdir_lib.CONFIG}).")
  validate_config(config)
  config_lib.check_devices(config)
  wd.check(config)


def load_potential(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> solver_lib.BrenierPotential:
  """The fitted Brenier potential of a finished ot stage in ``workdir`` (made with ``config``).

  Returns:
    :class:`lsot_jax.solver.BrenierPotential` with y of shape [n, d] (the OT codes) and h of shape [n].

  Raises:
    PipelineError: no finished ot stage, or a workdir of another config.
  """
  check_run(config, workdir)
  wd = workdir_lib.Workdir(workdir)
  return stage_ot.load_fit(config, wd, wd.load_codes()).potential


def load_encoded_codes(workdir: str | os.PathLike) -> np.ndarray:
  """The codes [n, d] the ot stage of ``workdir`` fits (its ``ot.num_codes`` subset of the encode stage's).

  Raises:
    PipelineError: no finished encode stage.
  """
  return workdir_lib.Workdir(workdir).load_codes().ot_codes
