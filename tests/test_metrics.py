"""Tests for lsot_jax.metrics against hand computations and references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
from scipy.spatial import distance as scipy_distance

from lsot_jax import metrics


def _ring_means(num=8, radius=1.0):
  angles = 2 * np.pi * np.arange(num) / num
  return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


# ----------------------------------------------------------------------------
# mode coverage


def test_mode_coverage_hand_computed_case():
  means = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  std = 0.1
  samples = np.array([
      [0.0, 0.1],    # mode 0, dist 0.1 <= 0.3: good
      [0.2, 0.2],    # mode 0, dist 0.283: good
      [10.0, 0.29],  # mode 1, good
      [5.0, 5.0],    # far from everything: bad
      [0.0, 10.4],   # mode 2, dist 0.4 > 0.3: bad
  ])
  res = metrics.mode_coverage(samples, means, std)
  assert res["modes"] == 2
  assert res["high_quality"] == pytest.approx(3 / 5)
  np.testing.assert_array_equal(res["counts"], [2, 1, 0])
  # p = (2/3, 1/3, 0); KL(p || uniform) = sum p log(3 p), empty mode -> 0.
  expected = 2 / 3 * np.log(2.0) + 1 / 3 * np.log(1.0)
  assert res["reverse_kl"] == pytest.approx(expected, rel=1e-9)


def test_mode_coverage_balanced_collapsed_and_empty():
  means = _ring_means()
  balanced = np.repeat(means, 3, axis=0)
  res = metrics.mode_coverage(balanced, means, 0.01)
  assert res["modes"] == 8 and res["high_quality"] == 1.0
  assert res["reverse_kl"] == pytest.approx(0.0, abs=1e-12)
  collapsed = np.repeat(means[:1], 5, axis=0)
  res = metrics.mode_coverage(collapsed, means, 0.01)
  assert res["modes"] == 1
  assert res["reverse_kl"] == pytest.approx(np.log(8.0))
  res = metrics.mode_coverage(np.zeros((4, 2)), means, 0.01)
  assert res["modes"] == 0 and res["high_quality"] == 0.0
  assert res["reverse_kl"] == pytest.approx(np.log(8.0))


def test_mode_coverage_true_distribution(np_rng):
  means = _ring_means()
  std = 0.01
  comp = np_rng.integers(0, 8, size=2500)
  samples = means[comp] + std * np_rng.normal(size=(2500, 2))
  res = metrics.mode_coverage(samples, means, std)
  assert res["modes"] == 8
  # P(chi_2 <= 3) = 1 - exp(-4.5) = 0.9889.
  assert res["high_quality"] == pytest.approx(1 - np.exp(-4.5), abs=0.01)
  assert res["reverse_kl"] < 0.01


def test_mode_coverage_bad_input():
  with pytest.raises(ValueError, match="Feature dimensions"):
    metrics.mode_coverage(np.zeros((3, 2)), np.zeros((2, 3)), 0.1)
  with pytest.raises(ValueError, match="std"):
    metrics.mode_coverage(np.zeros((3, 2)), np.zeros((2, 2)), 0.0)


# ----------------------------------------------------------------------------
# Frechet distance


def test_frechet_closed_form_large_samples(np_rng):
  dim = 3
  mean_a, mean_b = np.zeros(dim), np.array([1.0, -0.5, 2.0])
  rot = np.linalg.qr(np_rng.normal(size=(dim, dim)))[0]
  cov_a = np.diag([1.0, 2.0, 0.5])
  cov_b = rot @ np.diag([0.3, 1.5, 3.0]) @ rot.T
  a = np_rng.multivariate_normal(mean_a, cov_a, size=200_000)
  b = np_rng.multivariate_normal(mean_b, cov_b, size=200_000)
  # Closed form with scipy's general (non-symmetric) matrix square root.
  cross = scipy.linalg.sqrtm(cov_a @ cov_b).real
  expected = (np.sum((mean_a - mean_b)**2) + np.trace(cov_a + cov_b)
              - 2 * np.trace(cross))
  assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_frechet_matches_scipy_on_samples(np_rng):
  a = np_rng.normal(size=(300, 5)) @ np_rng.normal(size=(5, 5))
  b = np_rng.normal(size=(200, 5)) * 2.0 + 1.0
  ma, mb = a.mean(0), b.mean(0)
  sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  expected = (np.sum((ma - mb)**2) + np.trace(sa) + np.trace(sb)
              - 2 * np.trace(scipy.linalg.sqrtm(sa @ sb).real))
  assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
  assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_bad_input():
  with pytest.raises(ValueError, match="Feature dimensions"):
    metrics.frechet_distance(np.zeros((5, 2)), np.zeros((5, 3)))
  with pytest.raises(ValueError, match="at least 2"):
    metrics.frechet_distance(np.zeros((1, 2)), np.zeros((5, 2)))


# ----------------------------------------------------------------------------
# precision / recall / density / coverage


def _prdc_reference(real, fake, k):
  """Brute force, following the reference `prdc` package line by line."""
  d_rr = scipy_distance.cdist(real, real)
  d_ff = scipy_distance.cdist(fake, fake)
  d_rf = scipy_distance.cdist(real, fake)
  r_real = np.sort(d_rr, axis=1)[:, k]
  r_fake = np.sort(d_ff, axis=1)[:, k]
  return dict(
      precision=(d_rf < r_real[:, None]).any(axis=0).mean(),
      recall=(d_rf < r_fake[None, :]).any(axis=1).mean(),
      density=(1 / k) * (d_rf < r_real[:, None]).sum(axis=0).mean(),
      coverage=(d_rf.min(axis=1) < r_real).mean(),
  )


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_prdc_matches_bruteforce(np_rng, chunk_size):
  real = np_rng.normal(size=(120, 4))
  fake = np_rng.normal(size=(90, 4)) * 1.3 + 0.4
  got = metrics.precision_recall_density_coverage(real, fake, k=5,
                                                  chunk_size=chunk_size)
  ref = _prdc_reference(real, fake, 5)
  for name in ref:
    assert float(got[name]) == pytest.approx(ref[name], abs=1e-6), name


@pytest.mark.parametrize("chunk_size", [100, 1024])
def test_prdc_with_duplicates_on_the_grouped_path_matches_bruteforce(np_rng, chunk_size):
  """Sets large enough for the grouped k-th-smallest selection, with repeated points (an ``exact`` sampler
  draws the same code several times): radii count duplicates as a sort does; cached radii give the same."""
  real = np_rng.normal(size=(700, 6))
  fake = np_rng.normal(size=(500, 6)) * 1.2 + 0.3
  fake[::3] = fake[1::3][:fake[::3].shape[0]]  # many exact duplicates
  real[:40] = real[40:80]
  ref = _prdc_reference(real, fake, 5)
  radii = metrics.knn_sq_radii(real, 5)
  np.testing.assert_allclose(np.sqrt(radii), np.sort(scipy_distance.cdist(real, real), axis=1)[:, 5],
                             rtol=1e-4, atol=1e-4)
  for kwargs in ({}, {"real_radii": radii}):
    got = metrics.precision_recall_density_coverage(real, fake, k=5, chunk_size=chunk_size, **kwargs)
    for name in ref:
      assert float(got[name]) == pytest.approx(ref[name], abs=1e-6), (name, kwargs)


def test_prdc_identical_sets_and_far_sets(np_rng):
  real = np_rng.normal(size=(200, 3))
  got = metrics.precision_recall_density_coverage(real, real, k=5)
  for name in ("precision", "recall", "density", "coverage"):
    assert float(got[name]) == pytest.approx(1.0), name
  far = metrics.precision_recall_density_coverage(real, real + 100.0, k=5)
  for name in ("precision", "recall", "density", "coverage"):
    assert float(far[name]) == 0.0, name


def test_prdc_jit_and_bad_input(np_rng):
  real = np_rng.normal(size=(50, 2))
  fake = np_rng.normal(size=(40, 2))
  fn = jax.jit(metrics.precision_recall_density_coverage,
               static_argnames=("k", "chunk_size"))
  got = fn(real, fake, k=3, chunk_size=16)
  ref = _prdc_reference(real, fake, 3)
  assert float(got["density"]) == pytest.approx(ref["density"], abs=1e-6)
  with pytest.raises(ValueError, match="at least 6"):
    metrics.precision_recall_density_coverage(real, fake[:5], k=5)
  with pytest.raises(ValueError, match="Feature dimensions"):
    metrics.precision_recall_density_coverage(real, np.zeros((40, 3)))


# ----------------------------------------------------------------------------
# Sinkhorn divergence and sliced Wasserstein


def test_sinkhorn_divergence_shift_closed_form_and_symmetry(np_rng):
  a = np_rng.normal(size=(150, 2)).astype(np.float32)
  b = (np_rng.normal(size=(120, 2)) + 0.5).astype(np.float32)
  fn = jax.jit(metrics.sinkhorn_divergence)
  assert abs(float(fn(a, a))) < 1e-3
  # For b = a + s the debiased divergence is exactly |s|^2 (the cross terms
  # of |x - y - s|^2 cancel between the marginals).
  values = []
  for shift in (0.5, 1.0, 2.0):
    s = np.array([shift, -shift], np.float32)
    value = float(fn(a, a + s[None, :]))
    assert value == pytest.approx(2 * shift**2, rel=0.02)
    values.append(value)
  assert values == sorted(values)
  ab, ba = float(fn(a, b)), float(fn(b, a))
  assert ab > 0.1
  assert ab == pytest.approx(ba, rel=1e-3)


def test_sinkhorn_default_epsilon():
  a = jnp.array([[0.0, 0.0], [2.0, 0.0]])
  b = jnp.array([[0.0, 0.0], [0.0, 4.0], [0.0, 8.0]]) + 10.0
  # tr Cov(a) = 1 (population variance), tr Cov(b) = 32 / 3.
  expected = 0.05 * (1.0 + 32.0 / 3.0)
  assert float(metrics.default_sinkhorn_epsilon(a, b)) == pytest.approx(
      expected, rel=1e-6)


def _w2_1d_lp(x, y):
  """Exact 1-D squared W2 between uniform empirical measures (an LP)."""
  n, m = len(x), len(y)
  cost = (x[:, None] - y[None, :])**2
  rows = np.kron(np.eye(n), np.ones((1, m)))
  cols = np.kron(np.ones((1, n)), np.eye(m))
  res = scipy.optimize.linprog(
      cost.ravel(), A_eq=np.concatenate([rows, cols]),
      b_eq=np.concatenate([np.full(n, 1 / n), np.full(m, 1 / m)]),
      bounds=(0, None), method="highs")
  return res.fun


def test_sliced_wasserstein_1d_matches_linear_program(np_rng, rng):
  x = np_rng.normal(size=(7, 1))
  y = np_rng.normal(size=(11, 1)) * 2.0 + 0.3
  expected = np.sqrt(_w2_1d_lp(x[:, 0], y[:, 0]))
  got = metrics.sliced_wasserstein(x, y, rng, num_projections=4)
  assert float(got) == pytest.approx(expected, rel=1e-4)


def test_sliced_wasserstein_shift_and_same_set(np_rng, rng):
  a = np_rng.normal(size=(400, 4)).astype(np.float32)
  assert float(metrics.sliced_wasserstein(a, a, rng, 64)) == pytest.approx(
      0.0, abs=1e-6)
  s = np.array([1.0, 2.0, 0.0, -2.0], np.float32)
  # Each slice is the exact shift <theta, s>; E <theta, s>^2 = |s|^2 / F.
  got = float(metrics.sliced_wasserstein(a, a + s[None, :], rng, 4000))
  assert got == pytest.approx(np.sqrt(np.sum(s**2) / 4), rel=0.05)


# ----------------------------------------------------------------------------
# memorisation


def test_memorisation_copies_and_fresh_draws(np_rng):
  train = np_rng.normal(size=(500, 3))
  heldout = np_rng.normal(size=(400, 3))
  fn = jax.jit(metrics.memorisation_rate, static_argnames=("chunk_size",))
  copies = train[np_rng.integers(0, 500, size=1500)]
  res = fn(copies, train, heldout, chunk_size=256)
  assert float(res["rate"]) == 1.0
  fresh = np_rng.normal(size=(1500, 3))
  res_fresh = fn(fresh, train, heldout, chunk_size=256)
  assert 0.4 < float(res_fresh["rate"]) < 0.6
  # Independent nearest neighbours and threshold.
  d = scipy_distance.cdist(fresh, train)
  np.testing.assert_array_equal(np.asarray(res_fresh["nearest_index"]),
                                d.argmin(axis=1))
  np.testing.assert_allclose(res_fresh["nearest_distance"], d.min(axis=1),
                             atol=1e-4)
  threshold = np.median(scipy_distance.cdist(heldout, train).min(axis=1))
  assert float(res_fresh["threshold"]) == pytest.approx(threshold, rel=1e-4)
  assert float(res_fresh["rate"]) == pytest.approx(
      np.mean(d.min(axis=1) < threshold), abs=2e-3)
  far = fn(fresh * 5.0, train, heldout, chunk_size=256)
  assert float(far["rate"]) < 0.3
  cached = metrics.memorisation_rate(fresh, train, heldout, heldout_distance=res_fresh["heldout_distance"])
  assert float(cached["rate"]) == float(res_fresh["rate"])
  with pytest.raises(ValueError, match="heldout_distance must have shape"):
    metrics.memorisation_rate(fresh, train, heldout, heldout_distance=np.zeros(3))
