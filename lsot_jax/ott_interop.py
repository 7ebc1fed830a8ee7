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

Both directions of the objects: :func:`to_ott_output` wraps a fitted :class:`BrenierPotential` and its
problem into ott's own ``SemidiscreteOutput`` (so ``to_dual_potentials``, ``sample`` and
``marginal_chi2_error`` run on it unchanged), and :func:`from_ott_problem` turns ott's
``SemidiscreteLinearProblem`` into a :class:`lsot_jax.solver.SemidiscreteProblem` for lsot_jax's solvers
(its sampler wrapped as an :class:`OttSamplerSource`); :func:`to_ott_problem` is the inverse.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from ott.geometry import costs
from ott.geometry import semidiscrete_pointcloud
from ott.problems.linear import potentials
from ott.problems.linear import semidiscrete_linear_problem
from ott.solvers.linear import semidiscrete

from lsot_jax import kernels
from lsot_jax import solver as solver_lib

__all__ = [
    "OttSamplerSource",
    "from_ott_output",
    "from_ott_problem",
    "g_to_h",
    "h_to_g",
    "ott_semidiscrete_solve",
    "to_dual_potentials",
    "to_ott_output",
    "to_ott_problem",
]


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
  h = jnp.where(active, h, kernels.MASKED_HEIGHT)
  return solver_lib.BrenierPotential(y=y, h=h, **potential_kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OttSamplerSource:
  """A source measure given by an ott-jax sampler, usable wherever :mod:`lsot_jax.sources` are.

  ott-jax's ``SemidiscretePointCloud`` describes its source by a function ``(rng, shape, dtype) -> array``;
  wrapped here it has the interface of lsot_jax's sources (``dim``, ``sample(rng, num, dtype)``) and draws
  exactly ott's points for the same key.

  Attributes:
    sampler: ott's sampler, called as ``sampler(rng, (num, dim), dtype)``; returns [num, dim] (static, so
      it must be hashable, as functions are).
    dim: dimension d (static).
  """

  sampler: Callable[..., jax.Array] = dataclasses.field(metadata=dict(static=True))
  dim: int = dataclasses.field(metadata=dict(static=True))

  def sample(self, rng: jax.Array, num: int, dtype=jnp.float32) -> jax.Array:
    """Draws points with ott's sampler. Returns an array of shape [num, dim].

    Raises:
      ValueError: the sampler returned another shape.
    """
    x = self.sampler(rng, (num, self.dim), dtype)
    if x.shape != (num, self.dim):
      raise ValueError(f"The ott sampler returned shape {x.shape} for shape {(num, self.dim)}.")
    return x


def to_ott_problem(
    problem: solver_lib.SemidiscreteProblem, *, epsilon: float = 0.0
) -> semidiscrete_linear_problem.SemidiscreteLinearProblem:
  """ott-jax's ``SemidiscreteLinearProblem`` (squared-Euclidean cost) of an lsot_jax problem.

  The geometry is ``SemidiscretePointCloud(sampler, problem.y, epsilon=epsilon)`` whose sampler draws from
  ``problem.source`` (the sampler of an :class:`OttSamplerSource` is passed on as it is), and
  ``b = problem.weights`` (merged duplicate codes have weight 0, see :func:`lsot_jax.solver.make_problem`).

  Args:
    problem: the problem; codes y [n, d], weights [n].
    epsilon: ott's entropic regularisation; 0 is the unregularised problem that lsot_jax solves (ott's
      default ``None`` would pick a relative epsilon, so it is not used).

  Returns:
    The ott problem.

  Raises:
    ValueError: a negative ``epsilon``.
  """
  if isinstance(epsilon, (int, float)) and epsilon < 0:
    raise ValueError(f"epsilon must be >= 0; got {epsilon}.")
  source = problem.source
  if isinstance(source, OttSamplerSource):
    sampler = source.sampler
  else:

    def sampler(key: jax.Array, shape: Tuple[int, ...], dtype=jnp.float32) -> jax.Array:
      return source.sample(key, shape[0], dtype=dtype)

  geom = semidiscrete_pointcloud.SemidiscretePointCloud(sampler, problem.y, epsilon=epsilon)
  return semidiscrete_linear_problem.SemidiscreteLinearProblem(geom, b=problem.weights)


def from_ott_problem(
    prob: semidiscrete_linear_problem.SemidiscreteLinearProblem,
    source: Any = None,
    *,
    drop_epsilon: bool = False,
    merge_duplicates: bool = True,
) -> solver_lib.SemidiscreteProblem:
  """lsot_jax's :class:`SemidiscreteProblem` of an ott-jax ``SemidiscreteLinearProblem``.

  The codes are ``prob.geom.y`` [n, d], the weights ``prob.b`` [n] (uniform where ott's ``b`` is None) and
  the source ott's sampler wrapped as an :class:`OttSamplerSource` (same points for the same key), so
  :class:`lsot_jax.BrenierSolver` and the other lsot_jax solvers take ott problems directly. The result is
  validated by :func:`lsot_jax.solver.make_problem` (host side, not jit-able). ott's ``scale_cost``
  divides the cost by a positive constant, which changes neither the optimal map nor this problem.

  Args:
    prob: ott's problem, with a ``SemidiscretePointCloud`` geometry and the ``SqEuclidean`` cost.
    source: an lsot_jax source (e.g. ``lsot_jax.Gaussian(dim=d)``) to use instead of ott's sampler.
    drop_epsilon: accept an entropically regularised ott problem (``epsilon`` None or > 0) and solve the
      unregularised one (lsot_jax's solvers have no epsilon).
    merge_duplicates: passed to :func:`lsot_jax.solver.make_problem`.

  Returns:
    The problem (float32).

  Raises:
    TypeError: ``prob`` is not a ``SemidiscreteLinearProblem``.
    ValueError: another cost than squared-Euclidean; an entropic problem without ``drop_epsilon``; and
      :func:`lsot_jax.solver.make_problem`'s errors (bad codes or weights, a source of another dimension).
  """
  if not isinstance(prob, semidiscrete_linear_problem.SemidiscreteLinearProblem):
    raise TypeError(f"Expected an ott SemidiscreteLinearProblem; got {type(prob).__name__}.")
  geom = prob.geom
  if not isinstance(geom.cost_fn, costs.SqEuclidean):
    raise ValueError(
        f"lsot_jax solves the squared-Euclidean problem; this ott problem's cost is "
        f"{type(geom.cost_fn).__name__}."
    )
  if geom.is_entropy_regularized and not drop_epsilon:
    raise ValueError(
        "This ott problem is entropically regularised (epsilon None, i.e. ott's relative default, or > 0), "
        "and lsot_jax solves the unregularised one: build the SemidiscretePointCloud with epsilon=0.0, or "
        "pass drop_epsilon=True."
    )
  y = geom.y
  if y.ndim != 2:
    raise ValueError(f"Targets must have shape [n, d]; got shape {y.shape}.")
  if source is None:
    source = OttSamplerSource(sampler=geom.sampler, dim=int(y.shape[1]))
  return solver_lib.make_problem(y, prob.b, source, merge_duplicates=merge_duplicates)


def to_ott_output(
    potential: solver_lib.BrenierPotential,
    problem: solver_lib.SemidiscreteProblem,
    *,
    epsilon: float = 0.0,
    state: Optional[solver_lib.SolverState] = None,
) -> semidiscrete.SemidiscreteOutput:
  """ott-jax's ``SemidiscreteOutput`` of a potential fitted by lsot_jax, for ott's own methods.

  The output holds ``g = 2 h + |y|^2`` (:func:`h_to_g`; masked cells, h = -1e30, get g ~ -2e30 and are never
  assigned, and ott skips zero-weight targets anyway) and ``to_ott_problem(problem, epsilon=epsilon)``.
  On it, unchanged ott code gives:

  - ``out.to_dual_potentials()``: ``f(x) = min_j(|x - y_j|^2 - g_j)``, whose ``transport`` of points
    [M, d] is ``potential.transport`` (ott builds an [M, n] cost matrix; lsot_jax's map is tiled);
  - ``out.sample(rng, M)``: the hard assignment of M source points (``paired_indices[1]`` equals
    ``potential.assign`` of ``.geom.x`` [M, d]);
  - ``out.marginal_chi2_error(rng, num_iters=..., batch_size=...)``: ott's unbiased estimate of the chi^2
    divergence ``sum_j (w_j - nu_j)^2 / nu_j`` of the cell masses w against the weights nu. ott divides by
    the weights, so it is NaN when a weight is 0 (e.g. merged duplicate codes), as for ott's own outputs.

  ott-jax 0.6 relies on implicit rank promotion: where ``jax_numpy_rank_promotion`` is ``"raise"``, call
  these methods under ``jax.numpy_rank_promotion("allow")``. Pure and jit-able.

  Args:
    potential: the potential fitted on ``problem``; codes y [n, d], heights h [n].
    problem: its problem; codes [n, d], weights [n], source.
    epsilon: the ott geometry's epsilon; 0 (unregularised) matches the fitted potential, and a positive
      value makes ott's methods use soft (entropic) assignments of the same g.
    state: the solver's final state; its ``it`` and ``converged`` fill ott's fields of the same names.
      ott's ``losses`` and ``errors`` (dual losses, chi^2 errors) stay None: lsot_jax records energies and
      L1 errors instead.

  Returns:
    The ott output.

  Raises:
    ValueError: codes of another shape than the problem's, or a negative ``epsilon``.
  """
  if potential.y.shape != problem.y.shape:
    raise ValueError(
        f"The potential's codes {potential.y.shape} do not match the problem's {problem.y.shape}."
    )
  prob = to_ott_problem(problem, epsilon=epsilon)
  it = None if state is None else state.it
  converged = None if state is None else state.converged
  return semidiscrete.SemidiscreteOutput(
      g=h_to_g(potential.h, potential.y), prob=prob, it=it, converged=converged
  )


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
  y = problem.y
  prob = to_ott_problem(problem, epsilon=epsilon)
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
