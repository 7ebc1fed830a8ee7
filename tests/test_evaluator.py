"""lsot_jax.evaluator: the metric set (against the metric functions called one by one), features, averages."""
import jax
import numpy as np
import pytest

from lsot_jax import evaluator
from lsot_jax import metrics


def _ring(np_rng, num, means):
  return (means[np_rng.integers(0, 8, num)] + 0.01 * np_rng.normal(size=(num, 2))).astype(np.float32)


def test_metric_evaluator_equals_each_metric_alone(np_rng, rng):
  angles = 2 * np.pi * np.arange(8) / 8
  means = np.stack([np.cos(angles), np.sin(angles)], axis=1)
  real, fake, train = _ring(np_rng, 300, means), _ring(np_rng, 200, means), _ring(np_rng, 300, means)
  names = ["mode_coverage", "frechet", "prdc", "sinkhorn", "sliced_wasserstein", "memorisation"]
  evaluate = evaluator.metric_evaluator(names, real, train, means=means, std=0.01, k=5, sinkhorn_points=150,
                                        memorisation_points=100)
  out = evaluate(fake, rng)
  assert all(isinstance(v, float) for v in out.values())
  assert out["modes"] == 8.0
  assert out["frechet"] == pytest.approx(metrics.frechet_distance(fake, real), rel=1e-6)
  prdc = metrics.precision_recall_density_coverage(real, fake, 5)
  for name in ("precision", "recall", "density", "coverage"):
    assert out[name] == pytest.approx(float(prdc[name]), rel=1e-6), name
  eps = metrics.default_sinkhorn_epsilon(real, real)
  assert out["sinkhorn"] == pytest.approx(float(metrics.sinkhorn_divergence(fake[:150], real[:150], eps)),
                                          rel=1e-5)
  assert out["sliced_wasserstein"] == pytest.approx(float(metrics.sliced_wasserstein(fake, real, rng, 128)),
                                                    rel=1e-5)
  memo = metrics.memorisation_rate(fake[:100], train, real[:100])
  assert out["memorisation_rate"] == pytest.approx(float(memo["rate"]), abs=1e-7)
  # Another sample gives other values: the evaluator does not cache its first answer.
  assert evaluate(fake * 1.5, rng)["frechet"] > 5 * out["frechet"]


def test_metric_evaluator_refuses_unknown_names_and_missing_inputs(np_rng):
  real = np_rng.normal(size=(20, 2)).astype(np.float32)
  with pytest.raises(ValueError, match="Unknown metric"):
    evaluator.metric_evaluator(["fid"], real)
  with pytest.raises(ValueError, match="'memorisation' needs train_feats"):
    evaluator.metric_evaluator(["memorisation"], real)
  with pytest.raises(ValueError, match="'mode_coverage' needs means"):
    evaluator.metric_evaluator(["mode_coverage"], real)
  with pytest.raises(ValueError, match="Feature dimensions"):
    evaluator.metric_evaluator(["sliced_wasserstein"], real)(np.zeros((5, 3), np.float32), jax.random.key(0))


def test_pixel_features_average_pool():
  x = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
  pooled = evaluator.pixel_features(2)(x)
  assert pooled.shape == (2, 4)
  np.testing.assert_allclose(pooled[0], [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9 + 12 + 13) / 4,
                                         (10 + 11 + 14 + 15) / 4])
  np.testing.assert_array_equal(evaluator.pixel_features(1)(x), x.reshape(2, 16))


def test_seed_average_mean_and_standard_error():
  row = evaluator.seed_average([{"a": 1.0}, {"a": 2.0}, {"a": 6.0}])
  assert row["a"] == pytest.approx(3.0) and row["num_seeds"] == 3
  assert row["a_se"] == pytest.approx(np.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) / np.sqrt(3))
  assert evaluator.seed_average([{"a": 1.0}]) == {"a": 1.0, "num_seeds": 1}
