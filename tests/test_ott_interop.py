"""Tests for lsot_jax.ott_interop against ott-jax's own implementations and closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ott.geometry import costs
from ott.geometry import pointcloud
from ott.geometry import semidiscrete_pointcloud
from ott.problems.linear import semidiscrete_linear_problem

import lsot_jax
from lsot_jax import ott_interop
from lsot_jax import solver as solver_lib
from lsot_jax import sources


def _codes(np_rng, n=10, d=2):
  y = (np_rng.normal(size=(n, d)) * np.linspace(1.5, 1.0, d)).astype(np.float32)
  h = (0.5 * np_rng.normal(size=n)).astype(np.float32)
  return y, h


def test_h_g_conversion_formulas(np_rng):
  y, h = _codes(np_rng)
  g = ott_interop.h_to_g(jnp.asarray(h), jnp.asarray(y))
  np.testing.assert_allclose(np.asarray(g), 2 * h + (y.astype(np.float64) ** 2).sum(1), rtol=1e-6)
  back = ott_interop.g_to_h(g, jnp.asarray(y))
  np.testing.assert_allclose(np.asarray(back), h, atol=1e-6)
  with pytest.raises(ValueError, match="codes"):
    ott_interop.h_to_g(jnp.asarray(h[:-1]), jnp.asarray(y))
  with pytest.raises(ValueError, match="codes"):
    ott_interop.g_to_h(jnp.asarray(h), jnp.asarray(y[0]))


def test_ott_cells_are_power_cells(np_rng):
  """argmax_j(g_j - c(x, y_j)) with ott's own SqEuclidean cost matrix is our power-diagram cell."""
  y, h = _codes(np_rng)
  x = np_rng.normal(size=(2000, 2)).astype(np.float32)
  g = np.asarray(ott_interop.h_to_g(jnp.asarray(h), jnp.asarray(y)), np.float64)
  cost = np.asarray(pointcloud.PointCloud(jnp.asarray(x), jnp.asarray(y)).cost_matrix, np.float64)
  z = g[None, :] - cost
  top2 = np.sort(z, axis=1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 1e-3
  assert clear.mean() > 0.97
  pot = solver_lib.BrenierPotential(y=jnp.asarray(y), h=jnp.asarray(h))
  np.testing.assert_array_equal(np.asarray(pot.assign(jnp.asarray(x)))[clear], z.argmax(1)[clear])


def test_dual_potentials_f_and_transport(np_rng):
  y, h = _codes(np_rng)
  pot = solver_lib.BrenierPotential(y=jnp.asarray(y), h=jnp.asarray(h))
  duals = ott_interop.to_dual_potentials(pot)
  x = np_rng.normal(size=(500, 2)).astype(np.float32)
  f = np.asarray(jax.vmap(duals.f)(jnp.asarray(x)))
  # ott's own c-transform of g (hard, epsilon = 0) is the reference for f.
  g = ott_interop.h_to_g(jnp.asarray(h), jnp.asarray(y))
  geom = semidiscrete_pointcloud.SemidiscretePointCloud(
      lambda key, shape, dtype: jax.random.normal(key, shape, dtype), jnp.asarray(y), epsilon=0.0
  )
  f_ott = semidiscrete_linear_problem.SemidiscreteLinearProblem(geom).potential_fn_from_dual_vec(g)
  with jax.numpy_rank_promotion("allow"):  # ott-jax relies on implicit rank promotion
    f_ref = np.asarray(jax.vmap(f_ott)(jnp.asarray(x)))
  np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-4)
  # ... and f = |x|^2 - 2 u_h(x) in float64.
  u = (x.astype(np.float64) @ y.astype(np.float64).T + h[None, :]).max(1)
  np.testing.assert_allclose(f, (x.astype(np.float64) ** 2).sum(1) - 2 * u, rtol=1e-5, atol=1e-4)
  # ott's transport x - grad f(x) / 2 is our Brenier map.
  np.testing.assert_allclose(
      np.asarray(duals.transport(jnp.asarray(x))), np.asarray(pot.transport(jnp.asarray(x))), atol=1e-5
  )
  # g is exact at the codes; without it, g is None.
  np.testing.assert_allclose(np.asarray(jax.vmap(duals.g)(jnp.asarray(y))), np.asarray(g), rtol=1e-6)
  assert ott_interop.to_dual_potentials(pot, with_g=False).g is None


def test_dual_distance_is_w2_in_1d(np_rng):
  """Uniform[0, 1] to 5 points with uniform weights: W_2^2 = sum_k int_{k/5}^{(k+1)/5} (x - y_k)^2 dx."""
  n = 5
  y = np.sort(np_rng.uniform(-1.0, 2.0, size=n))
  cum = np.arange(1, n) / n
  h = np.concatenate([[0.0], -np.cumsum(cum * np.diff(y))])  # closed-form optimal heights
  edges = np.concatenate([[0.0], cum, [1.0]])
  w2 = sum(((edges[k + 1] - y[k]) ** 3 - (edges[k] - y[k]) ** 3) / 3 for k in range(n))
  pot = solver_lib.BrenierPotential(y=jnp.asarray(y[:, None], jnp.float32), h=jnp.asarray(h, jnp.float32))
  duals = ott_interop.to_dual_potentials(pot)
  grid = (np.arange(100_000) + 0.5) / 100_000  # midpoint quadrature of E_mu f
  dist = float(duals.distance(jnp.asarray(grid[:, None], jnp.float32), pot.y))
  np.testing.assert_allclose(dist, w2, rtol=1e-3)


def _shared_problem(np_rng, n=10):
  y = np_rng.normal(size=(n, 2)) * [1.5, 1.0]
  w = np_rng.dirichlet(np.full(n, 5.0))
  return solver_lib.make_problem(y, w, sources.Gaussian(dim=2))


_assign = jax.jit(lambda y, h, x: solver_lib.BrenierPotential(y=y, h=h).assign(x))


def _masses(h, y, x):
  idx = np.asarray(_assign(y, jnp.asarray(h, jnp.float32), x))
  return np.bincount(idx, minlength=y.shape[0]) / x.shape[0]


def test_agrees_with_ott_semidiscrete_solver(np_rng):
  """Heights of lsot_jax and ott-jax agree up to a constant, within a tolerance set by their marginal errors.

  Justification: near the optimum the cell masses are linear in h, w(h) - nu ~= H (h - h*), with H the
  (graph-Laplacian) Hessian of the energy, estimated here by central differences of the masses on a
  common sample. Then for the two solutions, H^{1/2} (h_ott - h_ours) ~= H^{+1/2} (e_ott - e_ours) with
  e = w - nu, so ||h_ott - h_ours||_H <= ||e_ott||_{H^+} + ||e_ours||_{H^+}. We allow a factor 2 for the
  non-linearity and the finite-difference Hessian. Reached: lhs ~0.009, bound ~0.013, ||h||_H ~0.97.
  """
  problem = _shared_problem(np_rng)
  w = np.asarray(problem.weights, np.float64)
  ours = solver_lib.BrenierSolver(num_iterations=400, batch_size=2048, max_batch_size=65536, tol=0.0)
  pot, _ = jax.jit(ours)(jax.random.key(0), problem)
  ott_pot, out = jax.jit(
      lambda r: ott_interop.ott_semidiscrete_solve(
          r, problem, num_iterations=3000, batch_size=4096, learning_rate=3e-3
      )
  )(jax.random.key(1))
  assert int(out.it) == 3000 and np.isfinite(np.asarray(out.g)).all()

  x = problem.source.sample(jax.random.key(99), 2**20)
  e_ours = _masses(pot.h, problem.y, x) - w
  e_ott = _masses(ott_pot.h, problem.y, x) - w
  assert np.abs(e_ours).sum() < 0.02 and np.abs(e_ott).sum() < 0.03, (e_ours, e_ott)

  h0 = np.asarray(pot.h, np.float64)
  n, delta = h0.shape[0], 0.02
  hess = np.zeros((n, n))
  for j in range(n):
    step = np.zeros(n)
    step[j] = delta
    hess[:, j] = (_masses(h0 + step, problem.y, x) - _masses(h0 - step, problem.y, x)) / (2 * delta)
  hess = 0.5 * (hess + hess.T)
  pinv = np.linalg.pinv(hess, rcond=1e-6, hermitian=True)
  diff = np.asarray(ott_pot.h, np.float64) - h0
  diff -= diff.mean()
  lhs = np.sqrt(diff @ hess @ diff)
  bound = np.sqrt(e_ours @ pinv @ e_ours) + np.sqrt(e_ott @ pinv @ e_ott)
  print(f"||h_ott - h_ours||_H = {lhs:.4f}, bound {bound:.4f}, ||h||_H = {np.sqrt(h0 @ hess @ h0):.3f}")
  assert lhs <= 2.0 * bound, (lhs, bound)
  # Not vacuous: the bound is far below the spread of the heights themselves.
  assert 2.0 * bound < 0.1 * np.sqrt(h0 @ hess @ h0)


def test_from_ott_output_masks_zero_weights_and_centres(np_rng):
  y = np_rng.normal(size=(6, 2))
  w = np.array([0.3, 0.0, 0.2, 0.2, 0.0, 0.3])
  problem = solver_lib.make_problem(y, w, sources.UniformCube(dim=2))
  pot, out = jax.jit(
      lambda r: ott_interop.ott_semidiscrete_solve(
          r, problem, num_iterations=200, batch_size=1024, learning_rate=1e-2
      )
  )(jax.random.key(0))
  h = np.asarray(pot.h)
  assert (h[[1, 4]] == -1e30).all()
  active = [0, 2, 3, 5]
  expected = np.asarray(ott_interop.g_to_h(out.g, problem.y))[active]
  np.testing.assert_allclose(h[active], expected - expected.mean(), rtol=1e-5, atol=1e-5)
  x = problem.source.sample(jax.random.key(3), 50_000)
  assert not np.isin(np.asarray(pot.assign(x)), [1, 4]).any()
  # y defaults to the geometry's codes; passing them explicitly gives the same potential.
  np.testing.assert_array_equal(np.asarray(ott_interop.from_ott_output(out, problem.y).h), h)


def test_ott_solve_traced_learning_rate_and_bad_arguments(np_rng):
  problem = _shared_problem(np_rng, n=6)
  solve = jax.jit(
      lambda r, lr: ott_interop.ott_semidiscrete_solve(
          r, problem, num_iterations=50, batch_size=256, learning_rate=lr
      )[0].h
  )
  h_small, h_large = solve(jax.random.key(0), 1e-3), solve(jax.random.key(0), 1e-1)
  assert np.isfinite(np.asarray(h_small)).all() and not np.allclose(h_small, h_large, atol=1e-3)
  with pytest.raises(ValueError, match="positive"):
    ott_interop.ott_semidiscrete_solve(
        jax.random.key(0), problem, num_iterations=0, batch_size=8, learning_rate=1e-2
    )
  with pytest.raises(ValueError, match="epsilon"):
    ott_interop.ott_semidiscrete_solve(
        jax.random.key(0), problem, num_iterations=5, batch_size=8, learning_rate=1e-2, epsilon=-1.0
    )


# ---------------------------------------------------------------------------------------------------------
# ott-jax's own objects in both directions: SemidiscreteOutput from our fit, SemidiscreteLinearProblem in.


def _random_fit(np_rng, n=10):
  """A problem with non-uniform weights and a potential with random (not optimal) heights on its codes."""
  problem = _shared_problem(np_rng, n=n)
  h = (0.5 * np_rng.normal(size=n)).astype(np.float32)
  return problem, solver_lib.BrenierPotential(y=problem.y, h=jnp.asarray(h))


def _clear_points(x, y, h, gap=1e-3):
  """Points whose best power score beats the runner-up by more than ``gap`` (float64): no near-ties."""
  scores = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T + np.asarray(h, np.float64)[None, :]
  top2 = np.sort(scores, axis=1)[:, -2:]
  return top2[:, 1] - top2[:, 0] > gap


def test_to_ott_output_chi2_matches_our_cell_masses(np_rng):
  """ott's chi^2 estimator on our output equals sum_j (w_j - nu_j)^2 / nu_j of our own cell masses.

  ott's estimate is unbiased for the chi^2 of the cell masses; with 32 x 8,192 samples its standard
  deviation here is 0.0034 (measured over 8 keys) and our plug-in from 2^21 samples is closer still (bias
  (n - 1) / M ~ 4e-6), so 0.02 is ~6 standard deviations, while a wrong g (e.g. g = h) gives 1.21
  against 1.83.
  """
  problem, pot = _random_fit(np_rng)
  out = ott_interop.to_ott_output(pot, problem)
  b = np.asarray(problem.weights, np.float64)
  np.testing.assert_allclose(np.asarray(out.prob.b), b, rtol=1e-6)
  masses = np.asarray(jax.jit(lambda k: pot.cell_masses(k, problem.source, 2**21))(jax.random.key(5)))
  chi2_ours = float(((masses - b) ** 2 / b).sum())
  with jax.numpy_rank_promotion("allow"):  # ott-jax relies on implicit rank promotion
    chi2_ott = float(out.marginal_chi2_error(jax.random.key(6), num_iters=32, batch_size=8192))
  assert chi2_ours > 0.5  # random heights: far from the marginals, so the comparison is not vacuous
  assert abs(chi2_ott - chi2_ours) < 0.02, (chi2_ott, chi2_ours)


def test_to_ott_output_sample_and_dual_potentials_are_our_map(np_rng):
  problem, pot = _random_fit(np_rng)
  out = ott_interop.to_ott_output(pot, problem)
  with jax.numpy_rank_promotion("allow"):
    # ott's hard assignment of its own source samples is our power-diagram cell.
    sampled = out.sample(jax.random.key(2), 4096)
    x = np.asarray(sampled.ot_prob.geom.x)
    # ott's DualPotentials.transport (x - grad f(x) / 2) on random points is our Brenier map.
    pts = 2.0 * np_rng.normal(size=(2000, 2)).astype(np.float32)
    moved = np.asarray(out.to_dual_potentials().transport(jnp.asarray(pts)))
  assert x.shape == (4096, 2)
  clear = _clear_points(x, pot.y, pot.h)
  assert clear.mean() > 0.97
  np.testing.assert_array_equal(np.asarray(sampled.paired_indices[1])[clear],
                                np.asarray(pot.assign(jnp.asarray(x)))[clear])
  clear = _clear_points(pts, pot.y, pot.h)
  assert clear.mean() > 0.97
  np.testing.assert_allclose(moved[clear], np.asarray(pot.transport(jnp.asarray(pts)))[clear], atol=1e-4)


def test_to_ott_output_masked_cells_state_and_bad_shapes(np_rng):
  y = np_rng.normal(size=(5, 2))
  problem = solver_lib.make_problem(np.concatenate([y, y[:1]]), None, sources.UniformCube(dim=2))
  assert float(problem.weights[5]) == 0.0  # the duplicate of code 0 is merged into it
  solver = solver_lib.BrenierSolver(num_iterations=20, batch_size=1024, tol=0.0)
  state = solver.init(problem)
  pot = solver.output(problem, state)  # Voronoi heights, the copy's cell masked
  out = ott_interop.to_ott_output(pot, problem, state=state)
  assert int(out.it) == int(state.it) and bool(out.converged) == bool(state.converged)
  assert out.losses is None and out.errors is None
  with jax.numpy_rank_promotion("allow"):
    sampled = out.sample(jax.random.key(1), 2048)
  assert not np.isin(np.asarray(sampled.paired_indices[1]), [5]).any()
  np.testing.assert_array_equal(np.asarray(sampled.paired_indices[1]),
                                np.asarray(pot.assign(sampled.ot_prob.geom.x)))
  # jit-able, and the geometry's epsilon is passed through.
  out_jit = jax.jit(lambda p: ott_interop.to_ott_output(p, problem))(pot)
  np.testing.assert_allclose(np.asarray(out_jit.g), np.asarray(out.g), rtol=1e-6)
  assert float(ott_interop.to_ott_output(pot, problem, epsilon=0.1).prob.epsilon) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="do not match"):
    ott_interop.to_ott_output(solver_lib.BrenierPotential(y=pot.y[:3], h=pot.h[:3]), problem)


def _ott_problem(np_rng, n=12, d=3, epsilon=0.0, cost_fn=None):
  y = jnp.asarray(np_rng.normal(size=(n, d)), jnp.float32)
  b = jnp.asarray(np_rng.dirichlet(np.full(n, 5.0)), jnp.float32)

  def sampler(key, shape, dtype):
    return 0.5 + jax.random.uniform(key, shape, dtype)

  geom = semidiscrete_pointcloud.SemidiscretePointCloud(sampler, y, epsilon=epsilon, cost_fn=cost_fn)
  return semidiscrete_linear_problem.SemidiscreteLinearProblem(geom, b=b)


def test_from_ott_problem_and_round_trip(np_rng):
  prob = _ott_problem(np_rng)
  ours = lsot_jax.from_ott_problem(prob)
  assert isinstance(ours, solver_lib.SemidiscreteProblem) and ours.dim == 3
  np.testing.assert_array_equal(np.asarray(ours.y), np.asarray(prob.geom.y))
  np.testing.assert_allclose(np.asarray(ours.weights), np.asarray(prob.b), rtol=1e-6)
  # The source draws exactly ott's points for the same key.
  key = jax.random.key(3)
  np.testing.assert_array_equal(np.asarray(ours.source.sample(key, 100)),
                                np.asarray(prob.geom.sample(key, 100).x))
  # ott -> ours -> ott -> ours keeps the codes, the weights, the source dimension and its samples.
  back = ott_interop.to_ott_problem(ours)
  assert isinstance(back, semidiscrete_linear_problem.SemidiscreteLinearProblem)
  assert float(back.epsilon) == 0.0
  again = ott_interop.from_ott_problem(back)
  np.testing.assert_array_equal(np.asarray(again.y), np.asarray(ours.y))
  np.testing.assert_array_equal(np.asarray(again.weights), np.asarray(ours.weights))
  assert again.source.dim == ours.source.dim == 3
  np.testing.assert_array_equal(np.asarray(again.source.sample(key, 50)),
                                np.asarray(ours.source.sample(key, 50)))
  # ours (a Gaussian source) -> ott -> ours; ott's b = None means uniform weights.
  native = solver_lib.make_problem(np_rng.normal(size=(7, 2)), None, sources.Gaussian(dim=2))
  trip = ott_interop.from_ott_problem(ott_interop.to_ott_problem(native))
  np.testing.assert_array_equal(np.asarray(trip.y), np.asarray(native.y))
  np.testing.assert_allclose(np.asarray(trip.weights), np.full(7, 1 / 7), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(trip.source.sample(key, 20)),
                                np.asarray(native.source.sample(key, 20)))
  uniform = semidiscrete_linear_problem.SemidiscreteLinearProblem(prob.geom)
  np.testing.assert_allclose(np.asarray(ott_interop.from_ott_problem(uniform).weights), np.full(12, 1 / 12),
                             rtol=1e-6)
  # An explicit lsot_jax source replaces ott's sampler.
  assert isinstance(ott_interop.from_ott_problem(prob, sources.Gaussian(dim=3)).source, sources.Gaussian)


def test_from_ott_problem_refuses_what_we_do_not_solve(np_rng):
  with pytest.raises(ValueError, match="entropically regularised"):
    ott_interop.from_ott_problem(_ott_problem(np_rng, epsilon=None))
  with pytest.raises(ValueError, match="entropically regularised"):
    ott_interop.from_ott_problem(_ott_problem(np_rng, epsilon=0.1))
  assert ott_interop.from_ott_problem(_ott_problem(np_rng, epsilon=0.1), drop_epsilon=True).dim == 3
  with pytest.raises(ValueError, match="squared-Euclidean.*Euclidean"):
    ott_interop.from_ott_problem(_ott_problem(np_rng, cost_fn=costs.Euclidean()))
  with pytest.raises(TypeError, match="SemidiscreteLinearProblem"):
    ott_interop.from_ott_problem(solver_lib.make_problem(np.eye(3)))
  with pytest.raises(ValueError, match="Source dimension 2"):
    ott_interop.from_ott_problem(_ott_problem(np_rng), sources.Gaussian(dim=2))


def test_our_solver_on_an_ott_problem_meets_otts_chi2(np_rng):
  """End to end as an ott user: ott problem -> BrenierSolver -> ott output -> ott's own chi^2 error."""
  prob = _ott_problem(np_rng, n=8, d=2)
  problem = lsot_jax.from_ott_problem(prob)
  solver = lsot_jax.BrenierSolver(num_iterations=300, batch_size=2048, max_batch_size=32768, tol=0.0)
  pot, state = jax.jit(solver)(jax.random.key(0), problem)
  start = solver.output(problem, solver.init(problem))

  def chi2(potential):
    out = lsot_jax.to_ott_output(potential, problem, state=state)
    assert out.prob.geom.sampler is prob.geom.sampler  # ott's own sampler, passed through
    with jax.numpy_rank_promotion("allow"):
      return float(out.marginal_chi2_error(jax.random.key(7), num_iters=16, batch_size=8192))

  fitted, initial = chi2(pot), chi2(start)
  print(f"ott chi^2: initial {initial:.4f}, fitted {fitted:.5f}")
  assert initial > 0.1 and fitted < 0.01 * initial, (initial, fitted)
