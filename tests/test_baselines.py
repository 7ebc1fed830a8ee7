"""Tests for lsot_jax.baselines against known distributions and closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from lsot_jax import baselines
from lsot_jax import metrics


def _ring(np_rng, num, std=0.01):
  angles = 2 * np.pi * np.arange(8) / 8
  means = np.stack([np.cos(angles), np.sin(angles)], axis=1)
  points = means[np_rng.integers(0, 8, num)] + std * np_rng.normal(
      size=(num, 2))
  return points, means


def test_gaussian_fit_recovers_known_gaussian(np_rng, rng):
  mean = np.array([1.0, -2.0, 0.5])
  a = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.3, 0.2, 0.4]])
  cov = a @ a.T
  codes = np_rng.multivariate_normal(mean, cov, size=50_000)
  params = baselines.fit_gaussian(codes)
  np.testing.assert_allclose(params["mean"], mean, atol=0.02)
  np.testing.assert_allclose(params["cov"], cov, atol=0.03)
  samples = np.asarray(jax.jit(baselines.sample_gaussian, static_argnums=2)(
      params, rng, 50_000))
  assert samples.shape == (50_000, 3)
  np.testing.assert_allclose(samples.mean(0), mean, atol=0.03)
  np.testing.assert_allclose(np.cov(samples, rowvar=False), cov, atol=0.04)


def test_gmm_samples_all_three_clusters(np_rng, rng):
  centres = np.array([[-10.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  codes = (centres[np.repeat(np.arange(3), 400)]
           + 0.5 * np_rng.normal(size=(1200, 2)))
  params = baselines.fit_gmm(codes, 10, seed=0)
  assert params["means"].shape == (10, 2)
  assert params["chols"].shape == (10, 2, 2)
  assert float(jnp.sum(params["weights"])) == pytest.approx(1.0, abs=1e-5)
  samples = np.asarray(baselines.sample_gmm(params, rng, 6000))
  dist = np.linalg.norm(samples[:, None, :] - centres[None], axis=-1)
  assert np.all(dist.min(axis=1) < 4.0), "a sample fell between clusters"
  share = np.bincount(dist.argmin(axis=1), minlength=3) / 6000
  np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.04)
  # Sampler moments against the mixture's closed-form mean and covariance.
  w = np.asarray(params["weights"], np.float64)
  mu = np.asarray(params["means"], np.float64)
  chol = np.asarray(params["chols"], np.float64)
  sig = chol @ np.transpose(chol, (0, 2, 1))
  m = w @ mu
  c = np.einsum("k,kij->ij", w, sig + mu[:, :, None] * mu[:, None, :])
  c -= np.outer(m, m)
  np.testing.assert_allclose(samples.mean(0), m, atol=0.35)
  np.testing.assert_allclose(np.cov(samples, rowvar=False), c, rtol=0.06,
                             atol=0.5)


def test_sinkhorn_map_moves_gaussian_onto_shift(np_rng, rng):
  shift = np.array([3.0, -2.0])
  codes = np_rng.normal(size=(800, 2)) + shift
  params = baselines.fit_sinkhorn_map(rng, codes)
  assert bool(params["converged"])
  # Default epsilon: 0.05 * std of |x - y|^2 for x, y ~ N(0, I_2) is 0.2.
  assert float(params["epsilon"]) == pytest.approx(0.2, rel=0.15)
  key = jax.random.key(7)
  out = np.asarray(baselines.sample_sinkhorn_map(params, key, 600))
  z = np.asarray(jax.random.normal(key, (600, 2)))
  # Closed-form OT map between the Gaussians: x -> x + shift. The entropic
  # map contracts slightly (slope ~ 1 - eps / 4) and is noisy (800 codes).
  err = np.linalg.norm(out - (z + shift[None, :]), axis=1)
  assert np.median(err) < 0.2
  np.testing.assert_allclose(out.mean(0), z.mean(0) + shift, atol=0.1)
  slope = np.polyfit(z[:, 0], out[:, 0], 1)[0]
  assert 0.85 < slope < 1.02


def test_sinkhorn_map_is_softmax_barycentre(np_rng, rng):
  codes = _ring(np_rng, 300)[0]
  params = baselines.fit_sinkhorn_map(rng, codes, num_source=250,
                                      epsilon=0.1)
  key = jax.random.key(3)
  out = np.asarray(baselines.sample_sinkhorn_map(params, key, 50))
  z = np.asarray(jax.random.normal(key, (50, 2)), np.float64)
  # Entropic map written out in NumPy from the dual vector g (uniform b).
  y = np.asarray(params["codes"], np.float64)
  g = np.asarray(params["g"], np.float64)
  eps = float(params["epsilon"])
  logits = (g[None, :] - np.sum((z[:, None, :] - y[None]) ** 2, -1)) / eps
  weights = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
  np.testing.assert_allclose(out, weights @ y, atol=1e-4)
  # A continuous map puts mass between the ring's modes.
  radius = np.linalg.norm(out, axis=1)
  assert radius.min() < 0.9


def test_gradient_penalty_linear_critic(rng):
  w = jnp.array([[3.0], [4.0]])
  critic = lambda x: x @ w  # noqa: E731
  real = jax.random.normal(rng, (16, 2))
  fake = real + 1.0
  penalty = baselines._gradient_penalty(  # pylint: disable=protected-access
      critic, real, fake, rng)
  # |grad| = |w| = 5 everywhere: penalty (5 - 1)^2 = 16.
  assert float(penalty) == pytest.approx(16.0, rel=1e-5)


def test_mlp_shapes_and_values(rng):
  layers = baselines.mlp_init(rng, (3, 5, 2))
  x = jax.random.normal(rng, (4, 3))
  out = baselines.mlp_apply(layers, x)
  ref = (np.maximum(np.asarray(x) @ np.asarray(layers[0]["w"]), 0)
         @ np.asarray(layers[1]["w"]))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError):
    baselines.mlp_init(rng, (3,))


def test_wgan_gp_smoke(np_rng, rng):
  codes, _ = _ring(np_rng, 200)
  params, hist = baselines.train_wgan_gp(
      rng, codes, 20, batch_size=32, hidden_sizes=(16, 16), noise_dim=3,
      return_history=True)
  assert [l["w"].shape for l in params["layers"]] == [(3, 16), (16, 16),
                                                      (16, 2)]
  assert hist["critic_loss"].shape == (20,)
  assert np.all(np.isfinite(hist["critic_loss"]))
  assert np.all(np.isfinite(hist["generator_loss"]))
  samples = baselines.sample_wgan_gp(params, rng, 100)
  assert samples.shape == (100, 2)
  assert np.all(np.isfinite(np.asarray(samples)))


def test_resample_draws_codes_with_their_weights(np_rng, rng):
  codes = np_rng.normal(size=(6, 3))
  weights = np.array([0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
  params = baselines.fit_resample(codes, weights)
  num = 40_000
  samples = np.asarray(jax.jit(baselines.sample_resample, static_argnums=2)(params, rng, num))
  assert samples.shape == (num, 3)
  # Every sample is one of the codes (float32-exact), and the zero-weight codes are never drawn.
  match = np.all(samples[:, None, :] == np.asarray(params["codes"])[None], axis=-1)
  assert np.all(match.sum(axis=1) == 1)
  counts = match.sum(axis=0)
  assert counts[4] == counts[5] == 0
  # The counts of the drawn codes against the multinomial of their weights (scipy's chi^2 test).
  assert stats.chisquare(counts[:4], num * weights[:4]).pvalue > 1e-3
  uniform = baselines.fit_resample(codes)
  np.testing.assert_allclose(np.exp(np.asarray(uniform["log_weights"])), np.full(6, 1 / 6), rtol=1e-6)


def test_bad_inputs(rng):
  with pytest.raises(ValueError, match="shape"):
    baselines.fit_gaussian(np.zeros(5))
  with pytest.raises(ValueError, match="at least 10"):
    baselines.fit_gmm(np.zeros((5, 2)), 10)
  with pytest.raises(ValueError, match="NaN"):
    baselines.fit_gaussian(np.full((5, 2), np.nan))
  with pytest.raises(ValueError, match="epsilon"):
    baselines.fit_sinkhorn_map(rng, np.ones((5, 2)), epsilon=0.0)
  with pytest.raises(ValueError, match="num_steps"):
    baselines.train_wgan_gp(rng, np.ones((5, 2)), 0)
  with pytest.raises(ValueError, match="weights must be 5"):
    baselines.fit_resample(np.ones((5, 2)), np.ones(4))
  with pytest.raises(ValueError, match="positive sum"):
    baselines.fit_resample(np.ones((5, 2)), np.zeros(5))


@pytest.mark.slow
def test_wgan_gp_covers_ring_modes(np_rng, rng):
  codes, means = _ring(np_rng, 5000)
  params = baselines.train_wgan_gp(rng, codes, 10_000)
  samples = np.asarray(baselines.sample_wgan_gp(params, jax.random.key(1),
                                                2500))
  res = metrics.mode_coverage(samples, means, 0.01)
  assert res["modes"] >= 4, res
