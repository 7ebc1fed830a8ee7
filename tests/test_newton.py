"""Tests of the Monte-Carlo Newton solver against references computed independently.

References: closed-form 1-D Hessians (Gaussian source: facets are points), finite differences of cell masses
on a very large sample (2-D), a dense NumPy solve (CG), a multinomial simulation (the chi^2 estimator),
1-D quantile maps, the Gaussian-to-Gaussian affine map and ott-jax's own chi^2 (via the interop module).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from lsot_jax import kernels
from lsot_jax import newton
from lsot_jax import solver as solver_lib
from lsot_jax import sources


def _solve(solver, key, problem):
  return jax.jit(solver.__call__)(key, problem)


def _dense_hessian(a, b, w, n):
  """The dense Laplacian of an edge list (NumPy, float64)."""
  hess = np.zeros((n, n))
  np.add.at(hess, (np.asarray(a), np.asarray(b)), -np.asarray(w, np.float64))
  hess = hess + hess.T
  np.fill_diagonal(hess, 0.0)
  np.fill_diagonal(hess, -hess.sum(axis=1))
  return hess


def _top_k_edges(x, y, h, k, quantile, per_cell=False):
  vals, idx = jax.jit(lambda x: kernels.top_k(x, y, h, k))(x)
  return newton.hessian_edges(vals, idx, x.shape[0], quantile, y.shape[0] if per_cell else None)


# ------------------------------------------------------------------------------------------------------
# The Hessian estimate.
# ------------------------------------------------------------------------------------------------------


def test_gaussian_heights_of_codes_in_a_subspace_match_float64():
  """4 codes in d = 48 (covariance of rank 3): float32 eigh returns the null space as eigenvalues of about
  +-1e-7 of the largest; unclipped, S^(-1/2) turned them into heights of 1e9 on an AMD EPYC. The heights
  must match the same formula in float64, where those eigenvalues are the regulariser's."""
  rng = np.random.default_rng(0)
  y = 4.0 * rng.normal(size=(4, 48))
  w = np.full(4, 0.25)
  mu, var = np.full(48, 0.5), 1.0 / 12.0
  mean = w @ y
  z = y - mean
  cov = (w[:, None] * z).T @ z
  reg = 1e-6 * np.trace(cov) / 48
  evals, evecs = np.linalg.eigh(cov + reg * np.eye(48))
  a_inv = (evecs * (np.sqrt(var) / np.sqrt(evals))) @ evecs.T
  ref = -0.5 * np.einsum("nd,de,ne->n", z, a_inv, z) - z @ mu
  h = newton.gaussian_heights(jnp.asarray(y, jnp.float32), jnp.asarray(w, jnp.float32),
                              jnp.asarray(mu, jnp.float32), var)
  np.testing.assert_allclose(np.asarray(h) - np.mean(np.asarray(h)), ref - ref.mean(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("per_cell", [False, True])
def test_hessian_matches_closed_form_1d(per_cell):
  """1-D, Gaussian source: H_{i,i+1} = -pdf(b_i) / (y_{i+1} - y_i), b_i the boundary point (within 6 %)."""
  y = np.array([-1.5, -0.4, 0.3, 1.1, 2.5])
  boundary = np.array([-1.0, -0.2, 0.4, 1.2])  # cell i is [boundary[i-1], boundary[i]]
  h = np.concatenate([[0.0], -np.cumsum(boundary * np.diff(y))])
  x = jax.random.normal(jax.random.key(0), (1 << 21, 1))
  a, b, w, _ = _top_k_edges(x, jnp.asarray(y[:, None], jnp.float32), jnp.asarray(h, jnp.float32), 3, 0.2,
                          per_cell)
  est = _dense_hessian(a, b, w, len(y))
  np.testing.assert_allclose((h[:-1] - h[1:]) / np.diff(y), boundary)
  exact_off = -scipy.stats.norm.pdf(boundary) / np.diff(y)
  np.testing.assert_allclose(np.diag(est, 1), exact_off, rtol=0.06)
  # Non-neighbours in 1-D share no facet.
  assert np.abs(np.triu(est, 2)).max() < 1e-3 * np.abs(exact_off).max()


@pytest.mark.parametrize("per_cell", [False, True])
def test_hessian_matches_finite_differences_2d(per_cell):
  """2-D, 20 codes: the sampled Hessian times random directions vs central differences of cell masses on
  2^21 samples (relative error < 0.15; the band bias at quantile 0.2 is ~ +7 %)."""
  n = 20
  y = jax.random.normal(jax.random.key(1), (n, 2))
  problem = solver_lib.make_problem(y)
  h = solver_lib.voronoi_heights(problem.y, problem.weights)
  m = 1 << 21
  x = problem.source.sample(jax.random.key(2), m)
  a, b, w, eps = _top_k_edges(x, problem.y, h, 4, 0.2, per_cell)
  est = _dense_hessian(a, b, w, n)

  @jax.jit
  def masses(hh):
    return kernels.cell_histogram(kernels.assign(x, problem.y, hh)[0], n)

  rng = np.random.default_rng(0)
  for _ in range(3):
    v = rng.normal(size=n) * float(eps)
    delta = 0.5
    vj = jnp.asarray(v, jnp.float32)
    fd = np.asarray(masses(h + delta * vj) - masses(h - delta * vj)) / (2 * delta)
    rel = np.linalg.norm(est @ v - fd) / np.linalg.norm(fd)
    assert rel < 0.15, rel
  # The matrix-free product equals the dense Laplacian.
  np.testing.assert_allclose(np.asarray(newton.laplacian_matvec(a, b, w, vj)), est @ np.asarray(vj),
                             rtol=1e-3, atol=2e-5)


def test_pcg_matches_dense_solve(np_rng):
  n = 60
  edges = np_rng.integers(0, n, size=(400, 2))
  w = np_rng.uniform(0.1, 1.0, size=400)
  a, b = jnp.asarray(edges[:, 0], jnp.int32), jnp.asarray(edges[:, 1], jnp.int32)
  wj = jnp.asarray(w, jnp.float32)
  dense = _dense_hessian(a, b, wj, n) + 0.01 * np.eye(n)
  rhs = np_rng.normal(size=n)
  matvec = lambda v: newton.laplacian_matvec(a, b, wj, v) + 0.01 * v
  sol, iters = jax.jit(lambda r, d: newton.pcg(matvec, r, d, tol=1e-6, max_iter=500))(
      jnp.asarray(rhs, jnp.float32), jnp.asarray(np.diag(dense), jnp.float32))
  np.testing.assert_allclose(np.asarray(sol), np.linalg.solve(dense, rhs), rtol=1e-3, atol=1e-3)
  assert 0 < int(iters) < 500


def test_marginal_chi2_is_unbiased(np_rng):
  """Mean over 4,000 multinomial draws equals the exact chi^2 of w against nu (M = n / 2: M is not >> n)."""
  n, m = 200, 100
  nu = np_rng.dirichlet(np.full(n, 5.0))
  w = np_rng.dirichlet(np.full(n, 5.0))
  exact = np.sum((w - nu) ** 2 / nu)
  counts = np_rng.multinomial(m, w, size=4000)
  est = np.asarray(jax.vmap(lambda c: solver_lib.marginal_chi2(c, jnp.asarray(nu, jnp.float32), m))(
      jnp.asarray(counts, jnp.int32)))
  assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(len(est)), (est.mean(), exact)
  # The plain plug-in estimate is biased upwards by about (n - 1) / M.
  plug_in = ((counts / m - nu) ** 2 / nu).sum(axis=1).mean()
  assert plug_in > exact + 0.5 * (n - 1) / m


def test_noise_floor_bound_matches_multinomial_simulation(np_rng):
  """sqrt of the mean plug-in chi^2 of multinomial histograms (a cell of weight 0 is left out), M = n / 2."""
  nu = np.concatenate([np_rng.dirichlet(np.full(199, 3.0)), [0.0]])
  m = 100
  p = np_rng.multinomial(m, nu, size=4000) / m
  active = nu > 0
  simulated = np.sqrt(((p[:, active] - nu[active]) ** 2 / nu[active]).sum(axis=1).mean())
  np.testing.assert_allclose(float(solver_lib.noise_floor_bound(jnp.asarray(nu, jnp.float32), m)), simulated,
                             rtol=0.02)


def test_gaussian_start_matches_affine_map():
  """Codes from N(m, S): the moment-matched start is already close (L1 < 0.45 of the Voronoi start's)."""
  rng = np.random.default_rng(3)
  cov_root = np.array([[2.0, 0.0, 0.0], [0.5, 0.3, 0.0], [0.1, 0.2, 0.8]])
  y = np.array([5.0, -2.0, 1.0]) + rng.normal(size=(500, 3)) @ cov_root.T
  problem = solver_lib.make_problem(y)
  errors = {}
  for init in ("gaussian", "voronoi"):
    h = newton.NewtonSolver(initialisation=init).init_heights(problem)
    errors[init] = float(solver_lib.BrenierPotential(y=problem.y, h=h).marginal_errors(
        jax.random.key(0), problem.source, problem.weights, 1 << 18)["l1"])
  assert errors["gaussian"] < 0.45 * errors["voronoi"], errors


# ------------------------------------------------------------------------------------------------------
# The solver against closed forms.
# ------------------------------------------------------------------------------------------------------

_SMALL = newton.NewtonSolver(num_iterations=24, min_samples=1 << 15, max_samples=1 << 18)


def test_one_dimensional_quantile_map(np_rng):
  """Uniform source on [0, 1]: cell boundaries within 0.005 of the cumulative weights (reached ~0.002; Adam's
  test allows 0.02)."""
  n = 8
  y = np.sort(np_rng.uniform(-1.0, 2.0, size=n))
  w = np_rng.dirichlet(np.full(n, 3.0))
  problem = solver_lib.make_problem(y[:, None], w, sources.UniformCube(dim=1, low=0.0, high=1.0))
  pot, state = _solve(_SMALL, jax.random.key(0), problem)
  assert not bool(state.diverged)
  h = np.asarray(pot.h, np.float64)
  np.testing.assert_allclose(-np.diff(h) / np.diff(y), np.cumsum(w)[:-1], atol=0.005)


def test_gaussian_to_affine_gaussian_map():
  """N(0, I) onto 400 samples of N(m, A A^T): E|T_hat - T| < 0.2 (Adam's test threshold at n = 400)."""
  a_mat = np.array([[1.0, 0.0], [0.6, 0.5]])
  mean = np.array([1.0, -2.0])
  rng = np.random.default_rng(0)
  y = mean + rng.normal(size=(400, 2)) @ a_mat.T
  problem = solver_lib.make_problem(y, source=sources.Gaussian(dim=2))
  pot, _ = _solve(_SMALL, jax.random.key(0), problem)
  x = rng.normal(size=(20_000, 2)).astype(np.float32)
  exact = mean + x @ scipy.linalg.sqrtm(a_mat @ a_mat.T).real.T
  err = float(np.linalg.norm(np.asarray(pot.transport(jnp.asarray(x))) - exact, axis=1).mean())
  assert err < 0.2, err


def _clustered_problem(n=400, d=8, clusters=5, seed=0, weights=True):
  rng = np.random.default_rng(seed)
  centres = 4.0 * rng.normal(size=(clusters, d))
  labels = rng.integers(0, clusters, size=n)
  y = centres[labels] + rng.normal(size=(n, d))
  w = rng.dirichlet(np.full(n, 3.0)) if weights else None
  return solver_lib.make_problem(y, w)


def test_clustered_problem_reaches_noise_floor():
  """Unequal clusters in d = 8, Dirichlet weights: the verified fresh error is near the final floor
  (L1 on 2^22 evaluation samples < 2 x the floor of the final stage; the unbiased bound is reported)."""
  problem = _clustered_problem()
  pot, state = _solve(_SMALL, jax.random.key(1), problem)
  assert not bool(state.diverged)
  final = _SMALL.effective_sample_size(problem.num_targets)
  floor = float(solver_lib.noise_floor_l1(problem.weights, final))
  true = float(pot.marginal_errors(jax.random.key(7), problem.source, problem.weights, 1 << 22)["l1"])
  assert true < 2.0 * floor, (true, floor)
  assert int(state.stage) == len(_SMALL.schedule(problem.num_targets))
  bound = float(state.error_bound)
  assert np.isfinite(bound) and bound >= 0.8 * true, (bound, true)
  # Accepted Newton steps were taken, and the histories are consistent.
  it = int(state.it)
  alphas = np.asarray(state.alphas[:it])
  assert np.nanmax(alphas) == 1.0
  assert np.all(np.diff(np.asarray(state.scored[:it])) > 0)


def test_averaging_schedule():
  """Sizes of the stages with averaging: the first stage, T averaging samples that total max_samples, the
  verification at max_samples; without a first stage below max_samples there is no averaging stage."""
  solver = newton.NewtonSolver()
  assert solver.averages(20_000) and solver.schedule(20_000) == (1 << 19, 1 << 17, 1 << 22)
  assert solver.averaging_steps(20_000) == 32 and solver.effective_sample_size(20_000) == 1 << 22
  assert solver.schedule(2_000) == (1 << 15, 1 << 17, 1 << 22) and solver.averaging_steps(2_000) == 32
  # Averaging steps may be smaller than the first stage, never smaller than one batch.
  few = dataclasses.replace(solver, max_samples=1 << 20)
  assert few.averaging_size(20_000) == few.stage_batch(20_000) == 1 << 16 and few.averaging_steps(20_000) == 16
  plain = dataclasses.replace(solver, averaging=False)
  assert plain.schedule(2_000) == (1 << 15, 1 << 17, 1 << 19, 1 << 21, 1 << 22, 1 << 22)
  assert plain.effective_sample_size(2_000) == 1 << 22 and plain.averaging_steps(2_000) == 0
  one = newton.NewtonSolver(min_samples=1 << 16, max_samples=1 << 16)
  assert not one.averages(100) and one.schedule(100) == (1 << 16, 1 << 16)
  # Only the first stage computes top-k with averaging: its buffers hold that stage's Hessian rows.
  assert solver.hessian_rows(20_000) == 1 << 19


def test_averaging_reaches_the_floor_of_all_its_samples():
  """16 averaging steps of 16,384 samples: the mean of the iterates has the error of one sample of 262,144
  (true L1 on 2^22 evaluation samples < 1.5 x that floor, < 0.4 x the floor of one averaging sample), no
  worse than the sample-average stages' result at the same max_samples; its verified bound covers it."""
  problem = _clustered_problem(n=200, d=4, clusters=4)
  solver = newton.NewtonSolver(num_iterations=40, min_samples=1 << 14, max_samples=1 << 18)
  assert solver.averaging_steps(200) == 16 and solver.averaging_size(200) == 1 << 14
  pot, state = _solve(solver, jax.random.key(2), problem)
  assert not bool(state.diverged) and int(state.num_averaged) == 16
  true = float(pot.marginal_errors(jax.random.key(7), problem.source, problem.weights, 1 << 22)["l1"])
  floor_all = float(solver_lib.noise_floor_l1(problem.weights, solver.effective_sample_size(200)))
  floor_one = float(solver_lib.noise_floor_l1(problem.weights, solver.averaging_size(200)))
  assert true < 1.5 * floor_all and true < 0.4 * floor_one, (true, floor_all, floor_one)
  plain_pot, _ = _solve(dataclasses.replace(solver, averaging=False), jax.random.key(2), problem)
  plain = float(plain_pot.marginal_errors(jax.random.key(7), problem.source, problem.weights, 1 << 22)["l1"])
  assert true < 1.2 * plain, (true, plain)
  assert float(state.error_bound) >= 0.8 * true, (float(state.error_bound), true)


def test_tol_stops_at_a_fresh_evaluation():
  problem = _clustered_problem(n=100, d=3, clusters=3, weights=False)
  solver = dataclasses.replace(_SMALL, tol=0.2)
  _, state = _solve(solver, jax.random.key(0), problem)
  assert bool(state.converged)
  assert float(state.error_bound) <= 0.2
  assert int(state.stage) < len(solver.schedule(problem.num_targets))


# ------------------------------------------------------------------------------------------------------
# Contract: chunked runs, vmap, bad input.
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("averaging", [True, False])
def test_chunked_run_equals_single_run(averaging):
  problem = _clustered_problem(n=60, d=3, clusters=3)
  solver = newton.NewtonSolver(num_iterations=12, min_samples=1 << 13, max_samples=1 << 15, averaging=averaging)
  run = jax.jit(solver.run, static_argnames="num_steps")
  key = jax.random.key(3)
  whole = run(key, problem, solver.init(problem))
  state = solver.init(problem)
  for _ in range(12):
    state = run(key, problem, state, num_steps=1)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("averaging", [True, False])
def test_vmap_over_seeds_equals_one_by_one(averaging):
  problem = _clustered_problem(n=50, d=2, clusters=3)
  solver = newton.NewtonSolver(num_iterations=10, min_samples=1 << 12, max_samples=1 << 14, averaging=averaging)
  keys = jax.random.split(jax.random.key(0), 3)
  _, batched = jax.jit(jax.vmap(solver.__call__, in_axes=(0, None)))(keys, problem)
  for i in range(3):
    _, one = _solve(solver, keys[i], problem)
    np.testing.assert_allclose(np.asarray(batched.h[i]), np.asarray(one.h), rtol=1e-5, atol=1e-5)
    assert int(batched.it[i]) == int(one.it)


def test_two_codes_duplicates_and_far_codes():
  """n = 2; duplicate codes (merged, the copy stays empty); codes far from the source (start mostly empty)."""
  solver = newton.NewtonSolver(num_iterations=16, min_samples=1 << 14, max_samples=1 << 16)
  two = solver_lib.make_problem(np.array([[0.0, 0.0], [1.0, 0.5]]), np.array([0.3, 0.7]))
  pot, state = _solve(solver, jax.random.key(0), two)
  masses = np.asarray(pot.cell_masses(jax.random.key(1), two.source, 1 << 18))
  np.testing.assert_allclose(masses, [0.3, 0.7], atol=0.01)

  rng = np.random.default_rng(0)
  y = rng.normal(size=(30, 2))
  dup = solver_lib.make_problem(np.concatenate([y, y[:5]]))
  pot, state = _solve(solver, jax.random.key(0), dup)
  masses = np.asarray(pot.cell_masses(jax.random.key(1), dup.source, 1 << 18))
  assert masses[30:].sum() == 0.0
  np.testing.assert_allclose(masses[:5], 2.0 / 35.0, atol=0.01)

  far = solver_lib.make_problem(100.0 + 0.01 * rng.normal(size=(40, 3)))
  pot, state = _solve(dataclasses.replace(solver, initialisation="zero", num_iterations=32), jax.random.key(0),
                      far)
  assert not bool(state.diverged)
  assert int(state.empty_cells[0]) > 0
  err = float(pot.marginal_errors(jax.random.key(2), far.source, far.weights, 1 << 18)["l1"])
  assert err < 0.1, err


def test_rejects_bad_hyperparameters():
  with pytest.raises(ValueError, match="initialisation"):
    newton.NewtonSolver(initialisation="nope")
  with pytest.raises(ValueError, match="top_k"):
    newton.NewtonSolver(top_k=1)
  with pytest.raises(ValueError, match="band_quantile"):
    newton.NewtonSolver(band_quantile=1.5)
  with pytest.raises(ValueError, match="min_samples"):
    newton.NewtonSolver(min_samples=1 << 20, max_samples=1 << 10)
  with pytest.raises(ValueError, match="scale_steps"):
    newton.NewtonSolver(scale_steps=-1)
  with pytest.raises(ValueError, match="codes_per_dim"):
    newton.NewtonSolver(codes_per_dim=-2)
  with pytest.raises(ValueError, match="max_averaging_steps"):
    newton.NewtonSolver(max_averaging_steps=0)
  with pytest.raises(ValueError, match="max_first_stage_steps"):
    newton.NewtonSolver(max_first_stage_steps=0)


# ------------------------------------------------------------------------------------------------------
# Progress callback.
# ------------------------------------------------------------------------------------------------------

_CALLBACK_KEYS = {"step", "num_samples", "l1", "energy", "stage", "alpha", "empty"}


def _expected_records(state, every):
  """The records a callback must receive, read off a state's histories: one per due step k (k % every == 0)."""
  return [dict(step=k, num_samples=int(state.sample_sizes[k - 1]), l1=float(state.errors[k - 1]),
               energy=float(state.energies[k - 1]), alpha=float(state.alphas[k - 1]),
               empty=int(state.empty_cells[k - 1]))
          for k in range(every, int(state.it) + 1, every)]


def _assert_records_match(records, expected):
  assert len(records) == len(expected), (len(records), len(expected))
  for got, want in zip(sorted(records, key=lambda r: (r["step"], r["l1"])),
                       sorted(expected, key=lambda r: (r["step"], r["l1"]))):
    assert set(got) == _CALLBACK_KEYS
    assert isinstance(got["step"], int) and isinstance(got["l1"], float)
    for k, v in want.items():
      np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_callback_reports_without_changing_results_and_resumes_in_chunks():
  """Every 3rd step the callback gets the step's history entries; heights and every state leaf are
  bit-identical with and without it, also when the run is split into one-step chunks."""
  problem = _clustered_problem(n=30, d=2, clusters=3)
  plain = newton.NewtonSolver(num_iterations=10, min_samples=1 << 11, max_samples=1 << 12)
  records = []
  solver = dataclasses.replace(plain, callback=records.append, callback_every=3)
  key = jax.random.key(4)
  ref = jax.jit(plain.run)(key, problem, plain.init(problem))
  got = jax.jit(solver.run)(key, problem, solver.init(problem))
  jax.effects_barrier()
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(ref.it) >= 6
  _assert_records_match(records, _expected_records(ref, 3))
  stages = [r["stage"] for r in records]
  assert stages == sorted(stages) and stages[-1] >= 1

  records.clear()
  run = jax.jit(solver.run, static_argnames="num_steps")
  state = solver.init(problem)
  for _ in range(int(ref.it)):
    state = run(key, problem, state, num_steps=1)
  jax.effects_barrier()
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _assert_records_match(records, _expected_records(ref, 3))


def test_callback_under_vmap_gets_one_record_per_element_and_due_step():
  """Under vmap the loop body also runs for finished elements: no record may come from those (nor from the
  steps that are not due), and each element's records hold its own history entries."""
  problem = _clustered_problem(n=30, d=2, clusters=3)
  records = []
  solver = newton.NewtonSolver(num_iterations=10, min_samples=1 << 11, max_samples=1 << 12,
                               callback=records.append, callback_every=2)
  keys = jax.random.split(jax.random.key(0), 3)
  _, state = jax.jit(jax.vmap(solver.__call__, in_axes=(0, None)))(keys, problem)
  jax.effects_barrier()
  its = np.asarray(state.it)
  assert len(set(its.tolist())) > 1, its  # elements stop at different steps
  expected = [r for i in range(3) for r in _expected_records(jax.tree.map(lambda a, i=i: a[i], state), 2)]
  _assert_records_match(records, expected)


def test_callback_rejects_bad_arguments():
  with pytest.raises(ValueError, match="callback_every"):
    newton.NewtonSolver(callback=print, callback_every=0)
  with pytest.raises(ValueError, match="callback must be a callable"):
    newton.NewtonSolver(callback="tqdm")
