"""The evaluator: feature spaces and the metric set, in one place for the eval stage, scans and benchmarks.

* :func:`classifier_features` trains (or restores) the evaluation classifier and returns its penultimate
  features; :func:`pixel_features` average-pools pixels; :func:`point_features` is the identity (toys).
* :func:`metric_evaluator` returns ``evaluate(fake_features, key) -> {name: float}`` for a set of metric
  names of :data:`lsot_jax.metrics.METRIC_NAMES`, each JAX metric jitted once for every call.
* :func:`seed_average` turns per-seed results into one row (mean and standard error).
* :func:`split_features`, :func:`split_examples` and :func:`split_labels` read a split loaded into memory
  or, with ``data.stream``, opened as a source (batch by batch, or only the examples asked for), with the
  same results.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lsot_jax import config as config_lib
from lsot_jax import data as data_lib
from lsot_jax import feeds
from lsot_jax import metrics as metrics_lib
from lsot_jax import models
from lsot_jax import streaming
from lsot_jax import tracking
from lsot_jax import train
from lsot_jax import workdir as workdir_lib

__all__ = ["Features", "Split", "classifier_features", "feature_fn", "metric_evaluator", "pixel_features",
           "point_features", "seed_average", "split_examples", "split_features", "split_labels"]

Features = Callable[[np.ndarray], np.ndarray]
# A split loaded into memory, or opened as a source for streams (``data.stream``).
Split = Union[data_lib.Dataset, streaming.ImageSource]


def point_features(x: np.ndarray) -> np.ndarray:
  """The points themselves, float32 [M, D]."""
  return np.asarray(x, np.float32)


def pixel_features(pool: int) -> Features:
  """``features(x [M, H, W, C]) -> [M, (H/pool) (W/pool) C]``: average-pooled, flattened pixels."""
  def features(x):
    x = np.asarray(x, np.float32)
    if pool > 1:
      n, hh, ww, c = x.shape
      hh, ww = hh // pool * pool, ww // pool * pool
      x = x[:, :hh, :ww].reshape(n, hh // pool, pool, ww // pool, pool, c).mean(axis=(2, 4))
    return x.reshape(x.shape[0], -1)
  return features


def split_labels(split: Split) -> Optional[np.ndarray]:
  """The int labels [N] of a loaded split, or of a source (read once, :func:`lsot_jax.streaming.
  source_labels`); None without labels."""
  return streaming.source_labels(split) if isinstance(split, streaming.ImageSource) else split.labels


def classifier_features(config: ml_collections.ConfigDict, train_set: Split, test_set: Split,
                        folder: pathlib.Path, tracker: Optional[tracking.Tracker] = None
                        ) -> Tuple[Features, float]:
  """The evaluation classifier's penultimate features, trained in ``folder`` (or restored from it); its
  training losses go to ``tracker`` (None: nowhere).

  ``eval.classifier_dir``, when set, replaces ``folder`` (a cache shared between runs); its ``spec.json``
  records what it was trained for, and a classifier of another setting is refused.

  Args:
    config: the run's config.
    train_set / test_set: the splits, loaded (:class:`lsot_jax.data.Dataset`) or as sources
      (:class:`lsot_jax.streaming.ImageSource`, ``data.stream``): a source's labels are read once, then the
      classifier trains on :func:`lsot_jax.feeds.training_stream` and is tested over a stream of the test
      split, with the in-memory classifier's batches (the same parameters and accuracy).
    folder: the classifier's folder.
    tracker: where its losses go.

  Returns:
    ``(features(x [M, ...]) -> [M, F], test accuracy)``.

  Raises:
    PipelineError: the dataset has no labels.
    ConfigMismatchError: the shared classifier was trained for another setting.
  """
  ev = config.eval
  labels = split_labels(train_set)
  if labels is None:
    raise config_lib.PipelineError(f"Dataset {config.data.name!r} has no labels, so no classifier can be "
                                   "trained for the metrics; use --config.eval.feature_space=pixels.")
  num_classes = max(int(labels.max()) + 1, 2)
  cdir = pathlib.Path(os.path.abspath(ev.classifier_dir)) if ev.classifier_dir else folder
  spec = {"dataset": config.data.name, "image_size": config.data.image_size,
          "input_shape": list(train_set.example_shape), "num_classes": num_classes,
          "num_train": train_set.num_examples, "epochs": int(ev.classifier_epochs), "seed": int(config.seed)}
  stored = workdir_lib.read_json(cdir / "spec.json")
  if stored is not None:
    diff = config_lib.config_diff(stored, spec)
    if diff:
      shown = "; ".join(f"{k}: checkpoint has {a!r}, this run needs {b!r}" for k, a, b in diff)
      raise config_lib.ConfigMismatchError(
          f"The classifier checkpoint in {cdir} was trained for another setting ({shown}). Point "
          "--config.eval.classifier_dir elsewhere.", [k for k, _, _ in diff])
  else:
    workdir_lib.write_json(cdir / "spec.json", spec)
  model_cfg = models.ClassifierConfig(kind="cnn", input_shape=train_set.example_shape, num_classes=num_classes)
  train_cfg = config_lib.classifier_train_config(config)
  if isinstance(train_set, streaming.ImageSource):
    data: Tuple[Any, ...] = (feeds.training_stream(train_set, train_cfg), None,
                             streaming.image_stream(test_set, 1024, shuffle=False), None)
  else:
    data = (train_set.x, labels, test_set.x, split_labels(test_set))
  with streaming.closing_streams(*data):
    graphdef, params, accuracy = train.train_classifier(
        *data, model_cfg, str(cdir / "ckpt"), train_cfg, log_path=str(cdir / "metrics.jsonl"), tracker=tracker)
  fn = jax.jit(lambda p, x: models.classifier_features(graphdef, p, x))
  return (lambda x: train.batched_apply(lambda xb: fn(params, xb), np.asarray(x, np.float32),
                                        batch_size=1024)), accuracy


def feature_fn(config: ml_collections.ConfigDict, train_set: Split, test_set: Split,
               folder: pathlib.Path, tracker: Optional[tracking.Tracker] = None
               ) -> Tuple[Features, Dict[str, Any]]:
  """The feature space of ``eval.feature_space``: ``(features, extra facts for metrics.json)``; a classifier
  trained for it (on the splits, loaded or sources: :func:`classifier_features`) writes its losses to
  ``tracker`` (None: nowhere)."""
  space = config.eval.feature_space
  if space == "points":
    return point_features, {}
  if space == "classifier":
    features, accuracy = classifier_features(config, train_set, test_set, folder, tracker=tracker)
    return features, {"classifier_test_accuracy": accuracy}
  return pixel_features(int(config.eval.pixel_pool)), {}


def split_features(features: Features, split: Split, num_examples: Optional[int] = None,
                   batch_size: int = 1024) -> np.ndarray:
  """The features of a split's first ``num_examples`` examples (None: all).

  Args:
    features: ``features(x [M, ...]) -> [M, F]``.
    split: a loaded split (``features`` of its array's rows), or a source (:class:`lsot_jax.streaming.
      ImageSource`): read batch by batch (:func:`lsot_jax.streaming.stream_codes`, the last batch padded),
      so only the features and a few batches are in memory; the same features as of the array.
    num_examples: how many of the first examples (clipped to N; None or 0: all).
    batch_size: the stream's batch size (the classifier features' chunk, so their batches are the array's).

  Returns:
    float32 array [min(num_examples, N), F].
  """
  num = int(num_examples or split.num_examples)
  if not isinstance(split, streaming.ImageSource):
    return np.asarray(features(split.x[:num]), np.float32)
  stream = streaming.image_stream(streaming.head(split, num), batch_size, shuffle=False)
  return streaming.stream_codes(features, stream)


def split_examples(split: Split, index: np.ndarray) -> np.ndarray:
  """The examples at ``index`` [K] of a loaded split, or decoded from a source (only those are read):
  float32 [K, *example_shape]."""
  if isinstance(split, streaming.ImageSource):
    return streaming.gather(split, index)
  return split.x[np.asarray(index)]


def metric_evaluator(names: Sequence[str], real: np.ndarray, train_feats: Optional[np.ndarray] = None, *,
                     means: Optional[np.ndarray] = None, std: Optional[float] = None, k: int = 5,
                     sinkhorn_points: int = 2000, memorisation_points: int = 2000,
                     num_projections: int = 128) -> Callable[[np.ndarray, jax.Array], Dict[str, float]]:
  """``evaluate(fake [M, F], key) -> {name: float}`` for a metric set, each JAX metric jitted once.

  Names and what they give: ``mode_coverage`` (needs ``means``, ``std``) -> ``modes``, ``high_quality``,
  ``reverse_kl``; ``frechet``; ``prdc`` -> ``precision``, ``recall``, ``density``, ``coverage`` (``k``
  neighbours); ``sinkhorn`` on the first ``sinkhorn_points`` of each set, with one epsilon for every call,
  10 % of the held-out set's total variance (:func:`lsot_jax.metrics.default_sinkhorn_epsilon` of the
  reference set with itself), so that methods are comparable; ``sliced_wasserstein`` (``num_projections``
  directions, the key); ``memorisation`` (needs ``train_feats``) -> ``memorisation_rate`` of the first
  ``memorisation_points`` samples, thresholded by as many held-out points.

  Args:
    names: metric names, a subset of :data:`lsot_jax.metrics.METRIC_NAMES`.
    real: float array [N, F], held-out features.
    train_feats: float array [T, F], training features (``memorisation``).
    means: float array [K, F], the mixture's means (``mode_coverage``).
    std: the mixture's standard deviation (``mode_coverage``).
    k: neighbours of ``prdc``.
    sinkhorn_points: points of each set the Sinkhorn divergence uses.
    memorisation_points: samples (and held-out points) the memorisation rate uses.
    num_projections: directions of the sliced Wasserstein distance.

  Raises:
    ValueError: an unknown name, or a metric whose inputs are missing.
  """
  names = list(names)
  unknown = [n for n in names if n not in metrics_lib.METRIC_NAMES]
  if unknown:
    raise ValueError(f"Unknown metric name(s) {unknown}; valid names are {list(metrics_lib.METRIC_NAMES)}.")
  if "mode_coverage" in names and (means is None or std is None):
    raise ValueError("Metric 'mode_coverage' needs means and std.")
  if "memorisation" in names and train_feats is None:
    raise ValueError("Metric 'memorisation' needs train_feats.")
  real = jnp.asarray(real, jnp.float32)
  eps = metrics_lib.default_sinkhorn_epsilon(real, real)
  num_sk, num_mem = int(sinkhorn_points), int(memorisation_points)
  # The real side of prdc and memorisation is the same for every call: computed once.
  radii = metrics_lib.knn_sq_radii(real, k) if "prdc" in names else None
  prdc = jax.jit(lambda a, b, r: metrics_lib.precision_recall_density_coverage(a, b, k, real_radii=r))
  sinkhorn = jax.jit(lambda a, b: metrics_lib.sinkhorn_divergence(a, b, eps))
  sliced = jax.jit(lambda a, b, key: metrics_lib.sliced_wasserstein(a, b, key, num_projections))
  memo_fn = jax.jit(lambda a, t, b, hd: metrics_lib.memorisation_rate(a, t, b, heldout_distance=hd))
  heldout_distance = None
  if "memorisation" in names:
    train_feats = jnp.asarray(train_feats, jnp.float32)
    heldout_distance = jax.jit(lambda a, t: metrics_lib.memorisation_rate(a, t, a)["heldout_distance"])(
        real[:num_mem], train_feats)

  def evaluate(fake: np.ndarray, key: jax.Array) -> Dict[str, float]:
    fake = np.asarray(fake, np.float32)
    out: Dict[str, float] = {}
    for name in names:
      if name == "mode_coverage":
        res = metrics_lib.mode_coverage(fake, means, std)
        out.update(modes=float(res["modes"]), high_quality=float(res["high_quality"]),
                   reverse_kl=float(res["reverse_kl"]))
      elif name == "frechet":
        out["frechet"] = float(metrics_lib.frechet_distance(fake, real))
      elif name == "prdc":
        out.update({n: float(v) for n, v in prdc(real, jnp.asarray(fake), radii).items()})
      elif name == "sinkhorn":
        out["sinkhorn"] = float(sinkhorn(jnp.asarray(fake[:num_sk]), real[:num_sk]))
      elif name == "sliced_wasserstein":
        out["sliced_wasserstein"] = float(sliced(jnp.asarray(fake), real, key))
      else:
        out["memorisation_rate"] = float(memo_fn(jnp.asarray(fake[:num_mem]), train_feats, real[:num_mem],
                                                 heldout_distance)["rate"])
    return out

  return evaluate


def seed_average(per_seed: List[Dict[str, float]]) -> Dict[str, float]:
  """One row of per-seed results: each value's mean, its standard error (``<name>_se``, with two seeds or
  more) and ``num_seeds``."""
  row: Dict[str, float] = {}
  for key in per_seed[0]:
    v = np.asarray([p[key] for p in per_seed], np.float64)
    row[key] = float(v.mean())
    if len(per_seed) > 1:
      row[f"{key}_se"] = float(v.std(ddof=1) / np.sqrt(v.size))
  row["num_seeds"] = len(per_seed)
  return row
