"""Tests for lsot_jax.sources: shapes, moments against closed forms, supports."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsot_jax import sources

NUM = 200_000


def _moment_tolerances(num, var):
  """Five standard errors of the sample mean and (roughly, for light tails) of the sample variance."""
  return 5.0 * np.sqrt(var / num), 5.0 * var * np.sqrt(2.0 / num) * 1.5


def test_gaussian_shape_dtype_and_moments(rng):
  src = sources.Gaussian(dim=3)
  x = np.asarray(src.sample(rng, NUM), np.float64)
  assert x.shape == (NUM, 3) and src.sample(rng, 4).dtype == jnp.float32
  mean_tol, var_tol = _moment_tolerances(NUM, 1.0)
  np.testing.assert_allclose(x.mean(0), np.zeros(3), atol=mean_tol)
  np.testing.assert_allclose(np.cov(x.T), np.eye(3), atol=var_tol)
  assert src.sample(rng, 5, dtype=jnp.float16).dtype == jnp.float16


@pytest.mark.parametrize("low,high", [(-1.0, 1.0), (0.0, 1.0), (2.0, 5.0)])
def test_uniform_cube_bounds_and_moments(rng, low, high):
  src = sources.UniformCube(dim=2, low=low, high=high)
  x = np.asarray(src.sample(rng, NUM), np.float64)
  assert x.shape == (NUM, 2)
  assert x.min() >= low and x.max() <= high
  var = (high - low) ** 2 / 12.0
  mean_tol, var_tol = _moment_tolerances(NUM, var)
  np.testing.assert_allclose(x.mean(0), np.full(2, (low + high) / 2), atol=mean_tol)
  np.testing.assert_allclose(np.cov(x.T), var * np.eye(2), atol=var_tol)
  # Both halves of each axis are used (not a degenerate sub-interval).
  mid = (low + high) / 2
  assert abs((x[:, 0] < mid).mean() - 0.5) < 0.01


def test_uniform_cube_default_is_symmetric_unit_cube():
  src = sources.UniformCube(dim=4)
  assert (src.low, src.high) == (-1.0, 1.0)


@pytest.mark.parametrize("low,high", [(1.0, 1.0), (2.0, -1.0)])
def test_uniform_cube_rejects_empty_interval(low, high):
  with pytest.raises(ValueError, match="high > low"):
    sources.UniformCube(dim=2, low=low, high=high)


def test_discrete_source_full_support_in_order(rng, np_rng):
  pts = np_rng.normal(size=(9, 3)).astype(np.float32)
  src = sources.DiscreteSource(points=jnp.asarray(pts))
  assert src.dim == 3 and src.num_points == 9
  np.testing.assert_array_equal(np.asarray(src.sample(rng, 9)), pts)
  # Another key gives the same full support (the gradient is exact, not Monte-Carlo).
  np.testing.assert_array_equal(np.asarray(src.sample(jax.random.key(5), 9)), pts)


def test_discrete_source_resamples_uniformly_with_replacement(rng, np_rng):
  pts = np.arange(12, dtype=np.float32).reshape(4, 3)
  src = sources.DiscreteSource(points=jnp.asarray(pts))
  x = np.asarray(src.sample(rng, 40_000))
  assert x.shape == (40_000, 3)
  rows = (x[:, 0] / 3).astype(int)
  np.testing.assert_array_equal(x, pts[rows])  # every sample is one of the points
  freq = np.bincount(rows, minlength=4) / 40_000
  np.testing.assert_allclose(freq, np.full(4, 0.25), atol=5 * np.sqrt(0.25 * 0.75 / 40_000))


def test_sources_are_pytrees_under_jit_and_vmap(rng, np_rng):
  pts = jnp.asarray(np_rng.normal(size=(6, 2)).astype(np.float32))
  disc = sources.DiscreteSource(points=pts)
  sample = jax.jit(lambda s, k: s.sample(k, 6))
  np.testing.assert_array_equal(np.asarray(sample(disc, rng)), np.asarray(pts))
  # Leaves: the points; static: Gaussian/UniformCube fields.
  assert len(jax.tree.leaves(disc)) == 1 and jax.tree.leaves(sources.Gaussian(dim=3)) == []
  keys = jax.random.split(rng, 4)
  batch = jax.vmap(lambda k: sources.Gaussian(dim=2).sample(k, 5))(keys)
  assert batch.shape == (4, 5, 2)
  assert not np.allclose(np.asarray(batch[0]), np.asarray(batch[1]))


def test_make_source():
  assert sources.make_source("gaussian", 5) == sources.Gaussian(dim=5)
  assert sources.make_source("uniform", 2) == sources.UniformCube(dim=2)
  with pytest.raises(ValueError, match="Unknown source"):
    sources.make_source("laplace", 2)
