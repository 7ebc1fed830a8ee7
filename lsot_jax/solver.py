"""The convex-potential discriminator: a semi-discrete Brenier solver.

Given target codes y_1..y_n with weights nu and a source measure mu on R^d, the discriminator is the convex
piecewise-linear potential

    u_h(x) = max_i ( <x, y_i> + h_i ),

and training it means minimising the convex energy (Liu et al. 2018, eq. 9; Gu et al. 2016)

    E(h) = E_{x~mu}[ u_h(x) ] - sum_i nu_i h_i ,      grad_i E(h) = w_i(h) - nu_i ,

where w_i(h) = mu(W_i(h)) is the mass of the power cell of y_i. At the minimiser every cell carries its target
mass and ``T(x) = grad u_h(x) = y[argmax_i(<x, y_i> + h_i)]`` is the quadratic-cost optimal transport (Brenier)
map from mu to nu. This is a minimisation only: no min-max.

The solver is first order and Monte-Carlo: at step t it draws a batch from mu with the key
``fold_in(rng, t)``, assigns it with the tiled kernel (:mod:`lsot_jax.kernels`), forms the histogram
gradient, takes an Adam step, and mean-centres h. The batch size grows geometrically in stages: a stage ends
when the marginal error measured over a window of steps stops improving or reaches the sampling-noise floor
of the batch, and each new stage also multiplies the step size by ``lr_decay``. The loop runs on device:
each stage is a ``lax.while_loop`` with a static batch size, the histories are preallocated, and the run
stops when the window-averaged L1 marginal error falls below ``tol``. The step-control rules are the pure
functions of :mod:`lsot_jax.control`.

The problem (:class:`SemidiscreteProblem`, :func:`make_problem`, the score-gap step unit, duplicate codes,
masked cells) and the marginal-error estimators live in :mod:`lsot_jax.problem` and are re-exported here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from lsot_jax import control
from lsot_jax import kernels
from lsot_jax import problem as problem_lib
from lsot_jax.problem import (
    SemidiscreteProblem,
    centre,
    make_problem,
    marginal_chi2,
    masked_heights,
    noise_floor_bound,
    noise_floor_l1,
    sampling_floor,
    score_gap,
    voronoi_heights,
)

__all__ = ["BrenierPotential", "BrenierSolver", "SolverState"] + problem_lib.__all__


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BrenierPotential:
  """The fitted potential u_h(x) = max_i(<x, y_i> + h_i) and its gradient, the Brenier map.

  Attributes:
    y: Array of shape [n, d], target codes.
    h: Array of shape [n], heights (already -1e30 for cells that must stay empty).
    tile_size: targets per tile in the assignment kernel (static).
    row_chunk: source rows per chunk in the assignment kernel (static).
    method: assignment reduction, see :func:`lsot_jax.kernels.assign` (static).
  """

  y: jax.Array
  h: jax.Array
  tile_size: int = dataclasses.field(default=8192, metadata=dict(static=True))
  row_chunk: int = dataclasses.field(default=4096, metadata=dict(static=True))
  method: str = dataclasses.field(default="auto", metadata=dict(static=True))

  def _assign(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    if x.ndim != 2 or x.shape[1] != self.y.shape[1]:
      raise ValueError(f"Expected points of shape [M, {self.y.shape[1]}]; got {x.shape}.")
    return kernels.assign(
        x, self.y, self.h, tile_size=self.tile_size, row_chunk=self.row_chunk, method=self.method
    )

  def assign(self, x: jax.Array) -> jax.Array:
    """Cell index of each point. x: [M, d] -> int32 [M]."""
    return self._assign(x)[0]

  def transport(self, x: jax.Array) -> jax.Array:
    """Brenier map T(x) = y[argmax_i(<x, y_i> + h_i)]. x: [M, d] -> [M, d]."""
    return self.y[self.assign(x)]

  def potential(self, x: jax.Array) -> jax.Array:
    """The convex potential u_h(x). x: [M, d] -> [M]."""
    return self._assign(x)[1]

  def cell_masses(
      self, rng: jax.Array, source, num_samples: int, batch_size: int = 65536
  ) -> jax.Array:
    """Monte-Carlo cell masses w(h) from ``num_samples`` source points drawn in batches.

    Memory stays O(batch_size * d + n) whatever ``num_samples`` is. ``num_samples`` is rounded up to a
    multiple of the batch size.

    Returns:
      Array of shape [n] summing to 1.
    """
    batch = min(batch_size, num_samples)
    num_batches = -(-num_samples // batch)
    n = self.y.shape[0]

    def body(i, counts):
      x = source.sample(jax.random.fold_in(rng, i), batch)
      return counts + kernels.cell_histogram(self.assign(x), n)

    counts = jax.lax.fori_loop(0, num_batches, body, jnp.zeros((n,), jnp.float32))
    return counts / num_batches

  def marginal_errors(
      self, rng: jax.Array, source, weights: jax.Array, num_samples: int, batch_size: int = 65536
  ) -> Dict[str, jax.Array]:
    """L1 and max-relative marginal errors of the cell masses against ``weights``.

    Returns:
      dict with ``l1`` = sum_i |w_i - nu_i|, ``max_rel`` = max_i |w_i - nu_i| / nu_i (over nu_i > 0),
      ``noise_floor`` = the L1 error an exact solution would show with this many samples, ``chi2`` = the
      unbiased chi^2 error (:func:`marginal_chi2`) and ``l1_bound`` = sqrt(max(chi2, 0)), whose expectation
      bounds the true L1 error from above and which has no noise floor.
    """
    w = self.cell_masses(rng, source, num_samples, batch_size)
    diff = jnp.abs(w - weights)
    rel = jnp.where(weights > 0, diff / jnp.where(weights > 0, weights, 1.0), 0.0)
    batch = min(batch_size, num_samples)
    total = batch * -(-num_samples // batch)
    chi2 = marginal_chi2(jnp.round(w * total), weights, total)
    return dict(l1=jnp.sum(diff), max_rel=jnp.max(rel), noise_floor=noise_floor_l1(weights, total),
                chi2=chi2, l1_bound=jnp.sqrt(jnp.maximum(chi2, 0.0)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SolverState:
  """State of :class:`BrenierSolver` (a pytree; checkpoint it to resume).

  Attributes:
    it: scalar int32, iterations done.
    stage: scalar int32, current batch-size stage.
    h: Array of shape [n], mean-centred heights.
    opt_state: Adam state (moments of shape [n]).
    window_hist: Array of shape [n], histogram accumulated over the current window.
    window_batch_error: scalar, sum of the per-step batch L1 errors over the current window.
    best_window_error: scalar, lowest window error of the current stage.
    lr_boost: scalar, factor on the step size from sustained drift (doubled, up to ``max_boost``, at the
      end of every window in which the heights kept moving one way; see ``drift_threshold``).
    converged: scalar bool, the window L1 error fell below ``tol``.
    diverged: scalar bool, a non-finite value appeared (the run stops; h keeps its last finite value).
    losses: Array of shape [num_iterations], energy estimates E(h) per step (inf where not run).
    errors: Array of shape [num_iterations], batch L1 marginal errors per step.
    batch_sizes: int32 array of shape [num_iterations], batch size used at each step.
    window_errors: Array of shape [num_iterations // window], window-averaged L1 errors.
  """

  it: jax.Array
  stage: jax.Array
  h: jax.Array
  opt_state: Any
  window_hist: jax.Array
  window_batch_error: jax.Array
  best_window_error: jax.Array
  lr_boost: jax.Array
  converged: jax.Array
  diverged: jax.Array
  losses: jax.Array
  errors: jax.Array
  batch_sizes: jax.Array
  window_errors: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class BrenierSolver:
  """Monte-Carlo Adam solver for the semi-discrete convex energy.

  ``learning_rate`` is a pytree leaf (it may be a traced array, so ``jax.vmap`` can scan it); every other
  field is static.

  Attributes:
    learning_rate: relative Adam step (times ``problem.scale``) in the first stage.
    num_iterations: maximum number of steps (history length).
    batch_size: source samples per step in the first stage.
    max_batch_size: batch size of the last stage (a power-of-``growth`` multiple of ``batch_size``).
    growth: batch-size factor between stages.
    lr_decay: step-size factor between stages.
    window: steps per window; marginal errors are averaged over a window for the convergence test and the
      stall test. The rules are the pure functions of :mod:`lsot_jax.control`.
    tol: stop when the L1 marginal error is below this (:func:`lsot_jax.control.is_converged`): the
      window-averaged histogram's error and the mean per-step batch error must both be consistent with
      ``tol`` given one batch's noise floor (:func:`sampling_floor`: 0 for a full-support
      :class:`~lsot_jax.sources.DiscreteSource` batch, whose gradient is exact).
    stall_ratio: a stage ends when a window's error is not below ``stall_ratio`` times the stage's best
      (:func:`lsot_jax.control.is_stalled`).
    floor_factor: a stage also ends when a window's error is below ``floor_factor`` times its noise floor.
    drift_threshold: Adam's direction consistency (:func:`lsot_jax.control.direction_consistency`, about 1
      while the heights move steadily one way, 0.2 or less for noise or oscillation) at or above which a
      window counts as drift: it is never a stall, and it multiplies the step by ``1 / lr_decay`` (see
      ``lr_boost``). The score-gap unit is right near the optimum but small when the start is far from it
      (a source and codes of different spread): drift lets the step grow to the distance to be covered.
    max_boost: cap of ``lr_boost``.
    initialisation: ``"voronoi"`` (h = -|y - m|^2 / 2 with m the weighted mean of the codes: the Voronoi
      diagram of the codes translated onto the source, so the start, like the OT map, is equivariant to a
      translation of the codes; for codes far from the origin, the plain -|y|^2 / 2 starts with nearly all
      the mass in the few codes nearest the origin, e.g. L1 error 1.99 on MNIST codes) or ``"zero"``.
    extra_decays: stages appended after the largest batch, each one more ``lr_decay`` step at that batch
      (the step size keeps shrinking when progress stalls, e.g. with an exact full-batch gradient).
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    tile_size: targets per tile in the assignment kernel.
    row_chunk: source rows per chunk in the assignment kernel.
    method: assignment reduction (``"fused"``, ``"topk"``, ``"argmax"``, ``"auto"``). The default ``"fused"``
      counts scores within 16 ulps of the max as ties (lowest index wins), which absorbs the rounding-level
      differences between a vmapped or sharded run and a one-by-one run; an Adam trajectory is chaotic in
      a flipped sample, and with the exact-max rule of ``"topk"`` one of three vmapped settings of
      tests/test_solver.py drifted 3e-3 from its one-by-one run after 15 steps. ``"topk"`` is ~1.6x faster
      on the CPU (:mod:`lsot_jax.kernels`).
    callback: optional host function called every ``callback_every`` steps from the jitted loop with a dict
      of Python scalars: ``step`` (steps done), ``num_samples`` (the step's batch size), ``l1`` (its batch L1
      error), ``energy`` (its energy estimate), ``stage`` and ``lr`` (the step size used). It changes nothing
      computed; calls are unordered (``jax.effects_barrier()`` waits for them); under ``jax.vmap`` each run
      reports its own scalars (:func:`lsot_jax.control.report_progress`).
    callback_every: steps between calls (>= 1), counted over the run, so chunks report as one call.
  """

  learning_rate: Any = 1.0
  num_iterations: int = dataclasses.field(default=2000, metadata=dict(static=True))
  batch_size: int = dataclasses.field(default=4096, metadata=dict(static=True))
  max_batch_size: int = dataclasses.field(default=131072, metadata=dict(static=True))
  growth: int = dataclasses.field(default=2, metadata=dict(static=True))
  lr_decay: float = dataclasses.field(default=0.5, metadata=dict(static=True))
  window: int = dataclasses.field(default=10, metadata=dict(static=True))
  tol: float = dataclasses.field(default=0.05, metadata=dict(static=True))
  stall_ratio: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  floor_factor: float = dataclasses.field(default=1.5, metadata=dict(static=True))
  drift_threshold: float = dataclasses.field(default=0.5, metadata=dict(static=True))
  max_boost: float = dataclasses.field(default=1024.0, metadata=dict(static=True))
  extra_decays: int = dataclasses.field(default=12, metadata=dict(static=True))
  initialisation: str = dataclasses.field(default="voronoi", metadata=dict(static=True))
  b1: float = dataclasses.field(default=0.9, metadata=dict(static=True))
  b2: float = dataclasses.field(default=0.99, metadata=dict(static=True))
  tile_size: int = dataclasses.field(default=8192, metadata=dict(static=True))
  row_chunk: int = dataclasses.field(default=4096, metadata=dict(static=True))
  method: str = dataclasses.field(default="fused", metadata=dict(static=True))
  callback: Optional[Callable[[Dict[str, Any]], None]] = dataclasses.field(
      default=None, metadata=dict(static=True)
  )
  callback_every: int = dataclasses.field(default=10, metadata=dict(static=True))

  def __post_init__(self):
    if self.initialisation not in ("voronoi", "zero"):
      raise ValueError(f"Unknown initialisation {self.initialisation!r}; use 'voronoi' or 'zero'.")
    if self.method not in ("auto",) + kernels.METHODS:
      raise ValueError(f"Unknown method {self.method!r}; use 'auto' or one of {kernels.METHODS}.")
    if self.batch_size < 1 or self.max_batch_size < self.batch_size:
      raise ValueError(
          f"Need 1 <= batch_size <= max_batch_size; got {self.batch_size}, {self.max_batch_size}."
      )
    if self.growth < 2:
      raise ValueError(f"growth must be an integer >= 2; got {self.growth}.")
    if self.window < 1 or self.num_iterations < 1:
      raise ValueError("window and num_iterations must be positive.")
    if self.callback is not None and not callable(self.callback):
      raise ValueError(f"callback must be a function taking a dict, or None; got {self.callback!r}.")
    if not isinstance(self.callback_every, int) or self.callback_every < 1:
      raise ValueError(f"callback_every must be an integer >= 1; got {self.callback_every!r}.")

  @property
  def batch_schedule(self) -> Tuple[int, ...]:
    """Batch size of each stage."""
    sizes = [self.batch_size]
    while sizes[-1] < self.max_batch_size:
      sizes.append(min(sizes[-1] * self.growth, self.max_batch_size))
    return tuple(sizes) + (sizes[-1],) * self.extra_decays

  def _optimizer(self) -> optax.GradientTransformation:
    return optax.scale_by_adam(b1=self.b1, b2=self.b2)

  def init_heights(self, problem: SemidiscreteProblem) -> jax.Array:
    """Initial heights of shape [n]: centred Voronoi (-|y - mean|^2 / 2) or zero, mean-centred."""
    if self.initialisation == "voronoi":
      h = voronoi_heights(problem.y, problem.weights)
    else:
      h = jnp.zeros((problem.num_targets,), problem.y.dtype)
    return centre(h, problem.weights)

  def init(self, problem: SemidiscreteProblem, h_init: Optional[jax.Array] = None) -> SolverState:
    """Initial state (a pytree), with preallocated histories."""
    h = self.init_heights(problem) if h_init is None else centre(h_init, problem.weights)
    n = problem.num_targets
    num_windows = max(self.num_iterations // self.window, 1)
    return SolverState(
        it=jnp.zeros((), jnp.int32),
        stage=jnp.zeros((), jnp.int32),
        h=h,
        opt_state=self._optimizer().init(h),
        window_hist=jnp.zeros((n,), jnp.float32),
        window_batch_error=jnp.zeros((), jnp.float32),
        best_window_error=jnp.asarray(jnp.inf, jnp.float32),
        lr_boost=jnp.ones((), jnp.float32),
        converged=jnp.zeros((), bool),
        diverged=jnp.zeros((), bool),
        losses=jnp.full((self.num_iterations,), jnp.inf, jnp.float32),
        errors=jnp.full((self.num_iterations,), jnp.inf, jnp.float32),
        batch_sizes=jnp.zeros((self.num_iterations,), jnp.int32),
        window_errors=jnp.full((num_windows,), jnp.inf, jnp.float32),
    )

  def _cell_masses_and_potential(
      self, x: jax.Array, y: jax.Array, h: jax.Array
  ) -> Tuple[jax.Array, jax.Array]:
    """Batch cell masses and potential values: the assignment of one step.

    Subclasses override this to change where the assignment runs (e.g.
    :class:`lsot_jax.sharding.ShardedBrenierSolver` shards the targets over a device mesh).

    Args:
      x: Array of shape [M, d], source batch.
      y: Array of shape [n, d], target codes.
      h: Array of shape [n], heights (masked cells already at -1e30).

    Returns:
      ``(w, best)``: Array of shape [n], the fraction of the batch in each cell, and array of shape [M],
      ``u_h(x)``.
    """
    idx, best = kernels.assign(
        x, y, h, tile_size=self.tile_size, row_chunk=self.row_chunk, method=self.method
    )
    return kernels.cell_histogram(idx, y.shape[0]), best

  def _step(
      self,
      rng: jax.Array,
      problem: SemidiscreteProblem,
      state: SolverState,
      batch: int,
      stage: int,
      last_stage: bool,
  ) -> SolverState:
    it = state.it
    nu = problem.weights
    x = problem.source.sample(jax.random.fold_in(rng, it), batch)
    h_eff = masked_heights(state.h, nu)
    w, best = self._cell_masses_and_potential(x, problem.y, h_eff)
    grad = w - nu
    loss = jnp.mean(best) - jnp.sum(jnp.where(nu > 0, nu * state.h, 0.0))
    batch_error = jnp.sum(jnp.abs(grad))

    updates, opt_state = self._optimizer().update(grad, state.opt_state)
    lr = control.stage_learning_rate(
        self.learning_rate, self.lr_decay, stage, state.lr_boost, problem.scale
    )
    h_new = centre(state.h - lr * updates, nu)
    finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(h_new))

    window_hist, window_batch_error = control.window_update(
        state.window_hist, state.window_batch_error, w, batch_error
    )
    end_of_window = (it + 1) % self.window == 0
    window_error = control.window_error(window_hist, nu, self.window)
    window_index = jnp.minimum(it // self.window, state.window_errors.shape[0] - 1)
    window_errors = jnp.where(
        end_of_window, state.window_errors.at[window_index].set(window_error), state.window_errors
    )
    exact = control.is_exact_batch(problem.source, batch)
    converged = end_of_window & control.is_converged(
        window_error, window_batch_error / self.window, self.tol, sampling_floor(nu, batch, exact)
    )
    drifting = control.is_drifting(
        control.direction_consistency(opt_state.mu, opt_state.nu), self.drift_threshold
    )
    stalled = control.is_stalled(
        window_error, state.best_window_error, sampling_floor(nu, batch * self.window, exact),
        stall_ratio=self.stall_ratio, floor_factor=self.floor_factor, drifting=drifting,
    )
    advanced = control.next_stage(end_of_window, stalled, last_stage)
    return SolverState(
        it=it + 1,
        stage=state.stage + advanced.astype(jnp.int32),
        h=jnp.where(finite, h_new, state.h),
        opt_state=jax.tree.map(lambda a, b: jnp.where(finite, a, b), opt_state, state.opt_state),
        window_hist=jnp.where(end_of_window, jnp.zeros_like(window_hist), window_hist),
        window_batch_error=jnp.where(end_of_window, 0.0, window_batch_error),
        best_window_error=control.best_window_error_update(
            state.best_window_error, window_error, end_of_window, advanced
        ),
        lr_boost=control.lr_boost_update(
            state.lr_boost, end_of_window, drifting, advanced, self.lr_decay, self.max_boost
        ),
        converged=converged,
        diverged=~finite,
        losses=state.losses.at[it].set(loss),
        errors=state.errors.at[it].set(batch_error),
        batch_sizes=state.batch_sizes.at[it].set(batch),
        window_errors=window_errors,
    )

  def run(
      self,
      rng: jax.Array,
      problem: SemidiscreteProblem,
      state: SolverState,
      num_steps=None,
  ) -> SolverState:
    """Continues a run for at most ``num_steps`` steps (all remaining if None).

    Step t uses the key ``fold_in(rng, t)``, so a run split into chunks (for checkpointing) gives the same
    result as one call.

    Args:
      rng: PRNG key of the run.
      problem: the problem.
      state: state from :meth:`init` or a previous :meth:`run`.
      num_steps: optional int or scalar int array.

    Returns:
      The new state. It stops early once ``converged`` or ``diverged`` is set.
    """
    end = jnp.asarray(self.num_iterations, jnp.int32)
    if num_steps is not None:
      end = jnp.minimum(end, state.it + jnp.asarray(num_steps, jnp.int32))
    schedule = self.batch_schedule
    for stage, batch in enumerate(schedule):
      last = stage == len(schedule) - 1

      def cond(s, stage=stage):
        return (s.stage == stage) & (s.it < end) & ~s.converged & ~s.diverged

      def body(s, stage=stage, batch=batch, last=last):
        new = self._step(rng, problem, s, batch, stage, last)
        control.report_progress(self.callback, self.callback_every, new.it, cond(s), dict(
            step=new.it, num_samples=jnp.asarray(batch, jnp.int32), l1=new.errors[s.it],
            energy=new.losses[s.it], stage=s.stage, lr=control.stage_learning_rate(
                self.learning_rate, self.lr_decay, stage, s.lr_boost, problem.scale),
        ))
        return new

      state = jax.lax.while_loop(cond, body, state)
    return state

  def output(self, problem: SemidiscreteProblem, state: SolverState) -> BrenierPotential:
    """The fitted potential of a state."""
    return BrenierPotential(
        y=problem.y,
        h=masked_heights(state.h, problem.weights),
        tile_size=self.tile_size,
        row_chunk=self.row_chunk,
        method=self.method,
    )

  def __call__(
      self, rng: jax.Array, problem: SemidiscreteProblem, h_init: Optional[jax.Array] = None
  ) -> Tuple[BrenierPotential, SolverState]:
    """Solves from scratch. Jit it: ``jax.jit(solver)(rng, problem)``.

    Returns:
      ``(potential, state)``: the fitted :class:`BrenierPotential` and the final :class:`SolverState`
      (histories, ``converged``, ``diverged``).
    """
    state = self.run(rng, problem, self.init(problem, h_init))
    return self.output(problem, state), state
