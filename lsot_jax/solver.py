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

Conventions:
  * Heights are mean-centred (sum over cells with positive weight is zero).
  * Targets with weight 0 never receive mass: their height is replaced by -1e30 in every assignment.
  * Duplicate targets: :func:`make_problem` keeps the first occurrence of each distinct code and gives it the
    combined weight of all its copies; the other copies get weight 0 (so they are never assigned).
    ``problem.representative[i]`` is the index of the copy that carries code i's mass.
  * ``learning_rate`` is relative: the step on h is ``learning_rate * problem.scale`` where ``scale`` is the
    *score gap* of the problem (:func:`score_gap`): the median, over source samples, of the difference
    between the best and the second-best score <x, y_i> + h_i at the Voronoi heights (below). A
    change of h_i by that much moves a facet of cell i across a typical cell (the gap is about half the
    Newton step nu_i / H_ii of the energy, H its Hessian), so it is the natural unit of the height update.
    The RMS spread of the codes is not: for clustered codes (the eight-Gaussian ring, std 0.01 at radius
    1) it is ~800 times larger than the gap, and an Adam step of 0.3 RMS scrambles the cells inside every
    cluster (the L1 marginal error rose from 0.7 to 1.7 in the first 20 steps of the ring smoke config).
    The gap is measured at the centred Voronoi heights h = -|y - m|^2 / 2 (m the weighted code mean), so
    it does not change when the codes are translated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsot_jax import control
from lsot_jax import kernels
from lsot_jax import sources as sources_lib

__all__ = [
    "BrenierPotential",
    "BrenierSolver",
    "SemidiscreteProblem",
    "SolverState",
    "centre",
    "make_problem",
    "marginal_chi2",
    "masked_heights",
    "noise_floor_l1",
    "sampling_floor",
    "score_gap",
    "voronoi_heights",
]

_MASKED_HEIGHT = kernels.MASKED_HEIGHT
# Source samples drawn (with a fixed key) by make_problem to measure the score gap.
_GAP_PROBE = 4096
_GAP_PROBE_SEED = 0x6A9


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SemidiscreteProblem:
  """A validated semi-discrete OT problem. Build it with :func:`make_problem`.

  Attributes:
    y: Array of shape [n, d], target codes.
    weights: Array of shape [n], target weights nu (non-negative, summing to 1).
    source: the source measure (its ``dim`` equals d).
    scale: scalar array, the step-size unit: :func:`score_gap` at the Voronoi heights (see the module
      docstring); the RMS spread of the codes where the gap is undefined (fewer than two active codes).
    representative: int32 array of shape [n]; the index of the copy of y_i that carries its mass.
  """

  y: jax.Array
  weights: jax.Array
  source: Any
  scale: jax.Array
  representative: jax.Array

  @property
  def num_targets(self) -> int:
    return self.y.shape[0]

  @property
  def dim(self) -> int:
    return self.y.shape[1]


def make_problem(
    y,
    weights=None,
    source=None,
    *,
    merge_duplicates: bool = True,
) -> SemidiscreteProblem:
  """Validates inputs on the host and builds a :class:`SemidiscreteProblem`.

  Args:
    y: array-like of shape [n, d], target codes (finite).
    weights: optional array-like of shape [n], non-negative, summing to 1; uniform if None.
    source: a source from :mod:`lsot_jax.sources`; standard Gaussian of dimension d if None.
    merge_duplicates: give each set of identical codes one cell (see the module docstring).

  Returns:
    The problem, with float32 arrays.

  Raises:
    ValueError: empty, non-finite or wrongly shaped targets; a source of another dimension; weights of the
      wrong shape, negative, non-finite or not summing to 1 (tolerance 1e-4).
  """
  y_np = np.asarray(y, dtype=np.float64)
  if y_np.ndim != 2:
    raise ValueError(f"Targets must have shape [n, d]; got shape {y_np.shape}.")
  n, d = y_np.shape
  if n == 0 or d == 0:
    raise ValueError(f"Targets are empty (shape {y_np.shape}); need at least one code of dimension >= 1.")
  bad = ~np.isfinite(y_np).all(axis=1)
  if bad.any():
    raise ValueError(
        f"{int(bad.sum())} of {n} target codes contain NaN or Inf (first at row {int(np.argmax(bad))})."
    )
  if weights is None:
    w_np = np.full((n,), 1.0 / n)
  else:
    w_np = np.asarray(weights, dtype=np.float64)
    if w_np.shape != (n,):
      raise ValueError(f"Weights must have shape [{n}] to match the targets; got {w_np.shape}.")
    if not np.isfinite(w_np).all():
      raise ValueError("Weights contain NaN or Inf.")
    if (w_np < 0).any():
      raise ValueError(f"Weights must be non-negative; min is {w_np.min():.3g}.")
    if abs(w_np.sum() - 1.0) > 1e-4:
      raise ValueError(f"Weights must sum to 1; they sum to {w_np.sum():.6g}.")
    w_np = w_np / w_np.sum()
  if source is None:
    source = sources_lib.Gaussian(dim=d)
  if source.dim != d:
    raise ValueError(
        f"Source dimension {source.dim} does not match the target dimension {d}."
    )

  representative = np.arange(n)
  if merge_duplicates:
    _, first, inverse = np.unique(
        y_np.astype(np.float32), axis=0, return_index=True, return_inverse=True
    )
    representative = first[inverse.reshape(-1)]
    if (representative != np.arange(n)).any():
      merged = np.zeros(n)
      np.add.at(merged, representative, w_np)
      w_np = merged

  y32 = jnp.asarray(y_np, jnp.float32)
  w32 = jnp.asarray(w_np, jnp.float32)
  scale = 0.0
  if int((w_np > 0).sum()) >= 2:
    x = source.sample(jax.random.key(_GAP_PROBE_SEED), _GAP_PROBE)
    h_voronoi = masked_heights(voronoi_heights(y32, w32), w32)
    scale = float(_jit_score_gap(x, y32, h_voronoi))
  if not (math.isfinite(scale) and scale > 0.0):
    mean = (w_np[:, None] * y_np).sum(0)
    scale = math.sqrt(float((w_np * ((y_np - mean) ** 2).sum(1)).sum())) or 1.0
  return SemidiscreteProblem(
      y=y32,
      weights=w32,
      source=source,
      scale=jnp.asarray(scale, jnp.float32),
      representative=jnp.asarray(representative, jnp.int32),
  )


def score_gap(x: jax.Array, y: jax.Array, h: jax.Array, *, row_chunk: int = 256) -> jax.Array:
  """Median over points x of the gap between their best and second-best score <x, y_i> + h_i.

  At the Voronoi heights h = -|y|^2 / 2 the gap is (|x - y_(2)|^2 - |x - y_(1)|^2) / 2 with y_(1), y_(2) the
  nearest and second-nearest codes. Within a cell of width w (in source space) whose neighbour lies at
  code distance delta, the gap is delta times the distance to the facet, so it is of order w * delta / 4:
  the height change that moves a facet by a fraction of a cell.

  Args:
    x: Array of shape [M, d], points (source samples).
    y: Array of shape [n, d], codes, n >= 2.
    h: Array of shape [n], heights (-1e30 for cells that never win).
    row_chunk: rows of x scored at once (static); memory O(row_chunk * tile), tiled by
      :func:`lsot_jax.kernels.top_k`.

  Returns:
    Scalar array.
  """
  if y.ndim != 2 or y.shape[0] < 2 or x.ndim != 2 or x.shape[1] != y.shape[1] or h.shape != y.shape[:1]:
    raise ValueError(f"score_gap needs x [M, d], y [n >= 2, d], h [n]; got {x.shape}, {y.shape}, {h.shape}.")
  vals, _ = kernels.top_k(x, y, h, 2, row_chunk=max(1, min(int(row_chunk), x.shape[0])))
  return jnp.median(vals[:, 0] - vals[:, 1])


_jit_score_gap = jax.jit(score_gap, static_argnames=("row_chunk",))


def noise_floor_l1(weights: jax.Array, num_samples) -> jax.Array:
  """Expected L1 marginal error of an exact solution measured with ``num_samples`` i.i.d. samples.

  E|hat w_i - nu_i| ~= sqrt(2 / pi) * sqrt(nu_i (1 - nu_i) / M) (normal approximation of the binomial).

  Args:
    weights: Array of shape [n], target weights.
    num_samples: M.

  Returns:
    Scalar array.
  """
  return jnp.sqrt(2.0 / jnp.pi) * jnp.sum(
      jnp.sqrt(weights * (1.0 - weights) / num_samples)
  )


def sampling_floor(weights: jax.Array, num_samples: int, exact: bool):
  """Noise floor of the L1 error of ``num_samples`` samples: :func:`noise_floor_l1` (weights: Array of shape
  [n]; a scalar array), or the Python float 0.0 when the samples give the exact histogram (static ``exact``:
  :func:`lsot_jax.control.is_exact_batch`)."""
  return 0.0 if exact else noise_floor_l1(weights, num_samples)


def marginal_chi2(counts: jax.Array, weights: jax.Array, num_samples) -> jax.Array:
  """Unbiased estimate of the chi^2 marginal error sum_i (w_i - nu_i)^2 / nu_i from sample counts.

  With counts c_i of M i.i.d. samples, p_i = c_i / M is unbiased for w_i and Var(p_i) = w_i (1 - w_i) / M, so
  (p_i - nu_i)^2 - p_i (1 - p_i) / (M - 1) is unbiased for (w_i - nu_i)^2. By Cauchy-Schwarz (sum nu = 1) the
  L1 error is at most sqrt(chi^2); unlike the plain L1 of the counts it has no noise floor to subtract, so
  it stays meaningful when M is not >> n.

  Args:
    counts: Array of shape [n], samples per cell (sum M).
    weights: Array of shape [n], target weights nu (cells with nu = 0 are skipped).
    num_samples: M.

  Returns:
    Scalar array (may be slightly negative for an exact solution: it is unbiased, not positive).
  """
  m = jnp.asarray(num_samples, jnp.float32)
  p = counts.astype(jnp.float32) / m
  active = weights > 0
  safe_nu = jnp.where(active, weights, 1.0)
  terms = ((p - weights) ** 2 - p * (1.0 - p) / (m - 1.0)) / safe_nu
  return jnp.sum(jnp.where(active, terms, 0.0))


def voronoi_heights(y: jax.Array, weights: jax.Array) -> jax.Array:
  """h_i = -|y_i - m|^2 / 2 with m the nu-weighted mean of the codes: the Voronoi diagram of the codes
  translated to the origin.

  Args:
    y: Array of shape [n, d], codes.
    weights: Array of shape [n], their weights.

  Returns:
    Array of shape [n].
  """
  mean = jnp.sum(weights[:, None] * y, axis=0)
  return -0.5 * jnp.sum((y - mean[None, :]) ** 2, axis=1)


def masked_heights(h: jax.Array, weights: jax.Array) -> jax.Array:
  """Heights with cells of weight 0 set to :data:`lsot_jax.kernels.MASKED_HEIGHT` (they never win). [n] -> [n]."""
  return jnp.where(weights > 0, h, _MASKED_HEIGHT)


def centre(h: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean-centres h over the cells of positive weight; cells of weight 0 get 0. [n] -> [n]."""
  active = weights > 0
  mean = jnp.sum(jnp.where(active, h, 0.0)) / jnp.maximum(jnp.sum(active), 1)
  return jnp.where(active, h - mean, 0.0)


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
