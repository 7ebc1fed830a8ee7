"""Bridge between lsot_jax's Brenier potential and ott-jax's semi-discrete solver (ott-jax 0.6).

Conventions. lsot_jax works with heights h and the convex potential u_h(x) = max_j(<x, y_j> + h_j); ott-jax
works with the squared-Euclidean cost c(x, y) = |x - y|^2 (no factor 1/2) and a dual vector g on the targets,
whose c-transform is the source potential

    f(x) = min_j ( |x - y_j|^2 - g_j ).

Expanding the square, |x - y_j|^2 - g_j = |x|^2 - 2 (<x, y_j> + (g_j - |y_j|^2) / 2), so with

    h = (g - |y|^2) / 2        (:func:`g_to_h`),      g = 2 h + |y|^2        (:func:`h_to_g`),

the two problems share their cells, argmax_j(g_j - |x - y_j|^2) = argmax_j(<x, y_j> + h_j), and
f(x) = |x|^2 - 2 u_h(x). ott's dual loss is -(E_mu f + <g, b>) = 2 E(h) - (E_mu|x|^2 + <|y|^2, b>), where
E(h) = E_mu u_h - <h, b> is lsot_jax's energy; its gradient in g equals grad_h E(h) = w(h) - b. An Adam step
of size alpha on g therefore moves h by alpha / 2 (Adam is invariant to the gradient's scale), i.e. ott's
``learning_rate`` alpha corresponds to lsot_jax's relative ``learning_rate`` alpha / (2 * problem.scale).
ott's default initialisation g = 0 is lsot_jax's Voronoi initialisation h = -|y|^2 / 2.

The Brenier map: for a translation-invariant cost c(x, y) = k(x - y), ott's ``DualPotentials.transport`` is
x - grad k^*(grad f(x)); for k = |.|^2, grad k^*(z) = z / 2, so T(x) = x - grad f(x) / 2 = grad u_h(x), the
same map as :meth:`lsot_jax.solver.BrenierPotential.transport`.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from ott.geometry import costs
from ott.geometry import semidiscrete_pointcloud
from ott.problems.linear import potentials
from ott.problems.linear import semidiscrete_linear_problem
from ott.solvers.linear import semidiscrete

from lsot_jax import solver as solver_lib

__all__ = [
    "from_ott_output",
    "g_to_h",
    "h_to_g",
    "ott_semidiscrete_solve",
    "to_dual_potentials",
]

_MASKED_HEIGHT = -1e30


def h_to_g(h: jax.Array, y: jax.Array) -> jax.Array:
  """ott-jax dual vector from lsot_jax heights: g = 2 h + |y|^2.

  Args:
    h: Array of shape [n], heights.
    y: Array of shape [n, d], target codes.

  Returns:
    Array of shape [n].
  """
  _check_hy(h, y)
  return 2.0 * h + jnp.sum(y * y, axis=1)


def g_to_h(g: jax.Array, y: jax.Array) -> jax.Array:
  """lsot_jax heights from an ott-jax dual vector: h = (g - |y|^2) / 2.

  Args:
    g: Array of shape [n], ott's dual potential on the targets (squared-Euclidean cost).
    y: Array of shape [n, d], target codes.

  Returns:
    Array of shape [n].
  """
  _check_hy(g, y)
  return 0.5 * (g - jnp.sum(y * y, axis=1))


def _check_hy(v: jax.Array, y: jax.Array) -> None:
  if v.ndim != 1 or y.ndim != 2 or v.shape[0] != y.shape[0]:
    raise ValueError(f"Expected a vector [n] and codes [n, d]; got {v.shape} and {y.shape}.")


def to_dual_potentials(
    potential: solver_lib.BrenierPotential, *, with_g: bool = True
) -> potentials.DualPotentials:
  """ott-jax ``DualPotentials`` (squared-Euclidean cost) of a fitted Brenier potential.

  ``f(x) = |x|^2 - 2 u_h(x) = min_j(|x - y_j|^2 - g_j)`` is exact everywhere, so ott's
  ``transport(x) = x - grad f(x) / 2`` is the Brenier map ``y[argmax_j(<x, y_j> + h_j)]``.

  ``g`` is only known on the codes: the returned function evaluates ``g_j = 2 h_j + |y_j|^2`` at the code
  ``y_j`` nearest to its argument (exact at the codes; piecewise constant elsewhere, so ott's backward
  ``transport`` is meaningless). With it, ``distance(x_samples, y)`` is the dual estimate
  ``mean f(x) + mean_j g_j`` of the squared-Euclidean transport cost W_2^2 for uniform target weights.
  Cells that must stay empty (heights of -1e30) are never the argmax of ``f``.

  Both functions take one point of shape [d] and return a scalar (ott's convention); they build one row
  of scores [n] per point, so ``jax.vmap`` over M points costs O(M n) memory. For large batches use
  :meth:`BrenierPotential.transport`, which is tiled.

  Args:
    potential: the fitted potential (codes y [n, d], heights h [n]).
    with_g: also return the code-lookup ``g``; ``None`` otherwise.

  Returns:
    ``DualPotentials(f, g, cost_fn=SqEuclidean())``.
  """
  y, h = potential.y, potential.h
  g_vec = h_to_g(h, y)

  def f(x: jax.Array) -> jax.Array:
    u = jnp.max(jnp.matmul(y, x, precision=jax.lax.Precision.HIGHEST) + h)
    return jnp.sum(x * x) - 2.0 * u

  def g(z: jax.Array) -> jax.Array:
    dist = jnp.sum((y - z[None, :]) ** 2, axis=1)
    return g_vec[jnp.argmin(dist)]

  return potentials.DualPotentials(f=f, g=g if with_g else None, cost_fn=costs.SqEuclidean())


def from_ott_output(
    out: semidiscrete.SemidiscreteOutput,
    y: Optional[jax.Array] = None,
    *,
    centre: bool = True,
    **potential_kwargs: Any,
) -> solver_lib.BrenierPotential:
  """A :class:`BrenierPotential` from the dual vector ``g`` of an ott-jax ``SemidiscreteOutput``.

  Targets with weight 0 in ott's problem get the masked height -1e30 (ott also never assigns them), and
  the other heights are mean-centred as in :mod:`lsot_jax.solver` (the potential is defined up to a
  constant; centring does not change the map).

  Args:
    out: ott's output (its ``g`` is the EMA of the dual vector, shape [n]).
    y: Array of shape [n, d], target codes; ``out.prob.geom.y`` if None.
    centre: mean-centre the heights over the cells of positive weight.
    **potential_kwargs: ``tile_size``, ``row_chunk``, ``method`` for the potential.

  Returns:
    The potential with heights ``(g - |y|^2) / 2``.
  """
  if y is None:
    y = out.prob.geom.y
  h = g_to_h(out.g, y)
  active = out.prob.b > 0
  if centre:
    mean = jnp.sum(jnp.where(active, h, 0.0)) / jnp.maximum(jnp.sum(active), 1)
    h = h - mean
  h = jnp.where(active, h, _MASKED_HEIGHT)
  return solver_lib.BrenierPotential(y=y, h=h, **potential_kwargs)


def ott_semidiscrete_solve(
    rng: jax.Array,
    problem: solver_lib.SemidiscreteProblem,
    *,
    num_iterations: int,
    batch_size: int,
    learning_rate: Any,
    epsilon: float = 0.0,
    potential_ema: float = 0.99,
    error_eval_every: Optional[int] = None,
    error_num_repeats: int = 16,
    threshold: float = 1e-3,
    h_init: Optional[jax.Array] = None,
) -> Tuple[solver_lib.BrenierPotential, semidiscrete.SemidiscreteOutput]:
  """Solves an lsot_jax problem with ott-jax's ``SemidiscreteSolver`` (the baseline of the benchmark).

  Builds ``SemidiscretePointCloud(sampler, y, epsilon=epsilon)`` whose sampler draws from
  ``problem.source``, ``SemidiscreteLinearProblem(geom, b=problem.weights)`` and
  ``SemidiscreteSolver(optimizer=optax.adam(learning_rate), ...)``. Each ott step builds a dense
  [batch_size, n] cost matrix. Pure and jit-able; the caller jits
  (``jax.jit(lambda r: ott_semidiscrete_solve(r, problem, ...))``).

  Args:
    rng: PRNG key.
    problem: the problem (duplicates already merged by :func:`lsot_jax.solver.make_problem`).
    num_iterations: number of ott steps (static).
    batch_size: source samples per step (static).
    learning_rate: Adam step on ott's g (absolute; see the module docstring for the relation to lsot_jax's
      relative learning rate). May be a traced scalar.
    epsilon: entropic regularisation; 0 solves the unregularised problem (ott's default ``None`` would
      pick a relative epsilon, so it is not used).
    potential_ema: EMA decay of the potential; ott returns the EMA.
    error_eval_every: steps between ott's chi^2 marginal-error evaluations (its convergence test);
      ``num_iterations`` if None, i.e. one evaluation at the end and no early stop.
    error_num_repeats: batches per chi^2 evaluation.
    threshold: ott's convergence threshold on the chi^2 error.
    h_init: optional initial heights [n]; None is ott's g = 0, i.e. lsot_jax's Voronoi initialisation.

  Returns:
    ``(potential, out)``: the :class:`BrenierPotential` from ott's (EMA) dual vector and ott's
    ``SemidiscreteOutput``.

  Raises:
    ValueError: non-positive ``num_iterations``, ``batch_size`` or a negative ``epsilon``.
  """
  if num_iterations < 1 or batch_size < 1:
    raise ValueError(
        f"num_iterations and batch_size must be positive; got {num_iterations}, {batch_size}."
    )
  if isinstance(epsilon, (int, float)) and epsilon < 0:
    raise ValueError(f"epsilon must be >= 0; got {epsilon}.")
  source = problem.source
  y = problem.y

  def sampler(key: jax.Array, shape: Tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return source.sample(key, shape[0], dtype=dtype)

  geom = semidiscrete_pointcloud.SemidiscretePointCloud(sampler, y, epsilon=epsilon)
  prob = semidiscrete_linear_problem.SemidiscreteLinearProblem(geom, b=problem.weights)
  every = num_iterations if error_eval_every is None else error_eval_every
  ott_solver = semidiscrete.SemidiscreteSolver(
      num_iterations=num_iterations,
      batch_size=batch_size,
      optimizer=optax.adam(learning_rate),
      error_eval_every=every,
      error_num_repeats=error_num_repeats,
      threshold=threshold,
      potential_ema=potential_ema,
  )
  g_init = None if h_init is None else h_to_g(h_init, y)
  # ott-jax 0.6 relies on implicit rank promotion (e.g. its soft c-transform, traced even when epsilon = 0),
  # so allow it locally whatever the caller's ``jax_numpy_rank_promotion`` setting is.
  with jax.numpy_rank_promotion("allow"):
    out = ott_solver(rng, prob, g_init=g_init)
  return from_ott_output(out, y), out
