"""Tests for lsot_jax.solver against references computed independently (closed forms, scipy, NumPy).

Marginal errors are always measured on fresh evaluation samples, never with the solver's own histories.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

from lsot_jax import kernels
from lsot_jax import solver as solver_lib
from lsot_jax import sources

# One jitted entry point: solvers with the same static fields (and problems with the same shapes) share
# one compilation; ``learning_rate`` is a traced leaf.
_solve = jax.jit(lambda solver, rng, problem: solver(rng, problem))
_run = jax.jit(lambda solver, rng, problem, state, steps: solver.run(rng, problem, state, steps))


def _eval_masses(potential, source, num, seed=12345):
  """Cell masses of ``potential`` on ``num`` fresh source samples, counted with NumPy (float64)."""
  x = source.sample(jax.random.key(seed), num)
  idx = np.asarray(potential.assign(x))
  return np.bincount(idx, minlength=potential.y.shape[0]) / num


def _noise_floor(weights, num):
  return float(solver_lib.noise_floor_l1(jnp.asarray(weights, jnp.float32), num))


# ------------------------------------------------------------------------------------------------------
# 1-D: uniform source on [0, 1] to n sorted points. The Brenier map is the quantile function
# Q(t) = y_k for C_{k-1} <= t < C_k with C = cumsum(weights); the cell boundary between y_i and y_{i+1} is
# where <x, y_i> + h_i = <x, y_{i+1}> + h_{i+1}, i.e. x = -(h_{i+1} - h_i) / (y_{i+1} - y_i) = C_i.
# ------------------------------------------------------------------------------------------------------


def _one_d_problem(np_rng, n=8):
  y = np.sort(np_rng.uniform(-1.0, 2.0, size=n))
  w = np_rng.dirichlet(np.full(n, 3.0))
  problem = solver_lib.make_problem(y[:, None], w, sources.UniformCube(dim=1, low=0.0, high=1.0))
  return y, w, problem


def test_cell_masses_match_closed_form_1d(rng, np_rng):
  """Heights built from the closed form give cells of the target masses (checks cell_masses, no solver)."""
  y, w, problem = _one_d_problem(np_rng)
  cum = np.cumsum(w)[:-1]
  h = np.concatenate([[0.0], -np.cumsum(cum * np.diff(y))])
  pot = solver_lib.BrenierPotential(y=problem.y, h=jnp.asarray(h - h.mean(), jnp.float32))
  masses = np.asarray(pot.cell_masses(rng, problem.source, 2**20, batch_size=2**17))
  assert abs(masses.sum() - 1.0) < 1e-5
  np.testing.assert_allclose(masses, w, atol=5 * np.sqrt(w.max() / 2**20))


def test_one_dimensional_quantile_map(np_rng):
  """Cell boundaries within 0.02 of the cumulative weights (reached: ~0.006); map = quantile function."""
  y, w, problem = _one_d_problem(np_rng)
  solver = solver_lib.BrenierSolver(
      num_iterations=300, batch_size=1024, max_batch_size=16384, tol=0.0
  )
  pot, state = _solve(solver, jax.random.key(0), problem)
  assert not bool(state.diverged)
  h = np.asarray(pot.h, np.float64)
  boundaries = -np.diff(h) / np.diff(y)
  cum = np.cumsum(w)[:-1]
  tol = 0.02
  np.testing.assert_allclose(boundaries, cum, atol=tol)
  t = np.linspace(0.0, 1.0, 4001)
  quantile = y[np.minimum(np.searchsorted(cum, t, side="right"), len(y) - 1)]
  mapped = np.asarray(pot.transport(jnp.asarray(t[:, None], jnp.float32)))[:, 0]
  away = np.min(np.abs(t[:, None] - cum[None, :]), axis=1) > tol
  assert away.mean() > 0.6
  np.testing.assert_allclose(mapped[away], quantile[away], rtol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Gaussian N(0, I) to samples of N(m, A A^T): the Brenier map is T(x) = m + Sigma^{1/2} x.
# ------------------------------------------------------------------------------------------------------

_A = np.array([[1.0, 0.0], [0.6, 0.5]])
_M = np.array([1.0, -2.0])


def _affine_map_error(num_codes, seed, solver):
  np_rng = np.random.default_rng(seed)
  y = _M + np_rng.normal(size=(num_codes, 2)) @ _A.T
  problem = solver_lib.make_problem(y, source=sources.Gaussian(dim=2))
  pot, _ = _solve(solver, jax.random.key(seed), problem)
  x = np_rng.normal(size=(20_000, 2)).astype(np.float32)
  exact = _M + x @ scipy.linalg.sqrtm(_A @ _A.T).real.T
  return float(np.linalg.norm(np.asarray(pot.transport(jnp.asarray(x))) - exact, axis=1).mean())


def test_gaussian_to_affine_gaussian_map_error_decreases():
  """E|T_hat(x) - T(x)| reached: 0.26-0.31 at n = 50, 0.12-0.18 at n = 400 over seeds 0-3 (the Voronoi
  start, i.e. the nearest-code map, gives ~0.95).

  The semi-discrete map is piecewise constant, so the error is bounded below by the cell size ~ n^{-1/2}
  in d = 2; it must shrink as n grows.
  """
  solver = solver_lib.BrenierSolver(num_iterations=200, batch_size=4096, max_batch_size=32768, tol=0.0)
  errors = [_affine_map_error(n, 0, solver) for n in (50, 400)]
  assert errors[0] < 0.36, errors
  assert errors[1] < 0.2, errors
  assert errors[1] < 0.75 * errors[0], errors


@pytest.mark.slow
def test_gaussian_to_affine_gaussian_map_error_large_n():
  """Reached: 0.198 (n = 100), 0.135 (n = 400), 0.078 (n = 1600) with the score-gap step unit; threshold 0.09."""
  solver = solver_lib.BrenierSolver(num_iterations=300, batch_size=4096, max_batch_size=32768, tol=0.0)
  errors = [_affine_map_error(n, 0, solver) for n in (100, 400, 1600)]
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.09, errors


# ------------------------------------------------------------------------------------------------------
# Discrete source: exact gradient, the map must be an optimal permutation.
# ------------------------------------------------------------------------------------------------------


def test_discrete_source_gives_optimal_permutation(np_rng):
  """n = 40 points, batch = all points (exact gradient): a permutation of scipy's optimal cost.

  With an exact gradient Adam oscillates around the optimal polytope until the step size decays; the
  solver's ``extra_decays`` stages halve it whenever a window brings no improvement (default step here).
  """
  n = 40
  x = np_rng.normal(size=(n, 2)).astype(np.float32)
  y = (np_rng.normal(size=(n, 2)) * [2.0, 0.5] + [1.0, 0.0]).astype(np.float32)
  problem = solver_lib.make_problem(y, source=sources.DiscreteSource(points=jnp.asarray(x)))
  solver = solver_lib.BrenierSolver(
      num_iterations=4000, batch_size=n, max_batch_size=n, tol=1e-6
  )
  pot, state = _solve(solver, jax.random.key(0), problem)
  assert bool(state.converged)
  sigma = np.asarray(pot.assign(jnp.asarray(x)))
  np.testing.assert_array_equal(np.sort(sigma), np.arange(n))
  cost = ((x.astype(np.float64)[:, None] - y.astype(np.float64)[None]) ** 2).sum(-1)
  rows, cols = scipy.optimize.linear_sum_assignment(cost)
  np.testing.assert_allclose(cost[np.arange(n), sigma].sum(), cost[rows, cols].sum(), rtol=1e-9)


# ------------------------------------------------------------------------------------------------------
# Non-uniform weights, convergence flag, histories, resumable runs.
# ------------------------------------------------------------------------------------------------------


def _small_problem(np_rng, n=12, weights=True):
  y = np_rng.normal(size=(n, 2)) * [1.5, 1.0]
  w = np_rng.dirichlet(np.full(n, 2.0)) if weights else None
  return solver_lib.make_problem(y, w, sources.Gaussian(dim=2))


# Shared by several tests (one compilation): runs to the end, since tol = 0.
_SMALL_SOLVER = solver_lib.BrenierSolver(
    num_iterations=400, batch_size=2048, max_batch_size=65536, tol=0.0
)


def test_nonuniform_weights_converge(np_rng):
  """Dirichlet(2) weights on 12 codes: eval L1 error < 0.02 (reached ~0.006; eval noise floor ~0.003)."""
  problem = _small_problem(np_rng)
  w = np.asarray(problem.weights, np.float64)
  assert w.min() < 0.5 / 12  # really non-uniform
  pot, state = _solve(_SMALL_SOLVER, jax.random.key(1), problem)
  assert int(state.it) == _SMALL_SOLVER.num_iterations and not bool(state.diverged)
  num_eval = 2**20
  masses = _eval_masses(pot, problem.source, num_eval)
  l1 = np.abs(masses - w).sum()
  assert l1 < 0.02, l1
  assert np.max(np.abs(masses - w) / w) < 0.15
  # The potential's own error estimate agrees with the independent one.
  own = pot.marginal_errors(jax.random.key(4), problem.source, problem.weights, 2**20)
  assert abs(float(own["l1"]) - l1) < 0.01
  assert abs(float(jnp.mean(state.h))) < 1e-5  # mean-centred


def test_converged_flag_stops_early_and_histories_are_filled(np_rng):
  problem = _small_problem(np_rng)
  solver = solver_lib.BrenierSolver(
      num_iterations=600, batch_size=2048, max_batch_size=65536, tol=0.05
  )
  pot, state = _solve(solver, jax.random.key(1), problem)
  it = int(state.it)
  assert bool(state.converged) and not bool(state.diverged)
  assert 0 < it < solver.num_iterations and it % solver.window == 0
  assert float(state.window_errors[it // solver.window - 1]) < solver.tol
  assert np.abs(_eval_masses(pot, problem.source, 2**20) - np.asarray(problem.weights)).sum() < 0.1
  # Histories: filled up to `it`, untouched after.
  assert np.isfinite(np.asarray(state.losses[:it])).all()
  assert np.isinf(np.asarray(state.losses[it:])).all()
  assert np.isfinite(np.asarray(state.errors[:it])).all()
  assert np.isinf(np.asarray(state.errors[it:])).all()
  batches = np.asarray(state.batch_sizes)
  assert set(batches[:it]) <= set(solver.batch_schedule) and (np.diff(batches[:it]) >= 0).all()
  assert (batches[it:] == 0).all()
  assert np.isfinite(np.asarray(state.window_errors[: it // solver.window])).all()
  assert np.isinf(np.asarray(state.window_errors[it // solver.window:])).all()
  # The energy estimate decreases from the Voronoi start (noisy, so compare window means).
  losses = np.asarray(state.losses[:it])
  assert losses[-10:].mean() < losses[:10].mean()


def test_converged_flag_means_small_true_marginal_error(np_rng):
  """``converged`` must certify the returned heights: their eval L1 error <= tol (+ eval noise).

  Default solver, n = 400 codes in d = 2 (small cells). Known to FAIL on the first solver version: the
  convergence test uses the histogram averaged over a window of steps, and Adam's oscillation around the
  optimum cancels in that average (window error ~0.045 < tol = 0.05) while the iterate itself has an eval
  L1 error of ~0.3 (per-step batch errors ~0.3 too).
  """
  y = np_rng.normal(size=(400, 2))
  problem = solver_lib.make_problem(y, source=sources.Gaussian(dim=2))
  solver = solver_lib.BrenierSolver(num_iterations=2000)
  pot, state = _solve(solver, jax.random.key(0), problem)
  assert bool(state.converged), f"no convergence claim in {int(state.it)} steps: nothing would be checked"
  num_eval = 2**21
  l1 = np.abs(_eval_masses(pot, problem.source, num_eval) - 1.0 / 400).sum()
  floor = _noise_floor(problem.weights, num_eval)
  assert l1 <= solver.tol + 3 * floor, (
      f"converged=True after {int(state.it)} steps but the eval L1 error is {l1:.3f} (tol {solver.tol})"
  )


def test_chunked_run_equals_single_run(np_rng):
  problem = _small_problem(np_rng, n=10)
  solver = solver_lib.BrenierSolver(
      num_iterations=120, batch_size=512, max_batch_size=4096, tol=0.0, window=10
  )
  rng = jax.random.key(3)
  one = _run(solver, rng, problem, solver.init(problem), 120)
  chunked = solver.init(problem)
  for _ in range(3):
    chunked = _run(solver, rng, problem, chunked, 40)
  assert int(one.it) == int(chunked.it) == 120
  np.testing.assert_array_equal(np.asarray(one.h), np.asarray(chunked.h))
  np.testing.assert_array_equal(np.asarray(one.losses), np.asarray(chunked.losses))
  np.testing.assert_array_equal(np.asarray(one.stage), np.asarray(chunked.stage))
  # And the run actually moved away from the initialisation.
  assert not np.allclose(np.asarray(one.h), np.asarray(solver.init(problem).h))


def test_vmap_over_seeds_and_learning_rates(np_rng):
  problem = _small_problem(np_rng, n=10)
  cfg = dict(num_iterations=60, batch_size=512, max_batch_size=2048, tol=0.0)
  seeds = jax.random.split(jax.random.key(7), 3)
  lrs = jnp.asarray([0.05, 0.3, 1.0], jnp.float32)

  def solve(key, lr):
    pot, state = _solve(solver_lib.BrenierSolver(learning_rate=lr, **cfg), key, problem)
    return pot.h, state.losses

  hs, losses = jax.jit(jax.vmap(solve))(seeds, lrs)
  assert hs.shape == (3, 10)
  for i in range(3):
    h_i, losses_i = solve(seeds[i], lrs[i])
    np.testing.assert_allclose(np.asarray(hs[i]), np.asarray(h_i), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(losses[i]), np.asarray(losses_i), rtol=1e-5, atol=1e-5)
  # Different learning rates give different heights (the leaf is really used).
  assert not np.allclose(np.asarray(hs[0]), np.asarray(hs[2]), atol=1e-3)


# ------------------------------------------------------------------------------------------------------
# Progress callback.
# ------------------------------------------------------------------------------------------------------

_CALLBACK_KEYS = {"step", "num_samples", "l1", "energy", "stage", "lr"}


# One host function for every test below, so that solvers with equal settings share one compilation.
_CALLS = []
_record = _CALLS.append


def _take_calls():
  jax.effects_barrier()  # the calls are unordered: wait for all of them
  calls = list(_CALLS)
  _CALLS.clear()
  return calls


def _check_calls(calls, solver, problem, state):
  """Each call against the state's histories: step, batch size, batch L1 error and energy of that step."""
  assert all(set(c) == _CALLBACK_KEYS for c in calls), calls[:1]
  steps = sorted(c["step"] for c in calls)
  every = solver.callback_every
  assert steps == list(range(every, int(state.it) + 1, every)), steps
  scale = float(problem.scale)
  for c in calls:
    t = c["step"] - 1
    assert c["num_samples"] == int(state.batch_sizes[t]) == solver.batch_schedule[c["stage"]]
    assert c["l1"] == float(state.errors[t]) and c["energy"] == float(state.losses[t])
    boost = c["lr"] / (solver.learning_rate * solver.lr_decay ** c["stage"] * scale)
    assert any(abs(boost - 2.0**k) < 1e-4 * 2.0**k for k in range(11)), c  # a power of 1 / lr_decay


def test_callback_reports_every_n_steps_and_changes_nothing(np_rng):
  problem = _small_problem(np_rng, n=10)
  cfg = dict(num_iterations=120, batch_size=512, max_batch_size=4096, tol=0.0, extra_decays=1)
  _take_calls()
  solver = solver_lib.BrenierSolver(callback=_record, callback_every=10, **cfg)
  rng = jax.random.key(3)
  state = _run(solver, rng, problem, solver.init(problem), 120)
  calls = _take_calls()
  plain = _run(solver_lib.BrenierSolver(**cfg), rng, problem, solver.init(problem), 120)
  np.testing.assert_array_equal(np.asarray(state.h), np.asarray(plain.h))
  np.testing.assert_array_equal(np.asarray(state.losses), np.asarray(plain.losses))
  assert len(calls) == 12
  _check_calls(calls, solver, problem, state)
  assert len({c["stage"] for c in calls}) > 1  # the stage changed during the run and the reports show it

  # Resumed in chunks (25 is not a multiple of callback_every): the same reports.
  st = solver.init(problem)
  for steps in (40, 25, 55):
    st = _run(solver, rng, problem, st, steps)
  np.testing.assert_array_equal(np.asarray(st.h), np.asarray(state.h))
  key = lambda c: c["step"]
  assert sorted(_take_calls(), key=key) == sorted(calls, key=key)


def test_callback_under_vmap_reports_each_run_until_it_stops(np_rng):
  """Under vmap each run reports its own scalars, and a run that has stopped (converged, or at the end) stops
  reporting (every step is due with callback_every = 1, so the stopped runs' idle loop steps would show)."""
  problem = _small_problem(np_rng)
  cfg = dict(num_iterations=70, batch_size=2048, max_batch_size=8192, tol=0.05, extra_decays=1,
             callback=_record, callback_every=1)

  def solve(key, lr):
    return _solve(solver_lib.BrenierSolver(learning_rate=lr, **cfg), key, problem)[1]

  seeds = jax.random.split(jax.random.key(1), 3)
  _take_calls()
  states = jax.jit(jax.vmap(solve))(seeds, jnp.asarray([1.0, 0.01, 0.3], jnp.float32))
  calls = _take_calls()
  its = np.asarray(states.it)
  np.testing.assert_array_equal(its, [60, 70, 70])  # the first run converged at step 60, 10 steps early
  assert bool(states.converged[0]) and not bool(states.converged[1:].any())
  expected = sorted(
      (t + 1, float(states.errors[i, t]), float(states.losses[i, t]))
      for i in range(3) for t in range(int(its[i]))
  )
  assert len(expected) == 200
  assert sorted((c["step"], c["l1"], c["energy"]) for c in calls) == expected
  assert all(set(c) == _CALLBACK_KEYS for c in calls)


def test_callback_fields_are_validated():
  with pytest.raises(ValueError, match="callback_every"):
    solver_lib.BrenierSolver(callback=print, callback_every=0)
  with pytest.raises(ValueError, match="callback must be a function"):
    solver_lib.BrenierSolver(callback=3)


# ------------------------------------------------------------------------------------------------------
# Bad input, duplicates, zero weights.
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "y,weights,source,match",
    [
        (np.zeros((0, 2)), None, None, "empty"),
        (np.zeros((3, 0)), None, None, "empty"),
        (np.zeros(5), None, None, r"shape \[n, d\]"),
        (np.array([[0.0, 1.0], [np.nan, 0.0]]), None, None, "NaN or Inf"),
        (np.array([[0.0, np.inf], [1.0, 0.0]]), None, None, "NaN or Inf"),
        (np.ones((3, 2)), None, sources.Gaussian(dim=3), "dimension"),
        (np.ones((3, 2)), None, sources.UniformCube(dim=1), "dimension"),
        (np.eye(3), np.array([0.5, 0.3, 0.1]), None, "sum to 1"),
        (np.eye(3), np.array([0.7, 0.5, -0.2]), None, "non-negative"),
        (np.eye(3), np.array([0.5, 0.5]), None, "shape"),
        (np.eye(3), np.full((3, 1), 1 / 3), None, "shape"),
        (np.eye(3), np.array([0.5, np.nan, 0.5]), None, "NaN or Inf"),
    ],
)
def test_make_problem_rejects_bad_input(y, weights, source, match):
  with pytest.raises(ValueError, match=match):
    solver_lib.make_problem(y, weights, source)


def test_solver_rejects_bad_hyperparameters():
  with pytest.raises(ValueError, match="initialisation"):
    solver_lib.BrenierSolver(initialisation="random")
  with pytest.raises(ValueError, match="batch_size"):
    solver_lib.BrenierSolver(batch_size=4096, max_batch_size=1024)
  with pytest.raises(ValueError, match="growth"):
    solver_lib.BrenierSolver(growth=1)


def test_potential_rejects_points_of_wrong_dimension(np_rng):
  pot = solver_lib.BrenierPotential(y=jnp.ones((4, 3)), h=jnp.zeros(4))
  with pytest.raises(ValueError, match=r"\[M, 3\]"):
    pot.assign(jnp.ones((5, 2)))


def test_duplicates_merge_mass_and_zero_weights_stay_empty(np_rng):
  """Copies 4 and 7 of code 1 merge into cell 1 (which gets the combined mass); weight-0 code 9 stays empty."""
  n = 12
  y = np_rng.normal(size=(n, 2)) * [1.5, 1.0]
  y[4] = y[1]
  y[7] = y[1]
  w = np_rng.dirichlet(np.full(n, 3.0))
  w[9] = 0.0
  w /= w.sum()
  problem = solver_lib.make_problem(y, w, sources.Gaussian(dim=2))
  rep = np.asarray(problem.representative)
  expected_rep = np.arange(n)
  expected_rep[[4, 7]] = 1
  np.testing.assert_array_equal(rep, expected_rep)
  merged = np.asarray(problem.weights, np.float64)
  np.testing.assert_allclose(merged[1], w[1] + w[4] + w[7], rtol=1e-6)
  assert merged[4] == merged[7] == merged[9] == 0.0
  np.testing.assert_allclose(np.delete(merged, [1, 4, 7]), np.delete(w, [1, 4, 7]), rtol=1e-6)

  pot, state = _solve(_SMALL_SOLVER, jax.random.key(2), problem)
  assert np.isfinite(np.asarray(state.h)).all()
  masses = _eval_masses(pot, problem.source, 2**20)
  assert masses[4] == masses[7] == masses[9] == 0.0
  np.testing.assert_allclose(masses[1], w[1] + w[4] + w[7], atol=0.01)
  assert np.abs(masses - merged).sum() < 0.03
  # The potential's own Monte-Carlo masses agree: exactly zero for the empty cells.
  own = np.asarray(pot.cell_masses(jax.random.key(9), problem.source, 2**16))
  assert own[4] == own[7] == own[9] == 0.0


def test_duplicates_without_merging_do_not_crash(np_rng):
  y = np_rng.normal(size=(6, 2))
  y[3] = y[0]
  problem = solver_lib.make_problem(y, merge_duplicates=False)
  np.testing.assert_array_equal(np.asarray(problem.representative), np.arange(6))
  solver = solver_lib.BrenierSolver(num_iterations=50, batch_size=512, max_batch_size=1024)
  _, state = _solve(solver, jax.random.key(0), problem)
  assert np.isfinite(np.asarray(state.h)).all() and not bool(state.diverged)


# ------------------------------------------------------------------------------------------------------
# Small pieces against NumPy.
# ------------------------------------------------------------------------------------------------------


def test_potential_transport_and_assign_match_numpy(np_rng):
  y = np_rng.normal(size=(15, 3)).astype(np.float32)
  h = np_rng.normal(size=15).astype(np.float32)
  x = np_rng.normal(size=(300, 3)).astype(np.float32)
  pot = solver_lib.BrenierPotential(y=jnp.asarray(y), h=jnp.asarray(h), tile_size=4, row_chunk=64)
  s = x.astype(np.float64) @ y.astype(np.float64).T + h[None, :]
  top2 = np.sort(s, axis=1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 1e-4
  idx = np.asarray(pot.assign(jnp.asarray(x)))
  np.testing.assert_array_equal(idx[clear], s.argmax(1)[clear])
  np.testing.assert_array_equal(np.asarray(pot.transport(jnp.asarray(x))), y[idx])
  np.testing.assert_allclose(np.asarray(pot.potential(jnp.asarray(x))), s.max(1), rtol=1e-5, atol=1e-5)


def test_initial_heights(np_rng):
  problem = _small_problem(np_rng, n=7, weights=False)
  y = np.asarray(problem.y, np.float64)
  y = y + [3.0, -2.0]  # off-centre codes: the start is the Voronoi diagram of the codes moved to the origin
  problem = solver_lib.make_problem(y, source=problem.source)
  vor = -0.5 * ((y - y.mean(0)) ** 2).sum(1)
  np.testing.assert_allclose(
      np.asarray(solver_lib.BrenierSolver().init_heights(problem)), vor - vor.mean(), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_array_equal(
      np.asarray(solver_lib.BrenierSolver(initialisation="zero").init_heights(problem)), np.zeros(7)
  )


def test_noise_floor_matches_multinomial_simulation(np_rng):
  w = np_rng.dirichlet(np.full(10, 2.0))
  num = 2000
  draws = np_rng.multinomial(num, w, size=4000) / num
  simulated = np.abs(draws - w[None, :]).sum(1).mean()
  np.testing.assert_allclose(_noise_floor(w, num), simulated, rtol=0.05)
