"""The ot stage: fits the Brenier potential to the codes, checkpointed and resumable, and checks the fit.

:func:`fit_ot` runs the solver of ``ot.solver`` in chunks of ``ot.checkpoint_every`` steps (a Newton step
per chunk), sharded over ``ot.num_devices`` (checkpoints hold the unsharded state, so a run resumes on any
device count), stops with :class:`lsot_jax.config.OTDiverged` on NaN/Inf, then measures the final marginal
error on ``ot.marginal_samples`` source points. A useless fit (:func:`check_fit`: L1 error above
:data:`USELESS_L1` or one cell holding more than :data:`USELESS_CELL_MASS` of the mass) stops the run with
:class:`lsot_jax.config.OTFitUseless`; an unconverged one is reported as such.

With ``log.progress`` a :class:`lsot_jax.tracking.ProgressLogger` shows the solver's progress every
``log.progress_every`` steps (the solver's ``callback``; it does not change the result); with a tracker,
each chunk's per-step histories go to ``ot/...`` scalars and the final marginal errors to ``ot/final/...``.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lsot_jax import artifacts
from lsot_jax import config as config_lib
from lsot_jax import newton as newton_lib
from lsot_jax import report as report_lib
from lsot_jax import sharding
from lsot_jax import solver as solver_lib
from lsot_jax import sources
from lsot_jax import tracking
from lsot_jax import workdir as workdir_lib

__all__ = ["USELESS_CELL_MASS", "USELESS_L1", "check_fit", "fit_ot", "load_fit", "make_problem",
           "marginal_errors", "progress_solver"]

# A fit whose L1 marginal error (at most 2) exceeds this, or whose largest cell holds more than this share
# of the source mass, is useless: generation from it would collapse onto few codes.
USELESS_L1 = 1.5
USELESS_CELL_MASS = 0.5


def make_problem(config: ml_collections.ConfigDict, codes: artifacts.Codes) -> solver_lib.SemidiscreteProblem:
  """The OT problem of the codes' subset, with the source of ``ot.source``."""
  y = codes.ot_codes
  return solver_lib.make_problem(y, source=sources.make_source(config.ot.source, y.shape[1]))


@functools.lru_cache(maxsize=8)
def _jitted_run(run: Callable[..., Any]) -> Callable[..., Any]:
  """``jit`` of a solver class's ``run`` with the solver as an argument (a pytree: its static fields are part
  of the cache key, the learning rate is traced), so that every ot stage of a process with the same solver
  settings and shapes reuses one compilation."""
  return jax.jit(run, static_argnames="num_steps")


@functools.partial(jax.jit, static_argnames="num_samples")
def marginal_errors(potential: solver_lib.BrenierPotential, key: jax.Array, source: Any, weights: jax.Array,
                    num_samples: int) -> Dict[str, jax.Array]:
  """:meth:`BrenierPotential.marginal_errors` plus ``max_cell_mass`` (the largest cell's share of the source
  mass, from the same samples' cell masses), compiled once per shape for every stage of a process."""
  errs = potential.marginal_errors(key, source, weights, num_samples)
  masses = potential.cell_masses(key, source, num_samples)
  return dict(errs, max_cell_mass=jnp.max(masses))


def _finished(solver: Any, problem: solver_lib.SemidiscreteProblem, state: Any) -> bool:
  if isinstance(solver, newton_lib.NewtonSolver):
    return bool(solver.finished(problem, state))
  return bool(state.converged) or int(state.it) >= solver.num_iterations


def _progress(solver: Any, state: Any) -> str:
  """One log line for a checkpointed chunk of the OT fit."""
  it = int(state.it)
  if isinstance(solver, newton_lib.NewtonSolver):
    return (f"ot: step {it}/{solver.num_iterations}, sample {int(state.sample_sizes[it - 1])}, sample L1 "
            f"{float(state.errors[it - 1]):.4f}, fresh error bound {float(state.error_bound):.4f}")
  last = state.window_errors[max(it // solver.window - 1, 0)]
  return (f"ot: step {it}/{solver.num_iterations}, window L1 marginal error {float(last):.4f}, "
          f"batch {int(state.batch_sizes[it - 1])}")


def _history(solver: Any, state: Any) -> Dict[str, Any]:
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
        "num_averaged": int(state.num_averaged),
        "effective_sample_size": solver.effective_sample_size(int(state.h.shape[0])),
        # Every stage (and the verification) done: a normal end when tol is 0, not a step budget run out.
        "schedule_done": bool(int(state.stage) >= len(solver.schedule(int(state.h.shape[0])))),
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


class _LineLogger:
  """A ``logging.Logger`` stand-in for :class:`lsot_jax.tracking.ProgressLogger` that hands its lines to the
  stage's ``log``."""

  def __init__(self, log: Callable[[str], None]):
    self._log = log

  def info(self, message: str, *args: Any) -> None:
    self._log(message % args if args else message)


def progress_solver(config: ml_collections.ConfigDict, solver: Any, log: Callable[[str], None]
                    ) -> Tuple[Any, Optional[tracking.ProgressLogger]]:
  """``solver`` with the progress callback of ``log.*`` set, and that callback (None without progress).

  The :class:`lsot_jax.tracking.ProgressLogger` (one per stage run: a new callback object compiles anew)
  writes its lines to ``log`` without a terminal, every ``log.progress_every`` steps (0: the solver's
  ``callback_every``), at most one per ``log.progress_seconds``.
  """
  if not config.log.progress:
    return solver, None
  progress = tracking.ProgressLogger(total=solver.num_iterations, desc="ot",
                                     log_every_s=float(config.log.progress_seconds), logger=_LineLogger(log))
  every = int(config.log.progress_every) or solver.callback_every
  return dataclasses.replace(solver, callback=progress, callback_every=every), progress


def check_fit(config: ml_collections.ConfigDict, summary: Dict[str, Any], folder: str) -> None:
  """Stops the run on a useless fit (see the module docstring).

  Raises:
    OTFitUseless: naming the stage, the error and what to change.
  """
  l1, mass = float(summary["marginal_l1"]), float(summary["max_cell_mass"])
  if l1 <= USELESS_L1 and mass <= USELESS_CELL_MASS:
    return
  if config.ot.solver == "newton":
    change = "check the --config.ot.newton.* settings (or use --config.ot.solver=adam)"
  else:
    change = f"lower --config.ot.learning_rate (now {config.ot.learning_rate:g})"
  raise config_lib.OTFitUseless(
      f"Stage 'ot': the fit is useless: L1 marginal error {l1:.3f} (of at most 2) and one cell holds "
      f"{mass:.1%} of the source mass, so samples would collapse onto a few codes. The earlier stages and the "
      f"solver checkpoint ({folder}) are kept; {change} and rerun.", l1, mass)


def fit_ot(config: ml_collections.ConfigDict, wd: workdir_lib.Workdir, codes: artifacts.Codes,
           log: Callable[[str], None], tracker: Optional[tracking.Tracker] = None
           ) -> Tuple[artifacts.OTFit, Dict[str, Any]]:
  """Runs (or resumes) the OT fit of the codes.

  Args:
    config: the run's config.
    wd: the workdir.
    codes: the encoded training set.
    log: takes one line (progress lines included).
    tracker: where the solver histories (``ot/<name>`` at each step) and the final marginal errors
      (``ot/final/<name>``) go; None writes nothing.

  Returns:
    ``(fit, summary)``: the fit, and the facts of ``DONE.json`` (iterations, convergence, marginal errors).

  Raises:
    OTDiverged: non-finite heights or energy (the last good checkpoint stays).
    OTFitUseless: see :func:`check_fit`.
  """
  problem, solver = make_problem(config, codes), config_lib.ot_solver(config)
  start = time.perf_counter()
  state = wd.restore_ot_state(solver.init(problem))
  if int(state.it):
    log(f"ot: resuming from solver step {int(state.it)}")
  written = int(state.it)
  shown, progress = progress_solver(config, solver, log)
  rng = config_lib.config_key(config, config_lib.SALT_OT)
  n = problem.num_targets
  mesh = config_lib.mesh_for(config, "ot.num_devices")
  if mesh is None:
    run_problem, run_solver = problem, shown
    to_device = from_device = lambda s: s  # pylint: disable=unnecessary-lambda-assignment
  else:
    # The solver runs on the padded, sharded problem; checkpoints and the rest of the stage see the unpadded
    # state (replicated), so a later run may resume on any device count.
    run_problem = sharding.shard_problem(problem, mesh)
    run_solver = sharding.make_sharded_solver(shown, mesh)
    size = run_problem.num_targets
    def to_device(s):
      return sharding.place_state(sharding.pad_state(s, size), mesh)

    def from_device(s):
      return sharding.replicate(mesh, sharding.unpad_state(s, n))
    log(f"ot: {n} codes sharded over {mesh.size} devices ({size // mesh.size} per device)")
  # A Newton step is a whole pass over a stage sample: checkpoint after every step.
  chunk = 1 if isinstance(solver, newton_lib.NewtonSolver) else int(config.ot.checkpoint_every)
  run_fn = _jitted_run(type(run_solver).run)
  device_state = to_device(state)
  with wd.ot_checkpointer() as ckpt:
    while True:
      if not _finished(solver, problem, state):
        device_state = run_fn(run_solver, rng, run_problem, device_state, num_steps=chunk)
        state = from_device(device_state)
        written = tracking.write_solver_history(tracker, state, "ot", start=written)
      it = int(state.it)
      if bool(state.diverged) or not bool(jnp.all(jnp.isfinite(state.h))):
        raise config_lib.OTDiverged(max(it - 1, 0), str(ckpt.directory), ckpt.latest_step())
      workdir_lib.save_ot_state(ckpt, state)
      if _finished(solver, problem, state):
        break
      log(_progress(solver, state))
  jax.effects_barrier()
  if progress is not None:
    progress.close()
  fit = artifacts.OTFit(problem, solver, state)
  errs = marginal_errors(fit.potential, config_lib.config_key(config, config_lib.SALT_MARGINAL), problem.source,
                         problem.weights, num_samples=int(config.ot.marginal_samples))
  tracking.write_metrics(tracker, int(state.it), {k: float(v) for k, v in errs.items()}, "ot/final")
  history = {"iterations": int(state.it), "converged": bool(state.converged), **_history(solver, state),
             "num_codes": n, **{f"marginal_{k}": float(v) for k, v in errs.items() if k != "max_cell_mass"},
             "max_cell_mass": float(errs["max_cell_mass"])}
  workdir_lib.write_json(wd.path("ot", "history.json"), history)
  if workdir_lib.is_writer():
    report_lib.plot_convergence(wd.path("ot", "convergence.png"), history)
  summary = {k: history[k] for k in ("iterations", "converged", "num_codes", "marginal_l1", "marginal_max_rel",
                                     "marginal_noise_floor", "marginal_chi2", "marginal_l1_bound", "max_cell_mass",
                                     "solver")}
  summary["schedule_done"] = history.get("schedule_done")
  summary["seconds_this_run"] = time.perf_counter() - start
  log(f"ot: {summary['iterations']} steps ({summary['solver']}), converged={summary['converged']}, L1 marginal "
      f"error {summary['marginal_l1']:.4f} (noise floor {summary['marginal_noise_floor']:.4f}; unbiased bound "
      f"sqrt(chi^2) {summary['marginal_l1_bound']:.4f})")
  check_fit(config, summary, str(wd.root / "ot" / "ckpt"))
  if history.get("schedule_done") and not summary["converged"]:
    log(f"ot: newton ran its whole sample schedule (noise of {history['effective_sample_size']:,} source "
        f"points); raise --config.ot.newton.max_samples for a lower noise floor.")
  elif not summary["converged"]:
    budget = ("ot.newton.num_iterations" if summary["solver"] == "newton" else "ot.num_iterations")
    log(f"ot: not converged: the fit stopped at its step budget ({summary['iterations']} steps) above its "
        f"tolerance; its samples are usable but less accurate; raise --config.{budget} for a converged fit.")
  return fit, summary


def load_fit(config: ml_collections.ConfigDict, wd: workdir_lib.Workdir, codes: artifacts.Codes) -> artifacts.OTFit:
  """The OT fit of a finished ot stage (restored, not refitted).

  Raises:
    PipelineError: no finished ot stage.
  """
  if not wd.is_done("ot"):
    raise config_lib.PipelineError(f"No finished OT stage in {wd.root / 'ot'}; run --stage ot first.")
  problem, solver = make_problem(config, codes), config_lib.ot_solver(config)
  return artifacts.OTFit(problem, solver, wd.restore_ot_state(solver.init(problem)))
