"""The stages of a run, as functions of typed artifacts, and the driver that runs one stage.

=========  =========================================  ==============================================
stage      function                                   artifact (and what it leaves in the workdir)
=========  =========================================  ==============================================
ae         :func:`train_ae` (context)                 :class:`~lsot_jax.artifacts.Autoencoder`
encode     :func:`encode` (context, autoencoder)      :class:`~lsot_jax.artifacts.Codes`
ot         :func:`lsot_jax.stage_ot.fit_ot` (codes)   :class:`~lsot_jax.artifacts.OTFit`
sample     :func:`sample` (context, fit)              ``{method: Samples}`` (grids in ``samples/``)
eval       :func:`evaluate` (context, ae, samples)    ``metrics.json``
=========  =========================================  ==============================================

:func:`draw_figures` adds the report's "At a glance" figures once the eval stage is done:
``samples/methods_panel.png`` for the 2-D toys, ``samples/interpolation.png`` for images.

:class:`Results` hands each stage its inputs: the artifact a stage of this process just returned, or the one
restored from the workdir (restoring never trains). :func:`run_stage` skips a finished stage (its key matched
when the workdir was prepared, :meth:`lsot_jax.workdir.Workdir.prepare`) or runs it and writes its marker.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import matplotlib
import ml_collections
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from lsot_jax import artifacts
from lsot_jax import config as config_lib
from lsot_jax import data as data_lib
from lsot_jax import evaluator
from lsot_jax import feeds
from lsot_jax import figures
from lsot_jax import metrics as metrics_lib
from lsot_jax import models
from lsot_jax import report as report_lib
from lsot_jax import samplers
from lsot_jax import stage_ot
from lsot_jax import streaming
from lsot_jax import tracking
from lsot_jax import train
from lsot_jax import workdir as workdir_lib

__all__ = ["Context", "Results", "STAGE_FNS", "draw_figures", "encode", "evaluate", "open_run",
           "ot_code_index", "run_stage", "sample", "train_ae", "vae_template"]


@dataclasses.dataclass
class Context:
  """What every stage sees: the config, the workdir, the log and the data (loaded once).

  Attributes:
    config: the run's config.
    wd: the workdir.
    log: progress callback taking one line.
  """

  config: ml_collections.ConfigDict
  wd: workdir_lib.Workdir
  log: Callable[[str], None]
  _data: Dict[str, data_lib.Dataset] = dataclasses.field(default_factory=dict)
  _sources: Dict[str, streaming.ImageSource] = dataclasses.field(default_factory=dict)
  _tracker: Optional[tracking.Tracker] = None

  @property
  def tracker(self) -> tracking.Tracker:
    """The run's tracker, made on first use: TensorBoard event files in ``<workdir>/tensorboard/`` with
    ``log.tensorboard`` on process 0 (:func:`lsot_jax.workdir.is_writer`), else a
    :class:`lsot_jax.tracking.NullTracker`."""
    if self._tracker is None:
      on = bool(self.config.log.tensorboard) and workdir_lib.is_writer()
      self._tracker = tracking.make_tracker(str(self.wd.root / "tensorboard") if on else None)
    return self._tracker

  def close(self) -> None:
    """Flushes and closes the tracker (if one was made); a later use makes a new one."""
    if self._tracker is not None:
      self._tracker.close()
      self._tracker = None

  @property
  def is_points(self) -> bool:
    return self.config.data.name in data_lib.TOY_NAMES

  def dataset(self, split: str) -> data_lib.Dataset:
    """The ``"train"`` or ``"test"`` split (``data.num_train`` / ``data.num_test`` examples)."""
    if split not in self._data:
      d = self.config.data
      num = d.num_train if split == "train" else d.num_test
      self._data[split] = data_lib.load_dataset(
          d.name, split, data_dir=d.data_dir, num_examples=num or None, seed=int(self.config.seed),
          image_size=d.image_size)
    return self._data[split]

  def source(self, split: str) -> streaming.ImageSource:
    """The ``"train"`` or ``"test"`` split as a random-access source for streams (``data.stream``): the same
    examples as :meth:`dataset`, decoded batch by batch (served from memory once the split is loaded)."""
    if split not in self._sources:
      d = self.config.data
      if split in self._data:
        ds = self._data[split]
        self._sources[split] = streaming.array_source(ds.x, ds.labels, name=d.name)
      else:
        num = d.num_train if split == "train" else d.num_test
        self._sources[split] = streaming.image_source(
            d.name, split, data_dir=d.data_dir, num_examples=num or None, seed=int(self.config.seed),
            image_size=d.image_size)
    return self._sources[split]

  def split(self, split: str) -> evaluator.Split:
    """The ``"train"`` or ``"test"`` split as the stages read it: its :meth:`source` with ``data.stream``
    (nothing loaded), else the loaded :meth:`dataset`."""
    return self.source(split) if self.config.data.stream else self.dataset(split)

  @property
  def example_shape(self) -> tuple[int, ...]:
    """The shape of one training example, e.g. (H, W, C) or (D,), read without loading a streamed split."""
    return tuple(self.split("train").example_shape)


def open_run(config: ml_collections.ConfigDict, workdir: Any, overwrite: bool, log: Callable[[str], None],
             load_data: bool = True) -> Context:
  """Checks the config, loads the data, then prepares (or checks) the workdir: the start of every entry.

  Missing data fails before the workdir is touched. With ``data.stream`` the splits are only opened as
  sources (their first example decoded), not loaded.
  """
  config_lib.validate_config(config)
  config_lib.check_devices(config)
  ctx = Context(config, workdir_lib.Workdir(workdir), log)
  if load_data:
    for split in ("train", "test"):
      if config.data.stream:
        ctx.source(split)
      else:
        ctx.dataset(split)
  ctx.wd.prepare(config, overwrite, log)
  return ctx


class Results:
  """The artifacts of a run: set by the stage that computed them, or restored from the workdir once."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    self._cache: Dict[str, Any] = {}

  def put(self, name: str, value: Any) -> None:
    self._cache[name] = value

  def _get(self, name: str, restore: Callable[[], Any]) -> Any:
    if name not in self._cache:
      self._cache[name] = restore()
    return self._cache[name]

  def autoencoder(self) -> artifacts.Autoencoder:
    return self._get("ae", lambda: self.ctx.wd.load_autoencoder(self.ctx.config))

  def codes(self) -> artifacts.Codes:
    return self._get("encode", self.ctx.wd.load_codes)

  def fit(self) -> artifacts.OTFit:
    return self._get("ot", lambda: stage_ot.load_fit(self.ctx.config, self.ctx.wd, self.codes()))

  def samples(self, method: str) -> artifacts.Samples:
    return self.ctx.wd.load_samples(method, vae_template(self.ctx) if method == "vae" else None)


# ---------------------------------------------------------------------------------------------------------
# Stages.


def _reconstruction(ctx: Context, ae: artifacts.Autoencoder, shown: Optional[int]
                    ) -> tuple[float, np.ndarray, np.ndarray]:
  """``(test MSE, the first ``shown`` test examples (None: all), their reconstructions)``: over the loaded
  test split, or with ``data.stream`` batch by batch over its stream (the MSE then summed in float64)."""
  if not ctx.config.data.stream:
    test = ctx.dataset("test")
    recon = ae.decode(ae.encode(test.x))
    return float(np.mean(np.square(recon - test.x))), test.x[:shown], recon[:shown]
  total, count, firsts, recons = 0.0, 0, [], []
  for batch in streaming.image_stream(ctx.source("test"), 1024, shuffle=False):
    x = batch["image"]
    recon = ae.decode(ae.encode(x))
    total += float(np.sum(np.square(recon - x), dtype=np.float64))
    count += x.size
    if shown is None or sum(len(f) for f in firsts) < shown:
      firsts.append(x[:shown])
      recons.append(recon[:shown])
  return total / count, np.concatenate(firsts)[:shown], np.concatenate(recons)[:shown]


def train_ae(ctx: Context) -> tuple[artifacts.Autoencoder, Dict[str, Any]]:
  """Trains (or resumes) the autoencoder; writes ``ae/ckpt``, ``ae/metrics.jsonl`` and ``ae/recon.png``.

  With ``data.stream`` the training split is read by a stream (:func:`lsot_jax.feeds.training_stream`:
  the same batches as in memory, its position checkpointed) and the test split is streamed for the
  reconstruction error.
  """
  cfg, wd = ctx.config, ctx.wd
  if cfg.ae.kind == "identity":
    ctx.log("ae: ae.kind='identity', the codes are the data points; nothing to train.")
    return artifacts.Autoencoder(), {"kind": "identity"}
  train_cfg = config_lib.ae_train_config(cfg)
  shape = ctx.example_shape
  if cfg.data.stream:
    data: Any = feeds.training_stream(ctx.source("train"), train_cfg)
    ctx.log(f"ae: streaming {data.num_examples} training examples in batches of {data.batch_size}")
  else:
    data = ctx.dataset("train").x
  mesh = config_lib.mesh_for(cfg, "ae.num_devices")
  if mesh is not None:
    ctx.log(f"ae: training data-parallel on {mesh.size} devices")
  with streaming.closing_streams(data):
    graphdef, params, history = train.train_autoencoder(
        data, config_lib.ae_model_config(cfg, shape), wd.ckpt_dir("ae", "ckpt"), train_cfg,
        code_penalty=float(cfg.ae.code_penalty), log_path=str(wd.path("ae", "metrics.jsonl")), mesh=mesh,
        tracker=ctx.tracker)
  ae = artifacts.Autoencoder(graphdef, params)
  test_mse, originals, recon = _reconstruction(ctx, ae, None if ctx.is_points else 32)
  if workdir_lib.is_writer():
    if not ctx.is_points:
      pairs = np.stack([originals, recon], axis=1).reshape((2 * len(originals),) + originals.shape[1:])
      report_lib.save_image_grid(wd.path("ae", "recon.png"), pairs, ncols=16)
    else:
      report_lib.save_scatter(wd.path("ae", "recon.png"), recon, title="autoencoder reconstructions",
                              reference=originals)
  ctx.log(f"ae: test reconstruction MSE {test_mse:.5f}")
  return ae, {"kind": cfg.ae.kind, "latent_dim": cfg.ae.latent_dim, "test_mse": test_mse,
              "final_train_loss": history[-1]["loss"] if history else None, "epochs": len(history)}


def ot_code_index(config: ml_collections.ConfigDict, n: int) -> np.ndarray:
  """Sorted indices [num] of the ``ot.num_codes`` training codes (of n) the potential is fitted to."""
  num = int(config.ot.num_codes) or n
  if num > n:
    raise config_lib.PipelineError(f"--config.ot.num_codes={num} exceeds the {n} training codes.")
  if num == n:
    return np.arange(n)
  return np.sort(np.random.default_rng([int(config.seed), config_lib.SALT_OT]).choice(n, num, replace=False))


def encode(ctx: Context, ae: artifacts.Autoencoder) -> tuple[artifacts.Codes, Dict[str, Any]]:
  """Encodes the training set; writes ``encode/ckpt`` (the codes and the OT subset's index).

  With ``data.stream`` the split is read batch by batch (:meth:`lsot_jax.artifacts.Autoencoder.encode_stream`;
  the same codes), never whole as float32 images.
  """
  if ctx.config.data.stream:
    codes = ae.encode_stream(streaming.image_stream(ctx.source("train"), 1024, shuffle=False))
  else:
    codes = ae.encode(ctx.dataset("train").x)
  bad = ~np.isfinite(codes).all(axis=1)
  if bad.any():
    raise config_lib.PipelineError(
        f"Stage 'encode': {int(bad.sum())} of {codes.shape[0]} codes are NaN/Inf; the autoencoder is broken. "
        "Retrain it (--overwrite) with a lower --config.ae.learning_rate.")
  out = artifacts.Codes(codes, ot_code_index(ctx.config, codes.shape[0]).astype(np.int32))
  meta = ctx.wd.save_codes(out)
  ctx.log(f"encode: {codes.shape[0]} codes of dimension {codes.shape[1]}; OT fits {meta['num_codes']} of them "
          f"(RMS norm {float(np.sqrt(np.mean(np.sum(codes**2, axis=1)))):.3f}).")
  return out, meta


def _save_grid(ctx: Context, method: str, x: np.ndarray) -> None:
  if not workdir_lib.is_writer():
    return
  path = ctx.wd.grid_path(method)
  if ctx.is_points:
    means, _ = data_lib.toy_modes(ctx.config.data.name)
    test = ctx.split("test")
    reference = evaluator.split_examples(test, np.arange(min(x.shape[0], test.num_examples)))
    report_lib.save_scatter(path, x, means=means, title=config_lib.METHOD_LABELS[method], reference=reference)
  else:
    report_lib.save_image_grid(path, x)


def sample(ctx: Context, fit: artifacts.OTFit, ae: artifacts.Autoencoder) -> Dict[str, Any]:
  """Draws ``sample.num_seeds`` x ``sample.num_samples`` codes per method (resumes per method); writes
  ``sample/<method>/`` and the grids ``samples/<method>.png``.

  The VAE baseline trains on the training split, with ``data.stream`` on a stream of it (the in-memory
  batches, its position checkpointed in ``sample/vae_train``).

  Returns:
    ``{method: info}``.
  """
  cfg, wd = ctx.config, ctx.wd
  info_all = {}
  train_data = ctx.source("train") if cfg.data.stream else ctx.dataset("train").x
  for method in cfg.sample.methods:
    if wd.samples_done(method):
      info_all[method] = wd.samples_meta(method)["info"]
      ctx.log(f"sample: {method} already drawn, reusing {wd.root / 'sample' / method}")
      continue
    start = time.perf_counter()
    inputs = samplers.SamplerInputs(
        cfg, fit, config_lib.config_key(cfg, config_lib.SALT_FIT, config_lib.METHODS.index(method)),
        train_data, wd.ckpt_dir("sample", "vae_train"), str(wd.path("sample", "vae_metrics.jsonl")),
        ctx.tracker)
    sampler = samplers.SAMPLERS[method](inputs)
    draws = np.stack([np.asarray(sampler.draw(config_lib.sample_key(cfg, method, s)), np.float32)
                      for s in range(int(cfg.sample.num_seeds))])
    if not np.isfinite(draws).all():
      raise config_lib.PipelineError(f"Stage 'sample': method {method!r} produced NaN/Inf codes.")
    info = dict(sampler.info, seconds=time.perf_counter() - start)
    decoder = sampler.decoder or ae
    _save_grid(ctx, method, decoder.decode(draws[0, :int(cfg.sample.grid_size)]))
    wd.save_samples(artifacts.Samples(method, draws, info, sampler.decoder))
    info_all[method] = info
    ctx.log(f"sample: {method} done in {info['seconds']:.1f}s {info}")
  return info_all


def vae_template(ctx: Context) -> tuple[Any, Any]:
  """``(graphdef, params)`` of a freshly initialised VAE of the run's architecture (a restore template)."""
  cfg = ctx.config
  kind = cfg.ae.kind if cfg.ae.kind != "identity" else "mlp"
  return models.init_vae(jax.random.key(0), config_lib.ae_model_config(cfg, ctx.example_shape, kind))


def evaluate(ctx: Context, ae: artifacts.Autoencoder,
             samples_of: Callable[[str], artifacts.Samples]) -> Dict[str, Any]:
  """Decodes each method's draws and computes the metric set per seed (resumes per method); writes
  ``eval/methods/<method>.json`` and, for images with ``memorisation``, ``eval/<method>_nn.png``.

  With ``data.stream`` the splits are read as sources (:meth:`Context.split`): features batch by batch
  (:func:`lsot_jax.evaluator.split_features`), the classifier trained on a stream, the nearest training
  examples decoded by index; the same metrics as in memory.

  Returns:
    ``{"methods": {method: row}, ...extra}`` (``classifier_test_accuracy`` for classifier features).
  """
  cfg, wd = ctx.config, ctx.wd
  names = tuple(cfg.eval.metrics)
  train_split, test = ctx.split("train"), ctx.split("test")
  features, extra = evaluator.feature_fn(cfg, train_split, test, wd.root / "eval" / "classifier",
                                         tracker=ctx.tracker)
  if "classifier_test_accuracy" in extra:
    ctx.log(f"eval: classifier test accuracy {extra['classifier_test_accuracy']:.4f}")
  real = evaluator.split_features(features, test, int(cfg.eval.num_real))
  train_feats = evaluator.split_features(features, train_split) if "memorisation" in names else None
  means, std = data_lib.toy_modes(cfg.data.name) if ctx.is_points else (None, None)
  evaluate_fn = evaluator.metric_evaluator(names, real, train_feats, means=means, std=std, k=int(cfg.eval.k),
                                           sinkhorn_points=int(cfg.eval.sinkhorn_points),
                                           memorisation_points=int(cfg.eval.memorisation_points))
  results: Dict[str, Dict[str, float]] = {}
  for method in cfg.sample.methods:
    cached = workdir_lib.read_json(wd.method_metrics_path(method))
    if cached is not None:
      results[method] = cached
      continue
    samples = samples_of(method)
    decoder = samples.decoder or ae
    per_seed: List[Dict[str, float]] = []
    for s in range(samples.codes.shape[0]):
      fake_x = decoder.decode(samples.codes[s])
      fake = features(fake_x)
      per_seed.append(evaluate_fn(fake, config_lib.config_key(cfg, config_lib.SALT_EVAL, s)))
      if (s == 0 and not ctx.is_points and "memorisation" in names and method in ("exact", "extended")
          and workdir_lib.is_writer()):
        res = metrics_lib.memorisation_rate(fake[:16], train_feats, real[:2])
        nearest = evaluator.split_examples(train_split, np.asarray(res["nearest_index"]))
        report_lib.save_nn_grid(wd.nn_grid_path(method), fake_x[:16], nearest)
    row = evaluator.seed_average(per_seed)
    workdir_lib.write_json(wd.method_metrics_path(method), row)
    results[method] = row
    ctx.log(f"eval: {method}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if not k.endswith("_se")))
  return {"methods": results, **extra}


def _write_metrics(ctx: Context, eval_out: Dict[str, Any]) -> Dict[str, Any]:
  cfg, wd = ctx.config, ctx.wd
  stage_info = {s: wd.done(s) for s in config_lib.STAGES[:4]}
  keys = config_lib.stage_keys(cfg)
  out = {
      "dataset": cfg.data.name,
      "kind": "points" if ctx.is_points else "image",
      "feature_space": cfg.eval.feature_space,
      "num_samples": int(cfg.sample.num_samples),
      "num_seeds": int(cfg.sample.num_seeds),
      "methods": eval_out["methods"],
      "labels": {m: config_lib.METHOD_LABELS[m] for m in eval_out["methods"]},
      "stage_seconds": {s: (v or {}).get("seconds") for s, v in stage_info.items()},
      "ae": (stage_info.get("ae") or {}).get("summary"),
      "ot": (stage_info.get("ot") or {}).get("summary"),
      "sample": (stage_info.get("sample") or {}).get("summary"),
      "setting": {"keys": keys, "sample": config_lib.stage_fields(cfg, "sample"),
                  "eval": config_lib.stage_fields(cfg, "eval"), "superseded": wd.superseded()},
  }
  if "classifier_test_accuracy" in eval_out:
    out["classifier_test_accuracy"] = eval_out["classifier_test_accuracy"]
  workdir_lib.write_json(wd.metrics_path, out, sort_keys=False)
  return out


def _track_results(ctx: Context, res: Results, metrics: Dict[str, Any]) -> None:
  """Writes the final metrics (``final/...`` at step 0; the setting's config fields left out) and one
  sample grid per method (``samples/<method>``: the decoded grid for images, the scatter plot
  ``samples/<method>.png`` for points) to the tracker."""
  tracker = ctx.tracker
  if isinstance(tracker, tracking.NullTracker):
    return
  tracking.write_metrics(tracker, 0, {k: v for k, v in metrics.items() if k != "setting"}, "final")
  for method in ctx.config.sample.methods:
    if ctx.is_points:
      path = ctx.wd.grid_path(method)
      if path.is_file():
        from PIL import Image  # pylint: disable=import-outside-toplevel
        with Image.open(path) as image:
          tracker.image(f"samples/{method}", 0, np.asarray(image.convert("RGB")))
      continue
    samples = res.samples(method)
    decoder = samples.decoder or res.autoencoder()
    tracking.write_sample_grid(tracker, f"samples/{method}",
                               decoder.decode(samples.codes[0, :int(ctx.config.sample.grid_size)]))


def draw_figures(ctx: Context, res: Results) -> Optional[pathlib.Path]:
  """Draws the "At a glance" figure of a run whose eval stage is done, unless it shows the current settings
  already (process 0).

  2-D toys: :func:`lsot_jax.figures.methods_panel` of every method's first sample seed over the held-out
  data, with the power diagram and jump chords of the potential when the codes are the data
  (``ae.kind='identity'``). Images: :func:`lsot_jax.figures.interpolation_strip` of the exact and extended
  maps (:func:`lsot_jax.figures.lsot_samplers`, the run's ``sample.angle_threshold``) along the line between
  two seeded source points, decoded.

  What the figure shows (the methods and the extended map's settings) is written beside the PNG as a JSON
  stamp; a rerun with other ``sample.methods`` or sampler settings redraws it, a rerun with the same ones
  does not.

  Every process restores the artifacts (as the stages do); process 0 draws.

  Returns:
    The PNG's path, or None when not drawn here (another process, or it is up to date).
  """
  path = ctx.wd.root / report_lib.GLANCE_FIGURES["points" if ctx.is_points else "image"][0]
  stamp_path = path.with_suffix(".json")
  cfg = ctx.config
  shows = {"methods": list(cfg.sample.methods) if ctx.is_points else ["exact", "extended"],
           "angle_threshold": cfg.sample.angle_threshold, "blend_scale": float(cfg.sample.blend_scale)}
  if path.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == shows:
    return None
  ae, fit = res.autoencoder(), res.fit()
  potential, source = fit.potential, fit.problem.source
  drawn = {}
  if ctx.is_points:
    for method in cfg.sample.methods:
      samples = res.samples(method)
      drawn[method] = np.asarray((samples.decoder or ae).decode(samples.codes[0]))
  if not workdir_lib.is_writer():
    return None
  path.parent.mkdir(parents=True, exist_ok=True)
  if ctx.is_points:
    own = cfg.ae.kind == "identity"
    labels = evaluator.split_labels(ctx.split("train"))
    colors = labels[res.codes().index] if own and labels is not None else None
    means, _ = data_lib.toy_modes(cfg.data.name)
    test = ctx.split("test")
    fig = figures.methods_panel(drawn, evaluator.split_examples(test, np.arange(test.num_examples)),
                                potential=potential if own else None,
                                labels=config_lib.METHOD_LABELS, means=means, cell_colors=colors, path=path,
                                angle_threshold=cfg.sample.angle_threshold)
  else:
    key = config_lib.config_key(cfg, config_lib.SALT_FIGURE)
    ext = samplers.lsot_generate_kwargs(cfg, "extended", potential, source)
    maps = figures.lsot_samplers(potential, angle_threshold=ext["angle_threshold"], blend_scale=ext["blend_scale"],
                                 probe=source.sample(jax.random.fold_in(key, 0), 2048))
    ends = np.asarray(source.sample(jax.random.fold_in(key, 1), 2))
    fig = figures.interpolation_strip(ae.decode, ends[0], ends[1], maps, steps=10, path=path,
                                      potential=potential, labels=config_lib.METHOD_LABELS)
  plt.close(fig)
  stamp_path.write_text(json.dumps(shows))
  return path


# ---------------------------------------------------------------------------------------------------------
# Driver.


def _run_ae(ctx: Context, res: Results) -> Dict[str, Any]:
  ae, summary = train_ae(ctx)
  res.put("ae", ae)
  return summary


def _run_encode(ctx: Context, res: Results) -> Dict[str, Any]:
  codes, summary = encode(ctx, res.autoencoder())
  res.put("encode", codes)
  return summary


def _run_ot(ctx: Context, res: Results) -> Dict[str, Any]:
  fit, summary = stage_ot.fit_ot(ctx.config, ctx.wd, res.codes(), ctx.log, tracker=ctx.tracker)
  res.put("ot", fit)
  return summary


def _run_sample(ctx: Context, res: Results) -> Dict[str, Any]:
  return sample(ctx, res.fit(), res.autoencoder())


def _run_eval(ctx: Context, res: Results) -> Optional[Dict[str, Any]]:
  _track_results(ctx, res, _write_metrics(ctx, evaluate(ctx, res.autoencoder(), res.samples)))
  return None


STAGE_FNS: Dict[str, Callable[[Context, Results], Optional[Dict[str, Any]]]] = {
    "ae": _run_ae, "encode": _run_encode, "ot": _run_ot, "sample": _run_sample, "eval": _run_eval}


def run_stage(ctx: Context, res: Results, name: str) -> bool:
  """Runs one stage unless it is finished, and writes its marker.

  Returns:
    Whether the stage ran.
  """
  if ctx.wd.is_done(name, ctx.config.sample.methods):
    ctx.log(f"{name}: already done, skipping")
    return False
  ctx.log(f"{name}: starting")
  start = time.perf_counter()
  summary = STAGE_FNS[name](ctx, res)
  ctx.wd.mark_done(name, ctx.config, time.perf_counter() - start, summary)
  ctx.log(f"{name}: done in {time.perf_counter() - start:.1f}s")
  return True
