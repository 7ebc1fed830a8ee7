"""The state of :class:`lsot_jax.newton.NewtonSolver`: a pytree of arrays (checkpoint it to resume)."""
from __future__ import annotations

import dataclasses

import jax

__all__ = ["NewtonState"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NewtonState:
  """State of :class:`NewtonSolver` (a pytree; checkpoint it to resume).

  ``R`` is the number of Hessian sample rows (:attr:`NewtonSolver.hessian_rows`), k the top-k width, T the
  history length (``num_iterations``).

  Attributes:
    it: scalar int32, steps done (an evaluation of a fresh sample or a Newton step).
    stage: scalar int32, current sample stage (``len(stage_sizes)`` once finished).
    stage_it: scalar int32, Newton steps taken in the current stage.
    evaluated: scalar bool, whether ``counts`` ... ``top_idx`` describe ``h`` on the stage's sample.
    stalled: scalar bool, the last line search found no acceptable step.
    halvings: scalar int32, halvings of the last accepted step.
    converged: scalar bool, a fresh evaluation met ``tol``.
    diverged: scalar bool, a non-finite value appeared.
    h: Array of shape [n], mean-centred heights: the solver's result (in the averaging stage the running
      average of the iterates).
    h_iter: Array of shape [n], the averaging stage's iterate (equal to ``h`` before that stage).
    num_averaged: scalar int32, iterates in the average so far.
    counts: int32 array of shape [n], samples per cell at ``h`` on the stage sample.
    energy: scalar, E(h) on the stage sample.
    top_vals: Array of shape [R, k], top-k scores of the Hessian rows at ``h``.
    top_idx: int32 array of shape [R, k], their cells.
    samples_scored: scalar float32, source samples scored so far (every pass counted).
    error_bound: scalar, the last fresh sqrt(chi^2) (inf before the first).
    errors: Array [T], L1 error of each step's heights on its stage sample.
    chi2: Array [T], unbiased chi^2 of fresh evaluations (nan for Newton steps).
    fresh_l1: Array [T], plain L1 of fresh evaluations (nan for Newton steps).
    sample_sizes: int32 array [T], the stage sample size of each step.
    scored: Array [T], ``samples_scored`` after each step.
    energies: Array [T], E(h) after each step.
    alphas: Array [T], accepted damping (0: rejected; nan: evaluation step).
    cg_iterations: int32 array [T].
    empty_cells: int32 array [T], cells with positive weight and no sample after each step.
  """

  it: jax.Array
  stage: jax.Array
  stage_it: jax.Array
  evaluated: jax.Array
  stalled: jax.Array
  halvings: jax.Array
  converged: jax.Array
  diverged: jax.Array
  h: jax.Array
  h_iter: jax.Array
  num_averaged: jax.Array
  counts: jax.Array
  energy: jax.Array
  top_vals: jax.Array
  top_idx: jax.Array
  samples_scored: jax.Array
  error_bound: jax.Array
  errors: jax.Array
  chi2: jax.Array
  fresh_l1: jax.Array
  sample_sizes: jax.Array
  scored: jax.Array
  energies: jax.Array
  alphas: jax.Array
  cg_iterations: jax.Array
  empty_cells: jax.Array
