"""The semi-discrete OT problem, its step-size unit and its marginal-error estimators.

A problem is target codes y_1..y_n with weights nu and a source measure mu on R^d; :mod:`lsot_jax.solver`
(Adam) and :mod:`lsot_jax.newton` (Newton) both solve it for the heights h of the potential
u_h(x) = max_i(<x, y_i> + h_i).

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsot_jax import kernels
from lsot_jax import sources as sources_lib

__all__ = [
    "SemidiscreteProblem",
    "centre",
    "make_problem",
    "marginal_chi2",
    "masked_heights",
    "noise_floor_bound",
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


def noise_floor_bound(weights: jax.Array, num_samples) -> jax.Array:
  """The chi^2 counterpart of :func:`noise_floor_l1`: sqrt(E chi^2) of the histogram of M i.i.d. samples.

  The chi^2 error of the empirical histogram has expectation sum_i (1 - nu_i) / M ((n - 1) / M over the cells
  with nu_i > 0), so the minimiser of an M-point sample's energy, whose cells hold that sample's noise, has
  a true sqrt(chi^2) error about this large: the floor to compare :func:`marginal_chi2`'s bound with (the
  L1 floor is about sqrt(2 / pi) times it for uniform weights).

  Args:
    weights: Array of shape [n], target weights.
    num_samples: M.

  Returns:
    Scalar array.
  """
  return jnp.sqrt(jnp.sum(jnp.where(weights > 0, 1.0 - weights, 0.0)) / num_samples)


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
