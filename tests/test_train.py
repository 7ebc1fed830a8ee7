"""Tests for lsot_jax.train on sklearn's bundled digits: learning, exact resume, divergence, classifier.

Data-parallel training needs ``--xla_force_host_platform_device_count=4`` before JAX starts, so those
checks run in ONE subprocess (this file executed as a script, ``_CHILD_CHECKS``) that reports each check's
outcome as JSON; ``test_data_parallel_on_four_devices`` asserts them. The reference is the same training
run on one device (same seed, same batches), which the other tests check against PCA and exact resumption.
"""
import dataclasses
import functools
import json
import logging
import os
import pathlib
import shutil
import tarfile
import tempfile
import warnings

import jax
import multidevice
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA

from lsot_jax import checkpoint as checkpoint_lib
from lsot_jax import feeds, models, sharding, streaming, train
from lsot_jax.checkpoint import StageCheckpointer


@pytest.fixture(scope="module")
def digits():
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  return x[:1400], d.target[:1400], x[1400:], d.target[1400:]


SMALL_AE = models.AutoencoderConfig(kind="mlp", input_shape=(8, 8, 1), latent_dim=8, widths=(64, 32))


def _restore_params(ckpt_dir, graphdef_params, cfg=train.TrainConfig()):
  """Restores the params saved in ckpt_dir, using a freshly built train state (under names) as the target."""
  target = checkpoint_lib.named_state({"params": graphdef_params, "step": np.int32(0),
                                       "opt_state": train._make_optimizer(cfg, 1).init(graphdef_params)})
  with StageCheckpointer(ckpt_dir) as ckpt:
    step, state, meta = ckpt.restore(target)
  return step, state["params"], meta


def test_autoencoder_learns_better_than_pca(digits, tmp_path):
  x, _, x_test, _ = digits
  log = tmp_path / "logs" / "ae.jsonl"
  graphdef, params, history = train.train_autoencoder(
      x, SMALL_AE, str(tmp_path / "ae"), seed=0, epochs=12, batch_size=64, learning_rate=3e-3,
      log_path=str(log), progress=False)
  recon = jax.jit(lambda b: models.decode(graphdef, params, models.encode(graphdef, params, b)))(x_test)
  mse = float(np.mean((np.asarray(recon) - x_test) ** 2))
  flat, flat_test = x.reshape(len(x), -1), x_test.reshape(len(x_test), -1)
  pca = PCA(SMALL_AE.latent_dim).fit(flat)
  pca_mse = float(np.mean((pca.inverse_transform(pca.transform(flat_test)) - flat_test) ** 2))
  mean_mse = float(np.mean((flat_test - flat.mean(0)) ** 2))
  assert mse < 0.4 * mean_mse
  assert mse < pca_mse, (mse, pca_mse)
  assert history[-1]["loss"] < 0.3 * history[0]["loss"]
  records = [json.loads(line) for line in log.read_text().splitlines()]
  assert [r["epoch"] for r in records] == list(range(1, 13))
  assert all(r["stage"] == "autoencoder" and r["examples_per_sec"] > 0 for r in records)
  assert records[-1]["step"] == 12 * (1400 // 64)
  with StageCheckpointer(tmp_path / "ae") as ckpt:
    assert ckpt.is_complete() and ckpt.latest_step() == 12 * (1400 // 64)


@pytest.mark.parametrize("stage", ["autoencoder", "vae"])
def test_resume_reproduces_uninterrupted_run(stage, digits, tmp_path):
  x = digits[0][:600]
  fn = train.train_autoencoder if stage == "autoencoder" else train.train_vae
  cfg = train.TrainConfig(seed=3, epochs=3, batch_size=64, learning_rate=2e-3, checkpoint_every=4)
  steps_per_epoch = 600 // 64
  _, full, full_history = fn(x, SMALL_AE, str(tmp_path / "full"), cfg, progress=False)

  log = tmp_path / "resumed.jsonl"
  interrupted_at = steps_per_epoch + 3  # mid-epoch, and not a multiple of checkpoint_every
  _, partial, _ = fn(x, SMALL_AE, str(tmp_path / "resumed"), cfg, max_steps=interrupted_at,
                     log_path=str(log), progress=False)
  with StageCheckpointer(tmp_path / "resumed") as ckpt:
    assert ckpt.latest_step() == interrupted_at and not ckpt.is_complete()
  assert not np.allclose(partial["decoder"]["out"]["kernel"], full["decoder"]["out"]["kernel"])
  _, resumed, resumed_history = fn(x, SMALL_AE, str(tmp_path / "resumed"), cfg, log_path=str(log),
                                   progress=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), resumed, full)
  np.testing.assert_allclose([r["loss"] for r in resumed_history], [r["loss"] for r in full_history],
                             rtol=1e-6)
  # The rerun continued from the checkpoint: epoch 1 was logged once, by the first call.
  assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3]
  # A finished stage is skipped and returns the saved parameters.
  _, again, _ = fn(x, SMALL_AE, str(tmp_path / "resumed"), cfg, log_path=str(log), progress=False)
  jax.tree.map(np.testing.assert_array_equal, again, resumed)
  assert len(log.read_text().splitlines()) == 3


@pytest.mark.parametrize("stage", ["autoencoder", pytest.param("vae", marks=pytest.mark.slow)])
def test_streamed_training_equals_in_memory_and_resumes_from_its_stream_position(stage, digits, tmp_path):
  # The stream visits streaming.epoch_order, the permutation of the in-memory loop (equal arrays), so the
  # batches and hence the parameters are the same, bit for bit.
  x = digits[0][:320]
  np.testing.assert_array_equal(streaming.epoch_order(3, 1, 320), train.epoch_permutation(3, 1, 320))
  fn = train.train_autoencoder if stage == "autoencoder" else train.train_vae
  cfg = train.TrainConfig(seed=3, epochs=2, batch_size=64, learning_rate=2e-3, checkpoint_every=3)
  source = streaming.array_source(x)
  make = functools.partial(feeds.training_stream, source, cfg, num_threads=2)
  _, memory, memory_history = fn(x, SMALL_AE, str(tmp_path / "memory"), cfg, progress=False)
  _, streamed, streamed_history = fn(make(), SMALL_AE, str(tmp_path / "streamed"), cfg, progress=False)
  jax.tree.map(np.testing.assert_array_equal, streamed, memory)
  assert [r["loss"] for r in streamed_history] == [r["loss"] for r in memory_history]

  # Killed mid-epoch (not at a multiple of checkpoint_every), resumed with a fresh stream: its position comes
  # from the checkpoint's metadata.
  interrupted_at = 320 // 64 + 2
  fn(make(), SMALL_AE, str(tmp_path / "resumed"), cfg, max_steps=interrupted_at, progress=False)
  with StageCheckpointer(tmp_path / "resumed") as ckpt:
    assert ckpt.latest_step() == interrupted_at and not ckpt.is_complete()
    saved = ckpt.meta(interrupted_at)["stream"]
  assert saved["position"] == interrupted_at
  assert saved["spec"]["seed"] == 3 and saved["spec"]["batch_size"] == 64
  _, resumed, resumed_history = fn(make(), SMALL_AE, str(tmp_path / "resumed"), cfg, progress=False)
  jax.tree.map(np.testing.assert_array_equal, resumed, memory)
  assert [r["loss"] for r in resumed_history] == [r["loss"] for r in memory_history]

  # A checkpoint of in-memory training resumes from a stream (read up to the step), and the other way round.
  fn(x, SMALL_AE, str(tmp_path / "mixed"), cfg, max_steps=4, progress=False)
  fn(make(), SMALL_AE, str(tmp_path / "mixed"), cfg, max_steps=interrupted_at, progress=False)
  _, mixed, _ = fn(x, SMALL_AE, str(tmp_path / "mixed"), cfg, progress=False)
  jax.tree.map(np.testing.assert_array_equal, mixed, memory)


def test_a_stream_of_other_settings_is_refused(digits, tmp_path):
  x = digits[0][:300]
  cfg = train.TrainConfig(seed=1, epochs=2, batch_size=50)
  source = streaming.array_source(x)
  for stream, match in (
      (feeds.training_stream(source, dataclasses.replace(cfg, seed=2)), r"seed=2 \(training needs 1\)"),
      (feeds.training_stream(source, dataclasses.replace(cfg, batch_size=60)), "batch_size=60"),
      (feeds.training_stream(source, dataclasses.replace(cfg, epochs=1)),
       r"num_epochs=1 \(training needs >= 2"),
      (streaming.image_stream(source, 50, 1, num_epochs=2), "drop_remainder=False"),
      (streaming.array_source(x[:, :4]), "x_train must have shape"),
  ):
    if isinstance(stream, streaming.ImageSource):
      stream = feeds.training_stream(stream, cfg)
      match = r"examples have shape \(4, 8, 1\)"
    with pytest.raises(ValueError, match=match):
      train.train_autoencoder(stream, SMALL_AE, str(tmp_path / "bad"), cfg, progress=False)
  read = feeds.training_stream(source, cfg)
  next(read)
  with pytest.raises(ValueError, match="already read"):
    train.train_autoencoder(read, SMALL_AE, str(tmp_path / "bad"), cfg, progress=False)


def test_resume_rejects_a_different_data_stream(digits, tmp_path):
  x = digits[0][:300]
  train.train_autoencoder(x, SMALL_AE, str(tmp_path), epochs=1, batch_size=50, progress=False)
  with pytest.raises(ValueError, match="data stream"):
    train.train_autoencoder(x, SMALL_AE, str(tmp_path), epochs=2, batch_size=60, progress=False)


def test_nan_input_raises_and_keeps_last_good_checkpoint(digits, tmp_path):
  x = digits[0][:320]
  cfg = train.TrainConfig(seed=1, epochs=1, batch_size=64, learning_rate=1e-3)
  graphdef, good, _ = train.train_autoencoder(x, SMALL_AE, str(tmp_path), cfg, progress=False)
  poisoned = x.copy()
  poisoned[:, 3, 3, 0] = np.nan
  with pytest.raises(train.TrainingDiverged) as info:
    train.train_autoencoder(poisoned, SMALL_AE, str(tmp_path), cfg, epochs=2, progress=False)
  err = info.value
  assert isinstance(err, FloatingPointError)
  assert err.stage == "autoencoder" and err.step == 5 and err.last_good_step == 5
  assert "'autoencoder'" in str(err) and "step 5" in str(err)
  step, restored, _ = _restore_params(str(tmp_path), good)
  assert step == 5
  jax.tree.map(np.testing.assert_array_equal, restored, good)


def test_huge_learning_rate_diverges_without_saving(digits, tmp_path):
  x = digits[0][:256]
  with pytest.raises(train.TrainingDiverged, match="'vae'") as info:
    train.train_vae(x, SMALL_AE, str(tmp_path), seed=0, epochs=2, batch_size=64, learning_rate=1e30,
                    progress=False)
  assert info.value.last_good_step is None
  with StageCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None


def test_classifier_reaches_90_percent_on_digits(digits, tmp_path):
  x, y, x_test, y_test = digits
  cfg = models.ClassifierConfig(kind="mlp", input_shape=(8, 8, 1), widths=(128,), feature_dim=64)
  graphdef, params, accuracy = train.train_classifier(
      x, y, x_test, y_test, cfg, str(tmp_path), seed=0, epochs=15, batch_size=64, learning_rate=2e-3,
      progress=False)
  logits = models.classifier_logits(graphdef, params, x_test)
  assert accuracy == pytest.approx(float(np.mean(np.argmax(logits, axis=1) == y_test)))
  assert accuracy > 0.9
  with pytest.raises(ValueError, match="labels_train"):
    train.train_classifier(x, y + 1, x_test, y_test, cfg, str(tmp_path / "bad"), progress=False)


def test_streamed_classifier_equals_in_memory(digits, tmp_path):
  # Streams of the training split (labels in the batches) and of the test split give the in-memory
  # classifier's parameters bit for bit and its test accuracy.
  x, y, x_test, y_test = digits
  x, y = x[:320], y[:320].astype(np.int32)
  model = models.ClassifierConfig(kind="mlp", input_shape=(8, 8, 1), num_classes=10, widths=(32,), feature_dim=16)
  cfg = train.TrainConfig(seed=2, epochs=2, batch_size=64, learning_rate=2e-3)
  _, memory, accuracy = train.train_classifier(x, y, x_test, y_test, model, str(tmp_path / "memory"), cfg,
                                               progress=False)
  stream = feeds.training_stream(streaming.array_source(x, y), cfg, num_threads=2)
  test = streaming.image_stream(streaming.array_source(x_test, y_test.astype(np.int32)), 1024, shuffle=False)
  _, streamed, streamed_accuracy = train.train_classifier(stream, None, test, None, model,
                                                          str(tmp_path / "stream"), cfg, progress=False)
  jax.tree.map(np.testing.assert_array_equal, streamed, memory)
  assert streamed_accuracy == accuracy and 0.1 < accuracy < 1.0
  unlabelled = feeds.training_stream(streaming.array_source(x), cfg)
  with pytest.raises(ValueError, match="x_train: a stream must bring its own labels"):
    train.train_classifier(unlabelled, None, x_test, y_test, model, str(tmp_path / "bad"), cfg, progress=False)
  with pytest.raises(ValueError, match="fresh one-epoch stream with labels"):
    feeds.classification_accuracy(lambda b: b[:, 0, 0, 0], streaming.image_stream(
        streaming.array_source(x_test, y_test.astype(np.int32)), 100, drop_remainder=True))


def _raw_state(ckpt_dir):
  """The raw tree (nested dicts, read by Orbax without a target) of the newest step in ckpt_dir, and its meta."""
  with StageCheckpointer(ckpt_dir) as ckpt:
    step = ckpt.latest_step()
    meta = ckpt.meta(step)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # no sharding given: Orbax reads it from the checkpoint
    return ocp.PyTreeCheckpointer().restore(pathlib.Path(ckpt_dir) / str(step) / "state"), meta


@pytest.mark.parametrize("clip,weight_decay,schedule,steps", [
    (None, 0.0, "constant", {"adam", "learning_rate"}),
    (0.5, 1e-3, "cosine", {"clip", "adam", "weight_decay", "learning_rate"})])
def test_checkpoints_hold_the_optimiser_state_under_names(digits, tmp_path, clip, weight_decay, schedule, steps):
  x = digits[0][:128]
  cfg = train.TrainConfig(seed=0, epochs=1, batch_size=64, grad_clip_norm=clip, weight_decay=weight_decay,
                          lr_schedule=schedule)
  _, params, _ = train.train_autoencoder(x, SMALL_AE, str(tmp_path), cfg, progress=False)
  raw, meta = _raw_state(tmp_path)
  assert set(raw) == {"params", "opt_state", "step"} and int(raw["step"]) == 2
  assert set(raw["opt_state"]) == steps and set(raw["opt_state"]["adam"]) == {"count", "mu", "nu"}
  assert int(raw["opt_state"]["adam"]["count"]) == 2
  assert meta[checkpoint_lib.STATE_LAYOUT_KEY] == checkpoint_lib.NAMED_LAYOUT
  jax.tree.map(np.testing.assert_array_equal, raw["params"], params)
  # Restored into the optimiser's own structure (optax.named_chain's OrderedDict), so a resumed step is the
  # same program.
  template = {"params": params, "opt_state": train._make_optimizer(cfg, 2).init(params), "step": np.int32(0)}
  with StageCheckpointer(tmp_path) as ckpt:
    _, restored, _ = train._restore_state(ckpt, template, cfg, 2)
  assert jax.tree.structure(restored) == jax.tree.structure(template)
  jax.tree.map(np.testing.assert_array_equal, restored["opt_state"], checkpoint_lib.state_from_named(
      template["opt_state"], raw["opt_state"]))
  # The steps are optax.adam's / optax.adamw's: the same update as the library's own chain.
  grads = jax.tree.map(np.ones_like, params)
  lr = optax.cosine_decay_schedule(1e-3, 2) if schedule == "cosine" else 1e-3
  reference = optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)
  if clip is not None:
    reference = optax.chain(optax.clip_by_global_norm(clip), reference)
  ours = train._make_optimizer(cfg, 2)
  got = ours.update(grads, ours.init(params), params)[0]
  want = reference.update(grads, reference.init(params), params)[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), got, want)


# Checkpoint folders written by commit b13b6e4 (the optimiser state in optax's tuple layout, before named keys),
# by code equal to ``_fit_old_setting``: on digits[:160] (classifier test set digits[160:224]), an MLP
# autoencoder / VAE / classifier per ``settings.json`` entry, stopped by ``max_steps`` after step 7 (checkpoint
# every 4 steps, one kept), and ``ae_finished`` trained to the end; ``expected_params.npz`` holds the
# parameters that version reached uninterrupted (keys ``<name><keystr of the leaf>``).
OLD_CKPTS = pathlib.Path(__file__).resolve().parent / "data" / "train_ckpts_b13b6e4.tar.gz"


@pytest.fixture(scope="module")
def old_ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("old_ckpts")
  with tarfile.open(OLD_CKPTS) as tar:
    tar.extractall(root, filter="data")
  return root, json.loads((root / "settings.json").read_text()), dict(np.load(root / "expected_params.npz"))


def _fit_old_setting(settings, name, folder):
  d = load_digits()
  x, y = (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)
  (a, b), (c, e) = settings["data"]["train"], settings["data"]["test"]
  setting = settings["settings"][name]
  cfg = train.TrainConfig(**setting["train"])
  ae_cfg = models.AutoencoderConfig(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in settings["autoencoder"].items()})
  if setting["stage"] == "autoencoder":
    return train.train_autoencoder(x[a:b], ae_cfg, folder, cfg, progress=False)[1]
  if setting["stage"] == "vae":
    return train.train_vae(x[a:b], ae_cfg, folder, cfg, progress=False)[1]
  clf_cfg = models.ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in settings["classifier"].items()})
  return train.train_classifier(x[a:b], y[a:b], x[c:e], y[c:e], clf_cfg, folder, cfg, progress=False)[1]


def _assert_expected(params, expected, name):
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  flat = {f"{name}{jax.tree_util.keystr(path)}": np.asarray(v) for path, v in leaves}
  assert set(flat) == {k for k in expected if k.startswith(name + "[")}
  # Equal on the machine that wrote the file; the tolerance admits another CPU's float rounding.
  for key, value in flat.items():
    np.testing.assert_allclose(value, expected[key], rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", ["ae_adam", "ae_cosine_adamw_clip", "vae_adam", "classifier_adam"])
def test_a_checkpoint_written_before_named_keys_resumes(old_ckpts, tmp_path, caplog, name):
  """The interrupted training resumes from the old tuple-layout checkpoint to the parameters that version
  reached uninterrupted, and saves its own steps under names."""
  root, settings, expected = old_ckpts
  folder = tmp_path / name
  shutil.copytree(root / name, folder)
  assert checkpoint_lib.STATE_LAYOUT_KEY not in _raw_state(folder)[1]
  with caplog.at_level(logging.INFO, logger="lsot_jax.train"):
    params = _fit_old_setting(settings, name, str(folder))
  assert "resuming from step 7" in caplog.text
  _assert_expected(params, expected, name)
  raw, meta = _raw_state(folder)
  assert meta[checkpoint_lib.STATE_LAYOUT_KEY] == checkpoint_lib.NAMED_LAYOUT and "adam" in raw["opt_state"]


def test_restore_autoencoder_reads_a_finished_checkpoint_written_before_named_keys(old_ckpts):
  root, _, expected = old_ckpts
  _, params = train.restore_autoencoder(str(root / "ae_finished"))
  _assert_expected(params, expected, "ae_finished")


def test_epoch_permutation_is_deterministic_per_seed_and_epoch():
  a = train.epoch_permutation(0, 1, 50)
  np.testing.assert_array_equal(np.sort(a), np.arange(50))
  np.testing.assert_array_equal(a, train.epoch_permutation(0, 1, 50))
  assert not np.array_equal(a, train.epoch_permutation(0, 2, 50))
  assert not np.array_equal(a, train.epoch_permutation(1, 1, 50))


def test_batched_apply_pads_the_last_chunk(np_rng):
  x = np_rng.normal(size=(10, 3)).astype(np.float32)
  shapes = []

  def fn(b):
    shapes.append(b.shape)
    return {"sum": b.sum(axis=1), "double": 2 * b}

  out = train.batched_apply(fn, x, batch_size=4)
  np.testing.assert_allclose(out["sum"], x.sum(axis=1), rtol=1e-6)
  np.testing.assert_allclose(out["double"], 2 * x)
  assert shapes == [(4, 3)] * 3


def test_train_config_validation():
  with pytest.raises(ValueError, match="Unknown training options"):
    train._resolve_config(None, {"epoch": 3})
  with pytest.raises(ValueError):
    train.TrainConfig(learning_rate=0.0)
  with pytest.raises(ValueError):
    train.TrainConfig(batch_size=0)
  with pytest.raises(ValueError, match="lr_schedule"):
    train.TrainConfig(lr_schedule="linear")


@pytest.mark.parametrize("schedule,expected", [("constant", 1.0), ("cosine", 0.5)])
def test_lr_schedule_sets_the_adam_step(schedule, expected):
  # With a constant gradient, Adam's normalised step is the learning rate itself, so T steps move a parameter
  # by sum_t lr_t: lr * T for a constant step, lr * T / 2 for a cosine decay to 0 over T steps.
  total, lr = 400, 1e-2
  tx = train._make_optimizer(train.TrainConfig(learning_rate=lr, lr_schedule=schedule), total)
  params = {"w": np.zeros(3, np.float32)}
  state = tx.init(params)
  grads = {"w": np.ones(3, np.float32)}
  for _ in range(total):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(np.asarray(params["w"]), -expected * lr * total, rtol=0.01)


# ---------------------------------------------------------------------------------------------------------
# Data-parallel training, checked in a 4-device child process.

_NUM_DEVICES = 4


def _digits_subset(num):
  return (load_digits().images[:num] / 16.0).astype(np.float32)[..., None]


def _assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol),
               a, b)


def check_autoencoder_mesh_equals_single_device_and_resumes_across():
  mesh = sharding.make_mesh(_NUM_DEVICES)
  assert mesh.size == _NUM_DEVICES, jax.devices()
  x = _digits_subset(640)
  cfg = train.TrainConfig(seed=2, epochs=2, batch_size=64, learning_rate=3e-3)
  with tempfile.TemporaryDirectory() as tmp:
    _, p0, h0 = train.train_autoencoder(x, SMALL_AE, os.path.join(tmp, "one"), cfg, progress=False)
    _, p1, h1 = train.train_autoencoder(x, SMALL_AE, os.path.join(tmp, "mesh"), cfg, progress=False,
                                        mesh=mesh)
    leaf = p1["decoder"]["out"]["kernel"]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == _NUM_DEVICES
    assert [r["step"] for r in h1] == [r["step"] for r in h0] == [10, 20]
    np.testing.assert_allclose([r["loss"] for r in h1], [r["loss"] for r in h0], rtol=1e-5)
    assert h1[-1]["loss"] < 0.8 * h1[0]["loss"]  # it trained
    _assert_trees_close(p1, p0)
    # Interrupted mid-epoch on one device and resumed on the mesh, and the other way round: both reach
    # the uninterrupted run's parameters and history.
    for first, second, name in ((None, mesh, "one_then_mesh"), (mesh, None, "mesh_then_one")):
      ckpt_dir = os.path.join(tmp, name)
      train.train_autoencoder(x, SMALL_AE, ckpt_dir, cfg, max_steps=13, progress=False, mesh=first)
      _, resumed, history = train.train_autoencoder(x, SMALL_AE, ckpt_dir, cfg, progress=False,
                                                    mesh=second)
      _assert_trees_close(resumed, p0)
      np.testing.assert_allclose([r["loss"] for r in history], [r["loss"] for r in h0], rtol=1e-5,
                                 err_msg=name)
      with StageCheckpointer(ckpt_dir) as ckpt:
        assert ckpt.is_complete() and ckpt.latest_step() == 20, name


def check_vae_mesh_equals_single_device():
  # The VAE draws per-example noise from the step key: splitting the batch must not change it.
  mesh = sharding.make_mesh(_NUM_DEVICES)
  x = _digits_subset(512)
  cfg = train.TrainConfig(seed=1, epochs=1, batch_size=64, learning_rate=2e-3)
  with tempfile.TemporaryDirectory() as tmp:
    _, v0, vh0 = train.train_vae(x, SMALL_AE, os.path.join(tmp, "v0"), cfg, progress=False)
    _, v1, vh1 = train.train_vae(x, SMALL_AE, os.path.join(tmp, "v1"), cfg, progress=False, mesh=mesh)
  np.testing.assert_allclose(vh1[0]["loss"], vh0[0]["loss"], rtol=1e-5)
  _assert_trees_close(v1, v0)


def check_batch_must_divide_over_the_mesh():
  mesh = sharding.make_mesh(_NUM_DEVICES)
  x = _digits_subset(100)
  with tempfile.TemporaryDirectory() as tmp:
    try:
      train.train_autoencoder(x, SMALL_AE, os.path.join(tmp, "bad"), epochs=1, batch_size=30,
                              progress=False, mesh=mesh)
    except ValueError as e:
      assert "batch size 30" in str(e) and "divisible by the 4 devices" in str(e), str(e)
    else:
      raise AssertionError("batch_size=30 on 4 devices must raise")
    try:
      train.train_autoencoder(x, SMALL_AE, os.path.join(tmp, "bad2"), epochs=1, batch_size=32,
                              progress=False, mesh=mesh, axis_name="batch")
    except ValueError as e:
      assert "not in the mesh axes" in str(e), str(e)
    else:
      raise AssertionError("an unknown axis must raise")


_CHILD_CHECKS = (
    check_autoencoder_mesh_equals_single_device_and_resumes_across,
    check_vae_mesh_equals_single_device,
    check_batch_must_divide_over_the_mesh,
)


@pytest.fixture(scope="module")
def child_results():
  return multidevice.run_child(__file__, _NUM_DEVICES)


@pytest.mark.parametrize("name", [c.__name__ for c in _CHILD_CHECKS])
def test_data_parallel_on_four_devices(child_results, name):
  assert child_results[name] == "ok", child_results[name]


def test_mesh_of_one_device_trains_like_no_mesh(digits, tmp_path):
  x = digits[0][:256]
  cfg = train.TrainConfig(seed=0, epochs=1, batch_size=64, learning_rate=2e-3)
  _, p0, h0 = train.train_autoencoder(x, SMALL_AE, str(tmp_path / "a"), cfg, progress=False)
  _, p1, h1 = train.train_autoencoder(x, SMALL_AE, str(tmp_path / "b"), cfg, progress=False,
                                      mesh=sharding.make_mesh(1))
  np.testing.assert_allclose(h1[0]["loss"], h0[0]["loss"], rtol=1e-6)
  _assert_trees_close(p1, p0, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="Mesh"):
    train.train_autoencoder(x, SMALL_AE, str(tmp_path / "c"), cfg, progress=False, mesh="cpu")


if __name__ == "__main__":
  jax.config.update("jax_numpy_rank_promotion", "raise")
  multidevice.child_main(_CHILD_CHECKS)
