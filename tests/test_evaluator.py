"""lsot_jax.evaluator: the metric set (against the metric functions called one by one), features, averages,
and reading a split loaded or streamed (the same features and classifier)."""
import jax
import mock_tfds
import numpy as np
import pytest

from lsot_jax import config as config_lib
from lsot_jax import data
from lsot_jax import evaluator
from lsot_jax import metrics
from lsot_jax import streaming


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


def test_a_streamed_split_gives_the_loaded_splits_features_and_classifier(tmp_path):
  # Mock Fashion-MNIST read by load_dataset and as tfds.data_source sources: the classifier (trained on a
  # stream, tested over one; its labels read by a pass over the source) has the same accuracy and features,
  # and the features (in the array's batches: equal; in batches of 128, the last one padded: to float
  # rounding), examples and labels of a split are the loaded split's.
  config = config_lib.default_config()
  config.data.name, config.eval.classifier_epochs, config.eval.classifier_batch_size = "fashion_mnist", 1, 64
  with mock_tfds.mock_data(num_examples=300):
    loaded = {s: data.load_dataset("fashion_mnist", s) for s in ("train", "test")}
    sources = {s: streaming.image_source("fashion_mnist", s) for s in ("train", "test")}
    memory, accuracy = evaluator.classifier_features(config, loaded["train"], loaded["test"], tmp_path / "m")
    streamed, streamed_accuracy = evaluator.classifier_features(config, sources["train"], sources["test"],
                                                                tmp_path / "s")
    assert streamed_accuracy == accuracy
    pixels = evaluator.pixel_features(4)
    for features_of_memory, features_of_stream in ((memory, streamed), (pixels, pixels)):
      for split, num in (("test", 120), ("train", None)):
        want = evaluator.split_features(features_of_memory, loaded[split], num)
        assert want.shape[0] == (num or 300)
        np.testing.assert_array_equal(evaluator.split_features(features_of_stream, sources[split], num), want)
        np.testing.assert_allclose(evaluator.split_features(features_of_stream, sources[split], num, 128), want,
                                   rtol=1e-5, atol=1e-6)
    index = np.array([299, 0, 17])
    np.testing.assert_array_equal(evaluator.split_examples(sources["train"], index), loaded["train"].x[index])
    np.testing.assert_array_equal(evaluator.split_labels(sources["train"]), loaded["train"].labels)
