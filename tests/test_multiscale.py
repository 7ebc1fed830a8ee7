"""Tests of the coarse-to-fine start (lsot_jax.multiscale) against independent references.

References: the cluster partition of well-separated blobs (known labels), the closed-form Gaussian start
(one cluster is the moment-matched affine map), NumPy sums of outer products and energies, closed-form
minimisers of convex functions.
"""
import jax
import jax.numpy as jnp
import numpy as np

from lsot_jax import multiscale
from lsot_jax import newton
from lsot_jax import solver as solver_lib


def _blobs(n_per, centres, spread, seed=0):
  rng = np.random.default_rng(seed)
  centres = np.asarray(centres, np.float64)
  labels = np.repeat(np.arange(len(centres)), n_per)
  return centres[labels] + spread * rng.normal(size=(len(labels), centres.shape[1])), labels


def test_level_sizes():
  assert multiscale.level_sizes(5000, 8, 64) == (625, 79, 10)
  assert multiscale.level_sizes(64, 8, 64) == ()
  assert multiscale.level_sizes(65, 8, 64) == (9,)
  # The solver's levels: clusters of at least codes_per_dim x d codes (4 x 64 = 256 at d = 64, 8 in 2-D).
  solver = newton.NewtonSolver()
  assert solver.level_sizes(5000, 2) == (625, 79, 10)
  assert solver.level_sizes(5000, 64) == (20,)
  assert solver.level_sizes(20000, 64) == (79, 1)
  assert newton.NewtonSolver(codes_per_dim=0).level_sizes(5000, 64) == (625, 79, 10)


def test_kmeans_recovers_separated_blobs():
  centres = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]
  y, truth = _blobs(50, centres, 0.3)
  w = np.full(len(y), 1.0 / len(y))
  found, labels = jax.jit(multiscale.kmeans, static_argnums=3)(
      jax.random.key(3), jnp.asarray(y, jnp.float32), jnp.asarray(w, jnp.float32), 4)
  labels = np.asarray(labels)
  # Same partition up to a relabelling: each true blob maps to one found cluster, bijectively.
  pairs = {(t, f) for t, f in zip(truth, labels)}
  assert len(pairs) == 4 and len({f for _, f in pairs}) == 4, pairs
  for t, f in pairs:
    np.testing.assert_allclose(np.asarray(found)[f], y[truth == t].mean(0), atol=1e-4)


def test_segment_outer_matches_numpy(np_rng):
  v = np_rng.normal(size=(300, 3)).astype(np.float32)
  seg = np_rng.integers(0, 5, size=300).astype(np.int32)
  w = np_rng.uniform(size=300).astype(np.float32)
  got = multiscale.segment_outer(jnp.asarray(v), jnp.asarray(seg), jnp.asarray(w), 5, chunk=64)
  want = np.stack([(w[seg == s, None] * v[seg == s]).T @ v[seg == s] for s in range(5)])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_one_cluster_refinement_is_the_gaussian_start():
  """With one cluster the refinement is the moment-matched affine map of the whole source: it equals
  :func:`newton.gaussian_heights` up to the probe sample's noise in the fitted source moments."""
  rng = np.random.default_rng(1)
  cov_root = np.array([[1.5, 0.0, 0.0], [0.4, 0.5, 0.0], [0.2, -0.3, 0.7]])
  y = np.array([2.0, -1.0, 0.5]) + rng.normal(size=(300, 3)) @ cov_root.T
  problem = solver_lib.make_problem(y)
  labels = jnp.zeros((300,), jnp.int32)
  coarse = multiscale.coarse_problem(problem, labels, 1)
  np.testing.assert_allclose(np.asarray(coarse.y[0]), y.mean(0), rtol=1e-4, atol=1e-4)
  h, scale = multiscale.refine_heights(jax.random.key(0), problem, labels, coarse, jnp.zeros((1,)), 1 << 18)
  assert float(scale) == 1.0
  ref = solver_lib.centre(newton.gaussian_heights(problem.y, problem.weights, jnp.zeros(3), 1.0),
                          problem.weights)
  assert float(jnp.max(jnp.abs(h - ref))) < 0.02 * float(jnp.max(jnp.abs(ref))), (h[:5], ref[:5])


def _l1(problem, h):
  return float(solver_lib.BrenierPotential(y=problem.y, h=h).marginal_errors(
      jax.random.key(5), problem.source, problem.weights, 1 << 18)["l1"])


def test_multiscale_start_beats_gaussian_start_on_tight_clusters():
  """25 tight clusters on a grid (the failure of the single Gaussian start: most cells of each cluster
  empty, the cluster masses far off): the coarse-to-fine start more than halves the L1 error."""
  g = np.linspace(-2.0, 2.0, 5)
  centres = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
  y, _ = _blobs(16, centres, 0.05)
  problem = solver_lib.make_problem(y)
  small = dict(min_samples=1 << 13, max_samples=1 << 15, num_iterations=16, coarsest=32)
  errors = {init: _l1(problem, jax.jit(newton.NewtonSolver(initialisation=init, **small).init_heights)(problem))
            for init in ("gaussian", "multiscale")}
  assert errors["multiscale"] < 0.5 * errors["gaussian"], errors


def test_line_minimise_finds_convex_minimisers():
  for f, want in ((lambda c: (c - 0.37) ** 2, 0.37), (lambda c: jnp.abs(c - 1.2) + 0.1 * c, 1.2),
                  (lambda c: -c, 1.5), (lambda c: c, 0.0)):
    got = float(jax.jit(lambda: multiscale.line_minimise(f, 0.0, 1.5, 12))())
    assert abs(got - want) < 0.01, (got, want)


def test_sampled_energy_matches_numpy(np_rng):
  x = np_rng.normal(size=(512, 3)).astype(np.float32)
  y = np_rng.normal(size=(7, 3)).astype(np.float32)
  h = np_rng.normal(size=7).astype(np.float32)
  w = np.full(7, 1.0 / 6, np.float32)
  w[2] = 0.0  # a masked cell never wins
  got = multiscale.sampled_energy(jnp.asarray(x), jnp.asarray(y), jnp.asarray(h), jnp.asarray(w), 128)
  scores = x @ y.T + h
  scores[:, 2] = -np.inf
  want = scores.max(axis=1).mean() - np.sum(w * h)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


def _empty_and_l1(problem, h, num=1 << 17):
  x = problem.source.sample(jax.random.key(11), num)
  idx = np.asarray(jnp.argmax(x @ problem.y.T + h[None, :], axis=1))
  counts = np.bincount(idx, minlength=problem.num_targets)
  return int(np.sum(counts == 0)), float(np.sum(np.abs(counts / num - np.asarray(problem.weights))))


def test_scaled_refinement_cuts_the_error_with_few_codes_per_dimension():
  """4 blobs of 128 codes in d = 48 (2.7 codes per dimension), refined from the solved 4-cluster problem:
  the moment-matched map (scale 1) is far from the discrete optimum (L1 0.73 when written); the
  energy-minimising scale (0.40) leaves no cell empty and cuts the L1 error by more than half, and its
  energy on an independent sample is lower."""
  d, per = 48, 128
  rng = np.random.default_rng(4)
  centres = 4.0 * rng.normal(size=(4, d))
  y, labels = _blobs(per, centres, 1.0, seed=5)
  problem = solver_lib.make_problem(y)
  labels = jnp.asarray(labels, jnp.int32)
  coarse = multiscale.coarse_problem(problem, labels, 4)
  _, state = jax.jit(newton.NewtonSolver(initialisation="gaussian", max_samples=1 << 16))(jax.random.key(1), coarse)
  refine = jax.jit(multiscale.refine_heights, static_argnames=("num_probe", "scale_samples"))
  plain, one = refine(jax.random.key(2), problem, labels, coarse, state.h, num_probe=1 << 14)
  scaled, scale = refine(jax.random.key(2), problem, labels, coarse, state.h, num_probe=1 << 14,
                         scale_samples=1 << 14)
  assert float(one) == 1.0 and 0.1 < float(scale) < 0.9, float(scale)
  (_, l1_plain), (empty_scaled, l1_scaled) = _empty_and_l1(problem, plain), _empty_and_l1(problem, scaled)
  assert empty_scaled == 0 and l1_scaled < 0.5 * l1_plain, (empty_scaled, l1_plain, l1_scaled)
  x = problem.source.sample(jax.random.key(12), 1 << 15)
  energy = lambda h: float(multiscale.sampled_energy(x, problem.y, h, problem.weights, 1 << 13))  # pylint: disable=unnecessary-lambda-assignment
  assert energy(scaled) < energy(plain)
