"""Tests of the coarse-to-fine start (lsot_jax.multiscale) against independent references.

References: the cluster partition of well-separated blobs (known labels), the closed-form Gaussian start
(one cluster is the moment-matched affine map), NumPy sums of outer products.
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
  h = multiscale.refine_heights(jax.random.key(0), problem, labels, coarse, jnp.zeros((1,)), 1 << 18)
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
