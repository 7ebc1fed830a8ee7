"""A Monte-Carlo damped Newton solver for the semi-discrete convex energy.

The energy E(h) = E_{x~mu}[max_i(<x, y_i> + h_i)] - sum_i nu_i h_i (see :mod:`lsot_jax.solver`) has gradient
w(h) - nu (cell masses minus targets) and Hessian the weighted graph Laplacian of the power diagram,

    H_ij = -(mu-mass of the facet between cells i and j) / |y_i - y_j|,    H_ii = -sum_{j != i} H_ij .

Its small eigenvalues are cluster-level height shifts, the directions that a first-order method crawls along
on clustered codes; Newton's method removes them (Kitagawa, Merigot, Thibert 2019). Exact-geometry solvers
(geogram, pysdot) compute facets in 2-D/3-D; in high dimension this solver *samples* them.

The steps (each detailed in docs/newton.md):

* **Hessian estimate (gap bands).** For a source sample with top-k scores s_(1) >= s_(2) >= ..., the samples
  with s_(1) - s_(r) < eps lie in a slab of width eps / |y_i - y_j| beside the facet (i, j_r), so
  H_ij ~= -N_ij / (2 M_H eps) over M_H Hessian samples; eps is the ``band_quantile`` quantile of the gaps.
* **Newton step.** (H + r I) dh = -(w - nu) by Jacobi-preconditioned conjugate gradient on the sampled edge
  list; a cell with no Hessian row is raised by its measured deficit plus eps
  (:func:`lsot_jax.kernels.column_max_gap`).
* **Damping** (Kitagawa-Merigot-Thibert): alpha = 1, 1/2, ... until no more cells are empty and the L1 error
  fell to at most (1 - alpha / 2) of its value, both measured on the *same* sample.
* **Stages.** Stage s solves the energy of one sample of M_s points (regenerated from ``fold_in(rng, s)``
  batch by batch, memory O(batch * d + n)) until its error is ``stage_tol`` times the floor
  sqrt(2 n / (pi M_s)). Each stage's first evaluation is on a fresh sample, an independent measurement: the
  unbiased chi2 = sum_i [(c_i/M - nu_i)^2 - (c_i/M)(1 - c_i/M)/(M - 1)] / nu_i, L1 <= sqrt(chi2); the run
  stops once sqrt(chi2) <= ``tol``; with ``verify`` a last fresh sample measures the result.
* **Averaging** (default). After the first stage, T full Newton steps h_{t+1} = h_t + dh_t, each on a fresh
  sample of M_a points (one assignment pass, the first stage's Hessian), and the result is the mean of
  h_1 ... h_T (Polyak-Ruppert): the noise of one sample of T M_a ~ ``max_samples`` points
  (:meth:`NewtonSolver.effective_sample_size`). Without it (``averaging=False``) the later stages are
  line-searched ones on samples ``growth`` times larger each.

Contract (as :class:`lsot_jax.solver.BrenierSolver`): pure and jit-able (``jax.jit(solver)(rng, problem)``),
the whole loop on device (one ``lax.while_loop`` over all stages: the step is compiled once), preallocated
histories, resumable in chunks of steps with identical results, usable under ``jax.vmap`` over keys, and
sharded over a mesh by :class:`lsot_jax.sharding.ShardedNewtonSolver`.

**Progress.** With ``callback`` set, every ``callback_every`` steps the loop hands a dict of Python scalars
to that host function (``jax.debug.callback``, unordered, inside a ``lax.cond`` so other steps make no host
call); it only reads the state, so the results are the same with or without it
(:class:`lsot_jax.tracking.ProgressLogger` shows it as a bar or log lines).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from lsot_jax import control
from lsot_jax import hessian
from lsot_jax import kernels
from lsot_jax import multiscale
from lsot_jax import newton_state
from lsot_jax import solver as solver_lib

__all__ = [
    "NewtonSolver",
    "NewtonState",
    "gaussian_heights",
    "hessian_edges",
    "laplacian_matvec",
    "pcg",
]

INITIALISATIONS = ("multiscale", "gaussian", "voronoi", "zero")

# The Hessian and its linear algebra live in lsot_jax.hessian; re-exported here, where users look for them.
hessian_edges = hessian.hessian_edges
laplacian_matvec = hessian.laplacian_matvec
pcg = hessian.pcg
# The state pytree lives in lsot_jax.newton_state; re-exported here.
NewtonState = newton_state.NewtonState
# The closed-form Gaussian start lives in lsot_jax.multiscale (its coarsest level); re-exported here.
gaussian_heights = multiscale.gaussian_heights


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class NewtonSolver:
  """Monte-Carlo damped Newton solver with sample growth (see the module docstring).

  All fields are static.

  Attributes:
    num_iterations: maximum number of steps (history length); a step is a fresh evaluation or a Newton step.
    samples_per_cell: the first stage's sample size is the power of two >= this times n (at least
      ``min_samples``).
    min_samples: lower bound of the first stage's sample size.
    max_samples: the largest stage's sample size (the last stage is capped at it).
    growth: sample-size factor between stages (an integer >= 2).
    batch_size: source samples per assignment batch (memory O(batch_size * d)).
    hessian_samples_per_cell: Hessian sample rows per cell (top-k is run on the first
      ``hessian_rows`` samples of each stage; the rest of the stage sample is only assigned).
    top_k: cells per sample read for the Hessian (the best and k - 1 runners-up).
    band_quantile: eps is this quantile of the best-minus-second score gaps.
    per_cell_band: each cell's band is that quantile of the gaps of the samples it wins
      (:func:`lsot_jax.hessian.cell_bands`), not one global quantile: the same share of every cell, whatever
      its size in score units (tight clusters have tiny cells there). Off by default until measured on
      every benchmark problem (it helped on the 25-Gaussian grid: docs/newton.md).
    stage_tol: a stage ends when its sample's L1 error is at most this times the sample's noise floor.
    max_stage_steps: Newton steps per stage at most.
    max_first_stage_steps: with an averaging stage, the first stage goes on past ``max_stage_steps`` while
      its last accepted step was damped (alpha < 1) or a cell is empty, up to this many steps, and an empty
      cell keeps it going even at its floor (:func:`lsot_jax.control.newton_stage_ends`): the averaging
      steps are full steps and need Newton's local regime.
    max_halvings: the line search tries alpha = 1 ... 2^-max_halvings.
    regularisation: r = this times the mean Hessian degree is added to the diagonal.
    cg_tol: relative residual of the conjugate-gradient solve.
    cg_max_iter: conjugate-gradient iterations at most.
    tol: stop once a fresh evaluation's sqrt(chi^2) (an upper bound on the L1 error) is at most this.
    initialisation: ``"multiscale"`` (coarse-to-fine, see ``coarsening``), ``"gaussian"``
      (:func:`gaussian_heights`), ``"voronoi"`` (-|y - m|^2 / 2) or ``"zero"``.
    coarsening: targets per k-means cluster between the levels of the ``"multiscale"`` start: the n codes
      are grouped into ceil(n / f) clusters, f = max(``coarsening``, ``codes_per_dim`` x d) (see
      :meth:`level_sizes`), that problem is solved (recursively, down to ``coarsest`` targets, which start
      from :func:`gaussian_heights`) and refined by :func:`lsot_jax.multiscale.refine_heights`.
    codes_per_dim: a k-means cluster holds at least this many codes per dimension: the per-cluster Gaussian
      fit of a cluster with few codes per dimension is no model of its cells (at d = 64, clusters of 8 codes
      left 9,361 of 20,000 cells empty; of 256 codes, 6).
    coarsest: the coarsest level's size at most.
    coarse_samples_per_cell: a coarse level of K targets solves up to a sample of this times K points.
    scale_samples_per_cell: each refinement scales its within-cluster (quadratic) heights by the factor
      that minimises the energy on a sample of this times n source points (0: no search, factor 1).
    scale_steps: golden-section steps of that search (each one pass of the search sample).
    averaging: after the first stage, replace the larger sample-average stages by an averaging stage
      (see the module docstring): :meth:`averaging_steps` full Newton steps, each on a fresh sample of
      :meth:`averaging_size` points, with the first stage's Hessian; the result is the iterates' mean.
    max_averaging_steps: the averaging stage's steps at most; its samples total about ``max_samples``.
    averaging_step_size: each averaging step is h + beta dh with beta this value (default 1, full steps),
      or (0) the first stage's last accepted damping alpha. On the 25-Gaussian grid, whose first stage ends
      damped, 0.5 measured better than 1 (docs/newton.md).
    verify: after the last stage, measure the result on one more fresh sample of the last size (the final
      ``error_bound``); without it the last bound is the one measured at the start of the last stage.
    tile_size: targets per tile in the kernels.
    row_chunk: source rows per chunk in the assignment kernel.
    top_k_row_chunk: source rows per chunk in the top-k kernel.
    method: assignment reduction (``"auto"``, ``"fused"``, ``"argmax"``).
    callback: None, or a host function called every ``callback_every`` steps with a dict of Python scalars:
      ``step`` (steps done, counted over chunks), ``num_samples`` (the stage sample size M_s), ``l1`` (the
      L1 marginal error of the step's heights on that sample), ``energy`` (E(h) on that sample), ``stage``
      (the stage index; the verification pass is ``len(stage_sizes)``), ``alpha`` (accepted damping, 0 for
      a rejected step, nan for a fresh evaluation) and ``empty`` (cells with weight and no sample). It must
      not raise; its return value is ignored, and it is part of the solver's static identity (a new
      callback object compiles anew). Under ``jax.vmap`` (say over keys) the loop's conditionals run for
      every batch element, so the device makes one host call per element on *every* step; the host side
      drops the calls that are not due, and the callback receives one record per element and due step,
      with that element's scalars (no batch index; the order across elements is not fixed).
    callback_every: steps between two callback calls (>= 1).
  """

  num_iterations: int = dataclasses.field(default=80, metadata=dict(static=True))
  samples_per_cell: int = dataclasses.field(default=16, metadata=dict(static=True))
  min_samples: int = dataclasses.field(default=16384, metadata=dict(static=True))
  max_samples: int = dataclasses.field(default=1 << 22, metadata=dict(static=True))
  growth: int = dataclasses.field(default=4, metadata=dict(static=True))
  batch_size: int = dataclasses.field(default=65536, metadata=dict(static=True))
  hessian_samples_per_cell: int = dataclasses.field(default=32, metadata=dict(static=True))
  top_k: int = dataclasses.field(default=4, metadata=dict(static=True))
  band_quantile: float = dataclasses.field(default=0.5, metadata=dict(static=True))
  per_cell_band: bool = dataclasses.field(default=False, metadata=dict(static=True))
  stage_tol: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  max_stage_steps: int = dataclasses.field(default=8, metadata=dict(static=True))
  max_first_stage_steps: int = dataclasses.field(default=32, metadata=dict(static=True))
  max_halvings: int = dataclasses.field(default=6, metadata=dict(static=True))
  regularisation: float = dataclasses.field(default=1e-3, metadata=dict(static=True))
  cg_tol: float = dataclasses.field(default=1e-3, metadata=dict(static=True))
  cg_max_iter: int = dataclasses.field(default=300, metadata=dict(static=True))
  tol: float = dataclasses.field(default=0.0, metadata=dict(static=True))
  initialisation: str = dataclasses.field(default="multiscale", metadata=dict(static=True))
  coarsening: int = dataclasses.field(default=8, metadata=dict(static=True))
  codes_per_dim: int = dataclasses.field(default=4, metadata=dict(static=True))
  coarsest: int = dataclasses.field(default=64, metadata=dict(static=True))
  coarse_samples_per_cell: int = dataclasses.field(default=256, metadata=dict(static=True))
  scale_samples_per_cell: int = dataclasses.field(default=4, metadata=dict(static=True))
  scale_steps: int = dataclasses.field(default=8, metadata=dict(static=True))
  averaging: bool = dataclasses.field(default=True, metadata=dict(static=True))
  max_averaging_steps: int = dataclasses.field(default=32, metadata=dict(static=True))
  averaging_step_size: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  verify: bool = dataclasses.field(default=True, metadata=dict(static=True))
  tile_size: int = dataclasses.field(default=8192, metadata=dict(static=True))
  row_chunk: int = dataclasses.field(default=4096, metadata=dict(static=True))
  top_k_row_chunk: int = dataclasses.field(default=256, metadata=dict(static=True))
  method: str = dataclasses.field(default="auto", metadata=dict(static=True))
  callback: Optional[Callable[[Dict[str, Any]], None]] = dataclasses.field(default=None,
                                                                          metadata=dict(static=True))
  callback_every: int = dataclasses.field(default=1, metadata=dict(static=True))

  def __post_init__(self):
    if self.callback is not None and not callable(self.callback):
      raise ValueError(f"callback must be a callable taking a dict, or None; got {type(self.callback).__name__}.")
    if not isinstance(self.callback_every, int) or self.callback_every < 1:
      raise ValueError(f"callback_every must be an integer >= 1; got {self.callback_every!r}.")
    if self.initialisation not in INITIALISATIONS:
      raise ValueError(f"Unknown initialisation {self.initialisation!r}; use one of {INITIALISATIONS}.")
    if self.growth < 2:
      raise ValueError(f"growth must be an integer >= 2; got {self.growth}.")
    if self.top_k < 2:
      raise ValueError(f"top_k must be >= 2 (the best cell and at least one runner-up); got {self.top_k}.")
    if not 0.0 < self.band_quantile < 1.0:
      raise ValueError(f"band_quantile must be in (0, 1); got {self.band_quantile}.")
    for name in ("num_iterations", "samples_per_cell", "min_samples", "max_samples", "batch_size",
                 "hessian_samples_per_cell", "max_stage_steps", "cg_max_iter", "max_averaging_steps",
                 "max_first_stage_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
    if self.coarsening < 2 or self.coarsest < 2:
      raise ValueError(f"Need coarsening >= 2 and coarsest >= 2; got {self.coarsening}, {self.coarsest}.")
    for name in ("codes_per_dim", "scale_samples_per_cell", "scale_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}.")
    if not 0.0 <= self.averaging_step_size <= 1.0:
      raise ValueError(f"averaging_step_size must be in [0, 1] (0: the first stage's last damping); got "
                       f"{self.averaging_step_size}.")
    if self.max_samples < self.min_samples:
      raise ValueError(f"Need min_samples <= max_samples; got {self.min_samples}, {self.max_samples}.")

  # ---- static schedule ------------------------------------------------------------------------------------

  def _raw_sizes(self, n: int) -> Tuple[int, ...]:
    first = max(self.min_samples, 1 << max(0, math.ceil(math.log2(max(1, self.samples_per_cell * n)))))
    sizes = [min(first, self.max_samples)]
    while sizes[-1] < self.max_samples:
      sizes.append(min(sizes[-1] * self.growth, self.max_samples))
    return tuple(sizes)

  def stage_batch(self, n: int) -> int:
    """Source samples per assignment batch, the same in every stage: ``batch_size``, or the first stage's
    size if that is smaller (one batch shape for all stages, so the loop body is compiled once)."""
    return min(self.batch_size, self._raw_sizes(n)[0])

  def _round(self, n: int, m: int) -> int:
    batch = self.stage_batch(n)
    return -(-m // batch) * batch

  def averages(self, n: int) -> bool:
    """Whether a run on n targets has an averaging stage (``averaging``, and a first stage below
    ``max_samples``)."""
    return self.averaging and len(self._raw_sizes(n)) > 1

  def averaging_size(self, n: int) -> int:
    """Sample size of each averaging step: ``max_samples`` / ``max_averaging_steps``, at least one batch.

    It may be smaller than the first stage: more, smaller steps for the same samples average better (the
    mean's error has a boundary term ~ 1 / T besides the noise of all the samples; at n = 20,000, d = 64, 32
    steps of 2^18 ended at 1.26x the floor of their 2^23 samples, 16 steps of 2^19 at 1.55x).
    """
    return self._round(n, -(-self.max_samples // self.max_averaging_steps))  # rounded up: >= one batch

  def averaging_steps(self, n: int) -> int:
    """Steps of the averaging stage (0 without one): enough that their samples total ``max_samples``."""
    return -(-self.max_samples // self.averaging_size(n)) if self.averages(n) else 0

  def effective_sample_size(self, n: int) -> int:
    """The sample size whose noise floor the result can reach: the last stage's size, or the averaging
    stage's samples together (the mean of T iterates on fresh samples of M points has the noise of T M)."""
    if self.averages(n):
      return self.averaging_steps(n) * self.averaging_size(n)
    return self.stage_sizes(n)[-1]

  def stage_sizes(self, n: int) -> Tuple[int, ...]:
    """Sample size of each solving stage for n targets (each a multiple of :meth:`stage_batch`); with an
    averaging stage, (first stage, :meth:`averaging_size`)."""
    if self.averages(n):
      return (self._round(n, self._raw_sizes(n)[0]), self.averaging_size(n))
    return tuple(self._round(n, m) for m in self._raw_sizes(n))

  def schedule(self, n: int) -> Tuple[int, ...]:
    """Sample size of every stage the run goes through: the solving stages, then (``verify``) the
    verification sample (the largest stage's size, or ``max_samples`` after averaging)."""
    sizes = self.stage_sizes(n)
    last = self._round(n, self.max_samples) if self.averages(n) else sizes[-1]
    return sizes + (last,) if self.verify else sizes

  def _hessian_batches(self, n: int, m):
    """Batches of a stage of m samples (m static or traced) whose top-k feeds the Hessian."""
    cap = max(1, -(-self.hessian_samples_per_cell * n // self.stage_batch(n)))
    return jnp.clip(m // self.stage_batch(n), 1, cap)

  def hessian_rows(self, n: int) -> int:
    """R: rows of the Hessian buffers (the most Hessian samples any stage uses)."""
    batch = self.stage_batch(n)
    cap = max(1, -(-self.hessian_samples_per_cell * n // batch))
    # After averaging only the first stage computes top-k; the averaging steps reuse its buffers.
    largest = self.stage_sizes(n)[0] if self.averages(n) else max(self.schedule(n))
    return min(largest // batch, cap) * batch

  # ---- assignment hooks (the sharded solver overrides these) ---------------------------------------------

  def _top_k_cells(self, x, y, h):
    return kernels.top_k(x, y, h, self.top_k, tile_size=self.tile_size, row_chunk=self.top_k_row_chunk)

  def _assign(self, x, y, h):
    return kernels.assign(x, y, h, tile_size=self.tile_size, row_chunk=self.row_chunk, method=self.method)

  def _column_max_gap(self, x, y, h, best):
    return kernels.column_max_gap(x, y, h, best, tile_size=self.tile_size, row_chunk=self.top_k_row_chunk)

  # ---- one pass over a stage sample ----------------------------------------------------------------------

  def _top_k_batch(self, key, problem, h_eff, b, bufs):
    """Top-k of batch b of the stage sample, written into the Hessian buffers ``bufs`` = (vals, idx)."""
    batch = self.stage_batch(problem.num_targets)
    x = problem.source.sample(jax.random.fold_in(key, b), batch)
    vals, idx = self._top_k_cells(x, problem.y, h_eff)
    bufs = (jax.lax.dynamic_update_slice(bufs[0], vals, (b * batch, 0)),
            jax.lax.dynamic_update_slice(bufs[1], idx, (b * batch, 0)))
    return vals, idx, bufs

  def _empty_buffers(self, n: int) -> Tuple[jax.Array, jax.Array]:
    rows = self.hessian_rows(n)
    return jnp.full((rows, self.top_k), -jnp.inf, jnp.float32), jnp.zeros((rows, self.top_k), jnp.int32)

  def _hessian_top_k(self, key, problem, h, m) -> Tuple[jax.Array, jax.Array]:
    """The Hessian buffers (top-k scores [R, k] and cells [R, k]) of heights h on the stage sample."""
    h_eff = solver_lib.masked_heights(h, problem.weights)
    body = lambda b, bufs: self._top_k_batch(key, problem, h_eff, b, bufs)[2]  # pylint: disable=unnecessary-lambda-assignment
    return jax.lax.fori_loop(0, self._hessian_batches(problem.num_targets, m), body,
                             self._empty_buffers(problem.num_targets))

  def _evaluate(self, key, problem, h, m, with_top_k: bool = True) -> Dict[str, jax.Array]:
    """Counts, energy and (``with_top_k``) the Hessian top-k of heights h on the stage sample of size m (a
    traced multiple of :meth:`stage_batch`) drawn from ``key``."""
    n = problem.num_targets
    nu = problem.weights
    h_eff = solver_lib.masked_heights(h, nu)
    batch = self.stage_batch(n)
    num_batches = m // batch
    hess_batches = self._hessian_batches(n, m) if with_top_k else 0

    def hess_body(b, carry):
      counts, total, bufs = carry
      vals, idx, bufs = self._top_k_batch(key, problem, h_eff, b, bufs)
      counts = counts + jax.ops.segment_sum(jnp.ones((batch,), jnp.int32), idx[:, 0], num_segments=n)
      return counts, total + jnp.sum(vals[:, 0]), bufs

    def assign_body(b, carry):
      counts, total = carry
      x = problem.source.sample(jax.random.fold_in(key, b), batch)
      idx, best = self._assign(x, problem.y, h_eff)
      counts = counts + jax.ops.segment_sum(jnp.ones((batch,), jnp.int32), idx, num_segments=n)
      return counts, total + jnp.sum(best)

    counts, total = jnp.zeros((n,), jnp.int32), jnp.zeros((), jnp.float32)
    out = {}
    if with_top_k:
      counts, total, (out["top_vals"], out["top_idx"]) = jax.lax.fori_loop(
          0, hess_batches, hess_body, (counts, total, self._empty_buffers(n)))
    counts, total = jax.lax.fori_loop(hess_batches, num_batches, assign_body, (counts, total))
    energy = total / m - jnp.sum(jnp.where(nu > 0, nu * h, 0.0))
    return dict(out, counts=counts, energy=energy)

  def _deficits(self, key, problem, h, top_vals, m) -> jax.Array:
    """-column_max_gap over the Hessian rows of the stage sample: the raise each cell needs to win one."""
    n = problem.num_targets
    h_eff = solver_lib.masked_heights(h, problem.weights)
    batch = self.stage_batch(n)

    def body(b, acc):
      x = problem.source.sample(jax.random.fold_in(key, b), batch)
      best = jax.lax.dynamic_slice(top_vals[:, 0], (b * batch,), (batch,))
      return jnp.maximum(acc, self._column_max_gap(x, problem.y, h_eff, best))

    gap = jax.lax.fori_loop(0, self._hessian_batches(n, m), body, jnp.full((n,), -jnp.inf, jnp.float32))
    return -gap

  # ---- the solver ----------------------------------------------------------------------------------------

  def init_heights(self, problem: solver_lib.SemidiscreteProblem) -> jax.Array:
    """Initial heights of shape [n], mean-centred (see ``initialisation``)."""
    return self._start(problem)[0]

  def _start(self, problem: solver_lib.SemidiscreteProblem) -> Tuple[jax.Array, jax.Array]:
    """Initial heights [n] and the work spent on them, in source samples scored against all n targets."""
    nu = problem.weights
    zero = jnp.zeros((), jnp.float32)
    if self.initialisation == "voronoi":
      return solver_lib.centre(solver_lib.voronoi_heights(problem.y, nu), nu), zero
    if self.initialisation == "zero":
      return jnp.zeros((problem.num_targets,), problem.y.dtype), zero
    levels = self.level_sizes(problem.num_targets, problem.dim)
    if self.initialisation == "gaussian" or not levels:
      probe = problem.source.sample(jax.random.key(0x6A5), 4096)
      h = gaussian_heights(problem.y, nu, jnp.mean(probe, axis=0), jnp.mean(jnp.var(probe, axis=0)))
      return solver_lib.centre(h, nu), zero
    return multiscale.multiscale_start(self, problem)

  def level_sizes(self, n: int, d: int) -> Tuple[int, ...]:
    """Cluster counts of the multiscale start's coarse levels for n targets in dimension d, finest first."""
    return multiscale.level_sizes(n, max(self.coarsening, self.codes_per_dim * d), self.coarsest)

  def coarse_solver(self, k: int) -> "NewtonSolver":
    """The single-device solver of a coarse level with k targets (no verification or averaging, its sample
    capped)."""
    cap = 1 << max(0, math.ceil(math.log2(self.coarse_samples_per_cell * k)))
    cap = min(max(cap, self.min_samples), self.max_samples)
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(NewtonSolver)}
    # A plain solver: coarse levels are small, and a sharded one would need K to fit the mesh.
    # No averaging: the start's measured behaviour (docs/newton.md) is that of the line-searched stages.
    return NewtonSolver(**dict(fields, verify=False, tol=0.0, max_samples=cap, callback=None, averaging=False))

  def init(self, problem: solver_lib.SemidiscreteProblem, h_init: Optional[jax.Array] = None) -> NewtonState:
    """Initial state (a pytree) with preallocated histories."""
    n = problem.num_targets
    if h_init is None:
      h, scored = self._start(problem)
    else:
      h, scored = solver_lib.centre(h_init, problem.weights), jnp.zeros((), jnp.float32)
    rows = self.hessian_rows(n)
    t = self.num_iterations
    f = lambda v: jnp.full((t,), v, jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
    false = jnp.zeros((), bool)
    return NewtonState(
        it=jnp.zeros((), jnp.int32), stage=jnp.zeros((), jnp.int32), stage_it=jnp.zeros((), jnp.int32),
        evaluated=false, stalled=false, halvings=jnp.zeros((), jnp.int32), converged=false, diverged=false,
        h=h, h_iter=h, num_averaged=jnp.zeros((), jnp.int32), counts=jnp.zeros((n,), jnp.int32), energy=jnp.zeros((), jnp.float32),
        top_vals=jnp.full((rows, self.top_k), -jnp.inf, jnp.float32),
        top_idx=jnp.zeros((rows, self.top_k), jnp.int32),
        samples_scored=scored, error_bound=jnp.asarray(jnp.inf, jnp.float32),
        errors=f(jnp.inf), chi2=f(jnp.nan), fresh_l1=f(jnp.nan), sample_sizes=jnp.zeros((t,), jnp.int32),
        scored=f(jnp.nan), energies=f(jnp.inf), alphas=f(jnp.nan),
        cg_iterations=jnp.zeros((t,), jnp.int32), empty_cells=jnp.zeros((t,), jnp.int32),
    )

  def _l1(self, counts, nu, m):
    return jnp.sum(jnp.abs(counts.astype(jnp.float32) / m - nu))

  def _num_empty(self, counts, nu):
    return jnp.sum((counts == 0) & (nu > 0)).astype(jnp.int32)

  def _record(self, state, *, it, error, m, energy, chi2=jnp.nan, fresh_l1=jnp.nan, alpha=jnp.nan, cg=0,
              empty=0, scored):
    return dict(
        errors=state.errors.at[it].set(error), chi2=state.chi2.at[it].set(chi2),
        fresh_l1=state.fresh_l1.at[it].set(fresh_l1), sample_sizes=state.sample_sizes.at[it].set(m),
        scored=state.scored.at[it].set(scored), energies=state.energies.at[it].set(energy),
        alphas=state.alphas.at[it].set(alpha), cg_iterations=state.cg_iterations.at[it].set(cg),
        empty_cells=state.empty_cells.at[it].set(empty),
    )

  def _fresh_step(self, rng, problem, state: NewtonState, stage, m, last) -> NewtonState:
    """Evaluates h on the stage's fresh sample: an independent error measurement, then Newton can start."""
    nu = problem.weights
    ev = self._evaluate(jax.random.fold_in(rng, stage), problem, state.h, m)
    chi2 = solver_lib.marginal_chi2(ev["counts"], nu, m)
    l1 = self._l1(ev["counts"], nu, m)
    bound = jnp.sqrt(jnp.maximum(chi2, 0.0))
    converged = bound <= self.tol
    scored = state.samples_scored + m
    finite = jnp.isfinite(ev["energy"])
    done = converged | last
    return dataclasses.replace(
        state, it=state.it + 1, stage=jnp.where(done, stage + 1, state.stage).astype(jnp.int32),
        stage_it=jnp.zeros((), jnp.int32), evaluated=~done, stalled=jnp.zeros((), bool),
        converged=converged, diverged=~finite, counts=ev["counts"], energy=ev["energy"],
        top_vals=ev["top_vals"], top_idx=ev["top_idx"], samples_scored=scored, error_bound=bound,
        **self._record(state, it=state.it, error=l1, m=m, energy=ev["energy"], chi2=chi2, fresh_l1=l1,
                       empty=self._num_empty(ev["counts"], nu), scored=scored),
    )

  def _direction(self, state: NewtonState, grad, hess_rows, candidates, known) -> Tuple[jax.Array, ...]:
    """The Newton direction of the Hessian sampled in ``state``'s top-k buffers.

    Solves (H + r I) dh = -grad - H known on the free cells (the candidates with a sampled facet), by
    preconditioned conjugate gradient; the other cells keep dh = 0.

    Args:
      state: its ``top_vals`` / ``top_idx`` buffers give the Hessian edges.
      grad: Array of shape [n], cell masses minus targets.
      hess_rows: traced scalar, the number of buffer rows filled (the Hessian's sample size).
      candidates: bool array of shape [n], cells that may get a Newton row.
      known: Array of shape [n], fixed raises of the other cells (a boundary value; 0 on candidates).

    Returns:
      ``(dh, cg_iterations, eps)``: Array of shape [n], scalar int32 and the band width eps.
    """
    n = grad.shape[0]
    a, b, w, eps = hessian.hessian_edges(state.top_vals, state.top_idx, hess_rows, self.band_quantile,
                                         n if self.per_cell_band else None)
    degree = jax.ops.segment_sum(w, a, num_segments=n) + jax.ops.segment_sum(w, b, num_segments=n)
    free = candidates & (degree > 0)
    free_degree = jnp.where(free, degree, 0.0)
    mean_degree = jnp.sum(free_degree) / jnp.maximum(jnp.sum(free), 1)
    reg = jnp.where(free, self.regularisation * mean_degree, 1.0)
    rhs = jnp.where(free, -grad - hessian.laplacian_matvec(a, b, w, known), 0.0)
    mask = free.astype(jnp.float32)
    matvec = lambda v: mask * hessian.laplacian_matvec(a, b, w, mask * v) + reg * v  # pylint: disable=unnecessary-lambda-assignment
    dh, cg_iters = hessian.pcg(matvec, rhs, free_degree + reg, tol=self.cg_tol, max_iter=self.cg_max_iter)
    return jnp.where(free & jnp.isfinite(dh), dh, 0.0), cg_iters, eps

  def _averaging_step(self, rng, problem, state: NewtonState, stage, m) -> NewtonState:
    """One averaging step: measure the iterate on a fresh sample of m points, take the full Newton step of
    that sample's gradient (the first stage's Hessian), and fold the new iterate into the average ``h``."""
    nu = problem.weights
    n = problem.num_targets
    k = state.num_averaged
    ev = self._evaluate(jax.random.fold_in(jax.random.fold_in(rng, stage), k), problem, state.h_iter, m,
                        with_top_k=False)
    chi2 = solver_lib.marginal_chi2(ev["counts"], nu, m)
    l1 = self._l1(ev["counts"], nu, m)
    bound = jnp.sqrt(jnp.maximum(chi2, 0.0))
    converged = bound <= self.tol
    grad = ev["counts"].astype(jnp.float32) / m - nu
    hess_rows = self._hessian_batches(n, self.stage_sizes(n)[0]) * self.stage_batch(n)
    dh, cg_iters, _ = self._direction(state, grad, hess_rows, nu > 0, jnp.zeros((n,), jnp.float32))
    beta = self._averaging_beta(state)
    h_next = solver_lib.centre(state.h_iter + beta * dh, nu)
    count = k + 1
    # The mean of h_1 ... h_count (the first stage's result h_0 is not in it).
    average = state.h + (h_next - state.h) / count.astype(jnp.float32)
    done = converged | (count >= self.averaging_steps(n))
    scored = state.samples_scored + m
    finite = jnp.isfinite(ev["energy"]) & jnp.all(jnp.isfinite(h_next))
    return dataclasses.replace(
        state, it=state.it + 1, stage=jnp.where(done, stage + 1, state.stage).astype(jnp.int32),
        converged=converged, diverged=~finite,
        # A measured iterate that meets tol is the result; otherwise the average goes on.
        h=jnp.where(converged, state.h_iter, average), h_iter=jnp.where(converged, state.h_iter, h_next),
        num_averaged=jnp.where(converged, k, count), counts=ev["counts"], energy=ev["energy"],
        samples_scored=scored,
        # The first step measures the first stage's result on a fresh sample; later ones measure iterates.
        error_bound=jnp.where((k == 0) | converged, bound, state.error_bound),
        **self._record(state, it=state.it, error=l1, m=m, energy=ev["energy"], chi2=chi2, fresh_l1=l1,
                       alpha=beta, cg=cg_iters, empty=self._num_empty(ev["counts"], nu), scored=scored),
    )

  def _averaging_beta(self, state: NewtonState) -> jax.Array:
    """The averaging steps' step size (``averaging_step_size``, or the first stage's last accepted alpha)."""
    if self.averaging_step_size > 0:
      return jnp.asarray(self.averaging_step_size, jnp.float32)
    return 2.0 ** (-state.halvings.astype(jnp.float32))

  def _newton_step(self, rng, problem, state: NewtonState, stage, m) -> NewtonState:
    """One damped Newton step on the stage sample (or the end of the stage)."""
    nu = problem.weights
    n = problem.num_targets
    key = jax.random.fold_in(rng, stage)
    active = nu > 0
    error = self._l1(state.counts, nu, m)
    floor = solver_lib.noise_floor_l1(nu, m)
    empty_cells = active & (state.counts == 0)
    first = (stage == 0) & self.averages(n)
    end_stage = control.newton_stage_ends(
        error, floor, state.stalled, state.stage_it, stage_tol=self.stage_tol, max_steps=self.max_stage_steps,
        damped=first & (state.halvings > 0), empty=first & jnp.any(empty_cells),
        max_first_steps=self.max_first_stage_steps)

    def advance(state):
      return dataclasses.replace(
          state, stage=(stage + 1).astype(jnp.int32), evaluated=jnp.zeros((), bool), stalled=jnp.zeros((), bool))

    def step(state):
      grad = state.counts.astype(jnp.float32) / m - nu
      hess_rows = self._hessian_batches(n, m) * self.stage_batch(n)
      # Cells that win no sample get no Newton row: their sampled Hessian rests on a few runner-up counts
      # and a Newton raise nu_i / H_ii would be huge. They are raised by their deficit + eps instead (they
      # then win the samples where they came closest), and Newton solves for the others with that raise
      # as a known boundary value.
      raise_by = jax.lax.cond(
          jnp.any(empty_cells),
          lambda: self._deficits(key, problem, state.h, state.top_vals, m),
          lambda: jnp.zeros((n,), jnp.float32))
      raise_by = jnp.where(empty_cells & jnp.isfinite(raise_by), raise_by, 0.0)
      dh, cg_iters, eps = self._direction(state, grad, hess_rows, active & ~empty_cells, raise_by)
      empty = self._num_empty(state.counts, nu)
      start = jnp.maximum(state.halvings // 2, 0)

      def ls_cond(c):
        j, accepted, _ = c
        return (j <= self.max_halvings) & ~accepted

      def ls_body(c):
        j, _, _ = c
        alpha = 2.0 ** (-j.astype(jnp.float32))
        # Empty cells: their deficit in full (less would leave them empty), the margin eps scaled by alpha.
        h_new = solver_lib.centre(state.h + alpha * dh + jnp.where(empty_cells, raise_by + alpha * eps, 0.0), nu)
        # A trial only needs the counts (the fast assignment kernel); the top-k of the accepted heights is
        # computed once, after the search.
        ev = self._evaluate(key, problem, h_new, m, with_top_k=False)
        err_new = self._l1(ev["counts"], nu, m)
        ok = (err_new <= (1.0 - alpha / 2.0) * error) & (self._num_empty(ev["counts"], nu) <= empty)
        ok = ok & jnp.isfinite(ev["energy"])
        return j + 1, ok, dict(ev, h=h_new)

      template = dict(counts=state.counts, energy=state.energy, h=state.h)
      # The guard (always true inside the loop) keeps XLA from hoisting the trial's loop-invariant sampling out
      # of the loop, which would materialise the whole stage sample.
      guarded = lambda c: jax.lax.cond(c[0] <= self.max_halvings, ls_body, lambda c: c, c)  # pylint: disable=unnecessary-lambda-assignment
      j, accepted, ev = jax.lax.while_loop(ls_cond, guarded, (start, jnp.zeros((), bool), template))
      trials = (j - start).astype(jnp.float32)
      top_vals, top_idx = jax.lax.cond(accepted, lambda: self._hessian_top_k(key, problem, ev["h"], m),
                                       lambda: (state.top_vals, state.top_idx))
      extra = jnp.where(jnp.any(empty_cells), hess_rows, 0) + jnp.where(accepted, hess_rows, 0)
      scored = state.samples_scored + trials * m + extra
      alpha = jnp.where(accepted, 2.0 ** (-(j - 1).astype(jnp.float32)), 0.0)
      keep = lambda new, old: jnp.where(accepted, new, old)  # pylint: disable=unnecessary-lambda-assignment
      counts = keep(ev["counts"], state.counts)
      new_error = self._l1(counts, nu, m)
      energy = keep(ev["energy"], state.energy)
      return dataclasses.replace(
          state, it=state.it + 1, stage_it=state.stage_it + 1, stalled=~accepted,
          halvings=jnp.where(accepted, j - 1, state.halvings), h=keep(ev["h"], state.h),
          h_iter=keep(ev["h"], state.h), counts=counts,
          energy=energy, top_vals=top_vals, top_idx=top_idx, samples_scored=scored,
          **self._record(state, it=state.it, error=new_error, m=m, energy=energy, alpha=alpha, cg=cg_iters,
                         empty=self._num_empty(counts, nu), scored=scored),
      )

    return jax.lax.cond(end_stage, advance, step, state)

  def run(self, rng: jax.Array, problem: solver_lib.SemidiscreteProblem, state: NewtonState,
          num_steps=None) -> NewtonState:
    """Continues a run for at most ``num_steps`` steps (all remaining if None).

    Stage s draws its sample from ``fold_in(rng, s)``, so a run split into chunks (for checkpointing) gives
    the same result as one call. One ``lax.while_loop`` runs every stage: the stage and its sample size are
    loop values (the batch shape is the same in all stages), so the step is compiled once, whatever the
    number of stages.

    Returns:
      The new state; it stops once converged, diverged, past the verification stage or out of steps.
    """
    end = jnp.asarray(self.num_iterations, jnp.int32)
    if num_steps is not None:
      end = jnp.minimum(end, state.it + jnp.asarray(num_steps, jnp.int32))
    sizes = self.schedule(problem.num_targets)
    table = jnp.asarray(sizes, jnp.int32)

    def cond(s):
      return (s.stage < len(sizes)) & (s.it < end) & ~s.converged & ~s.diverged

    averaging_stage = 1 if self.averages(problem.num_targets) else -1

    def body(s):
      stage = jnp.minimum(s.stage, len(sizes) - 1)
      m = table[stage]
      last = jnp.asarray(self.verify, bool) & (stage == len(sizes) - 1)
      branch = jnp.where(stage == averaging_stage, 2, jnp.where(s.evaluated & ~last, 0, 1))
      return jax.lax.switch(branch, [
          lambda s: self._newton_step(rng, problem, s, stage, m),
          lambda s: self._fresh_step(rng, problem, s, stage, m, last),
          lambda s: self._averaging_step(rng, problem, s, stage, m)], s)

    if self.callback is not None:
      body = self._reporting(body, cond, len(sizes))
    return jax.lax.while_loop(cond, body, state)

  # ---- progress ------------------------------------------------------------------------------------------

  def _reporting(self, body, cond, num_stages: int):
    """``body`` followed by a callback call when the step it took is due (:func:`control.report_progress`;
    ``active`` repeats the loop condition, since under ``jax.vmap`` the body also runs for ended elements)."""

    def reporting_body(s):
      new = body(s)
      i = jnp.maximum(new.it - 1, 0)
      record = dict(step=new.it, num_samples=new.sample_sizes[i], l1=new.errors[i], energy=new.energies[i],
                    stage=jnp.minimum(s.stage, num_stages - 1), alpha=new.alphas[i], empty=new.empty_cells[i])
      control.report_progress(self.callback, self.callback_every, new.it, cond(s) & (new.it > s.it), record)
      return new

    return reporting_body

  def finished(self, problem: solver_lib.SemidiscreteProblem, state: NewtonState) -> jax.Array:
    """Scalar bool: nothing is left to do (converged, diverged, verified or out of steps)."""
    return (state.converged | state.diverged | (state.stage >= len(self.schedule(problem.num_targets)))
            | (state.it >= self.num_iterations))

  def output(self, problem: solver_lib.SemidiscreteProblem, state: NewtonState) -> solver_lib.BrenierPotential:
    """The fitted potential of a state."""
    return solver_lib.BrenierPotential(
        y=problem.y, h=solver_lib.masked_heights(state.h, problem.weights), tile_size=self.tile_size,
        row_chunk=self.row_chunk, method=self.method)

  def __call__(self, rng: jax.Array, problem: solver_lib.SemidiscreteProblem,
               h_init: Optional[jax.Array] = None) -> Tuple[solver_lib.BrenierPotential, NewtonState]:
    """Solves from scratch. Jit it: ``jax.jit(solver)(rng, problem)``.

    Returns:
      ``(potential, state)``.
    """
    state = self.run(rng, problem, self.init(problem, h_init))
    return self.output(problem, state), state

