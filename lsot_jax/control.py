"""Step control of the Monte-Carlo Adam solver (:class:`lsot_jax.solver.BrenierSolver`) as small pure rules,
the Newton solver's stage-end rule (:func:`newton_stage_ends`), and the progress callback shared by the
solvers.

The solver takes one Adam step per source batch; the rules below decide, from the statistics of the last
``window`` steps, when the run has converged, when a batch-size stage ends, and how the step size changes.
Each rule is a pure function of arrays (scalars unless stated), so that it can be tested on hand-made inputs
and works under ``jax.vmap``:

* a *window* accumulates the batch histograms w (shape [n]) and the batch L1 errors sum_i |w_i - nu_i| of
  ``window`` consecutive steps (:func:`window_update`); its error is the L1 error of the averaged histogram
  (:func:`window_error`);
* **convergence** (:func:`is_converged`): the window error is below ``tol`` and the mean per-step batch error
  is consistent with ``tol`` given the sampling noise ``floor`` of one batch;
* **drift** (:func:`direction_consistency`, :func:`is_drifting`): Adam's moments say the heights keep moving
  one way (the error may stay flat while empty cells rise towards the source);
* **stall** (:func:`is_stalled`): a window that did not improve on the stage's best (and is not drift), or
  whose error is within ``floor_factor`` of the noise floor of the window's samples;
* **stage change** (:func:`next_stage`): a stalled window ends the stage, except in the last stage;
  the new stage restarts the best error (:func:`best_window_error_update`);
* **step size** (:func:`stage_learning_rate`, :func:`lr_boost_update`): the stage's step is
  ``learning_rate * lr_decay**stage * boost * scale``; drift multiplies the boost by ``1 / lr_decay`` at the
  end of a window, up to ``max_boost``.

The progress callback (:func:`report_progress`) calls a host function from inside the jitted loop every
``every`` steps with a dict of scalars.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lsot_jax import sources as sources_lib

__all__ = [
    "best_window_error_update",
    "direction_consistency",
    "is_converged",
    "is_drifting",
    "is_exact_batch",
    "is_stalled",
    "lr_boost_update",
    "newton_stage_ends",
    "next_stage",
    "report_progress",
    "stage_learning_rate",
    "window_error",
    "window_update",
]


def is_exact_batch(source: Any, num_samples: int) -> bool:
  """Whether a batch of ``num_samples`` source samples gives the exact gradient (a static Python bool).

  True for a :class:`~lsot_jax.sources.DiscreteSource` batch of all its points (its samples are the points
  themselves, each once): the histogram is then exact and the batch has no sampling-noise floor.

  Args:
    source: the source measure.
    num_samples: batch size (static).
  """
  return isinstance(source, sources_lib.DiscreteSource) and num_samples == source.num_points


def window_update(
    window_hist: jax.Array, window_batch_error: jax.Array, w: jax.Array, batch_error: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Adds one step to the window accumulators.

  Args:
    window_hist: Array of shape [n], sum of the batch histograms of the window so far.
    window_batch_error: scalar, sum of the batch L1 errors of the window so far.
    w: Array of shape [n], this step's batch histogram (fractions of the batch per cell).
    batch_error: scalar, this step's batch L1 error sum_i |w_i - nu_i|.

  Returns:
    ``(window_hist + w, window_batch_error + batch_error)``.
  """
  return window_hist + w, window_batch_error + batch_error


def window_error(window_hist: jax.Array, weights: jax.Array, window: int) -> jax.Array:
  """L1 error sum_i |window_hist_i / window - nu_i| of a window's averaged histogram.

  Args:
    window_hist: Array of shape [n], sum of ``window`` batch histograms.
    weights: Array of shape [n], target weights nu.
    window: steps per window.

  Returns:
    Scalar array.
  """
  return jnp.sum(jnp.abs(window_hist / window - weights))


def is_converged(window_error: jax.Array, mean_batch_error: jax.Array, tol: float, floor) -> jax.Array:
  """Convergence test at the end of a window.

  Both the window-averaged histogram (error ``window_error``) and the iterates themselves must be within
  ``tol``: the mean per-step batch error must be at most sqrt(tol^2 + floor^2), the error a batch of an
  iterate at L1 error ``tol`` shows with sampling noise ``floor``. The second test keeps an Adam oscillation
  whose swings cancel in the window average from passing as converged.

  Args:
    window_error: scalar, :func:`window_error` of the window.
    mean_batch_error: scalar, the mean of the window's per-step batch L1 errors.
    tol: target L1 error.
    floor: scalar, the noise floor of one batch (:func:`lsot_jax.solver.sampling_floor`; 0 for an exact
      batch).

  Returns:
    Scalar bool array.
  """
  return (window_error < tol) & (mean_batch_error <= jnp.sqrt(tol**2 + floor**2))


def direction_consistency(mu: jax.Array, nu: jax.Array) -> jax.Array:
  """Adam's direction consistency sum_i |m_i| / sum_i sqrt(v_i).

  About 1 while the heights move steadily one way (every gradient of a coordinate has the same sign, so the
  first moment m is as large as the root second moment sqrt(v)); 0.2 or less when the gradients are noise or
  oscillate around the optimum (m averages out).

  Args:
    mu: Array of shape [n], Adam's first moment m.
    nu: Array of shape [n], Adam's second moment v (not the target weights).

  Returns:
    Scalar array in [0, ~1] (0 while v is 0).
  """
  return jnp.sum(jnp.abs(mu)) / jnp.maximum(jnp.sum(jnp.sqrt(nu)), 1e-30)


def is_drifting(consistency: jax.Array, threshold: float) -> jax.Array:
  """Whether the heights are drifting: ``consistency >= threshold``. Scalar bool array."""
  return consistency >= threshold


def is_stalled(
    window_error: jax.Array,
    best: jax.Array,
    floor,
    *,
    stall_ratio: float,
    floor_factor: float,
    drifting: jax.Array,
) -> jax.Array:
  """Whether a window ends its stage's progress.

  A window is stalled when its error is not below ``stall_ratio`` times the stage's best window error and the
  heights are not drifting, or when its error is below ``floor_factor`` times the noise floor of the window's
  samples (more steps at this batch size cannot show progress), drift or not.

  Args:
    window_error: scalar, this window's error.
    best: scalar, the lowest window error of the stage before this window (inf at a stage's first window).
    floor: scalar, noise floor of the window's samples (``window`` batches; 0 for exact batches).
    stall_ratio: improvement factor a window must beat.
    floor_factor: multiple of the floor that counts as reached.
    drifting: scalar bool, :func:`is_drifting`.

  Returns:
    Scalar bool array.
  """
  return ((window_error >= stall_ratio * best) & ~drifting) | (window_error < floor_factor * floor)


def next_stage(end_of_window: jax.Array, stalled: jax.Array, last_stage: bool) -> jax.Array:
  """Whether the run moves to the next batch-size stage after this step: a stalled window ends the stage,
  except in the last stage (static ``last_stage``). Scalar bool array."""
  return end_of_window & stalled & (not last_stage)


def best_window_error_update(
    best: jax.Array, window_error: jax.Array, end_of_window: jax.Array, advanced: jax.Array
) -> jax.Array:
  """The stage's best window error after this step: unchanged inside a window, reset to inf when the stage
  ends (``advanced``), else ``min(best, window_error)`` at the end of a window. Scalar array."""
  return jnp.where(
      end_of_window, jnp.where(advanced, jnp.inf, jnp.minimum(best, window_error)), best
  )


def lr_boost_update(
    boost: jax.Array,
    end_of_window: jax.Array,
    drifting: jax.Array,
    advanced: jax.Array,
    lr_decay: float,
    max_boost: float,
) -> jax.Array:
  """The drift boost after this step: ``min(boost / lr_decay, max_boost)`` at the end of a drifting window
  that does not end the stage, else unchanged (a new stage keeps the boost). Scalar array."""
  return jnp.where(
      end_of_window & drifting & ~advanced, jnp.minimum(boost / lr_decay, max_boost), boost
  )


def stage_learning_rate(learning_rate, lr_decay: float, stage: int, boost: jax.Array, scale: jax.Array):
  """Absolute Adam step size ``learning_rate * lr_decay**stage * boost * scale``.

  Args:
    learning_rate: relative step of the first stage (a float or a traced scalar).
    lr_decay: factor between stages.
    stage: stage index (static int in the solver; an int array works too).
    boost: scalar, the drift boost (:func:`lr_boost_update`).
    scale: scalar, the problem's step unit (``problem.scale``).

  Returns:
    Scalar array.
  """
  return learning_rate * (lr_decay**stage) * boost * scale


def newton_stage_ends(error, floor, stalled, stage_it, *, stage_tol: float, max_steps: int, damped=False,
                      empty=False, max_first_steps: int = 0) -> jax.Array:
  """Whether a sample stage of :class:`lsot_jax.newton.NewtonSolver` ends before its next Newton step.

  A stage ends once its sample's L1 error is at most ``stage_tol`` times the sample's noise floor, when its
  last line search accepted no step (``stalled``), or after ``max_steps`` steps. The first stage of a solve
  that averages afterwards must hand over Newton's local regime, since the averaging steps are full steps:
  while its last accepted step was ``damped`` or a cell is ``empty`` it goes on to ``max_first_steps`` (if
  larger), and while a cell is empty its floor does not end it either.

  Args:
    error: scalar, the stage sample's L1 error.
    floor: scalar, that sample's noise floor.
    stalled: scalar bool.
    stage_it: scalar int, Newton steps taken in the stage.
    stage_tol: the floor factor.
    max_steps: steps per stage at most.
    damped: scalar bool, the first stage of an averaging solve whose last step had alpha < 1 (else False).
    empty: scalar bool, the first stage of an averaging solve with a cell that wins no sample (else False).
    max_first_steps: the cap while ``damped`` or ``empty``.

  Returns:
    Scalar bool.
  """
  outside = jnp.logical_or(damped, empty)
  cap = jnp.where(outside, max(max_first_steps, max_steps), max_steps)
  reached = (error <= stage_tol * floor) & ~jnp.asarray(empty)
  return reached | stalled | (stage_it >= cap)


def _call_host(callback: Callable[[Dict[str, Any]], None], due, info: Dict[str, Any]) -> None:
  if bool(np.asarray(due)):
    callback({k: np.asarray(v).item() for k, v in info.items()})


def report_progress(
    callback: Optional[Callable[[Dict[str, Any]], None]],
    every: int,
    step: jax.Array,
    active: jax.Array,
    info: Dict[str, jax.Array],
) -> None:
  """Calls ``callback(info)`` on the host when ``step`` is a multiple of ``every`` (and ``active``).

  Inside a jitted loop: the call is a ``jax.debug.callback`` (``ordered=False``: call
  ``jax.effects_barrier()`` before reading what it recorded) inside a ``lax.cond``, so nothing runs on other
  steps, and it does not change what the loop computes. The host function gets a dict of Python scalars.
  Under ``jax.vmap`` it is called once per batch element whose own step is due, with that element's scalars
  (the cond turns into a select there, so the host side checks the flag again; ``active`` = False marks the
  elements of a vmapped ``while_loop`` that have already stopped).

  Args:
    callback: host function taking a dict, or None (then nothing is staged).
    every: report every ``every`` steps (static int >= 1).
    step: scalar int, steps done after this one.
    active: scalar bool, whether this step is really taken.
    info: dict of scalar arrays.
  """
  if callback is None:
    return
  due = active & (step % every == 0)
  jax.lax.cond(
      due,
      lambda: jax.debug.callback(functools.partial(_call_host, callback), due, info, ordered=False),
      lambda: None,
  )
