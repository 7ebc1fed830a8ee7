"""Tests of lsot_jax.tracking: event files read back, training with and without a tracker, progress lines.

References: values written by hand or computed independently (the first training step's loss from the
initial parameters and the first batch; pixel grids assembled in the test; the returned loss histories).
"""
import io
import logging
import types

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from lsot_jax import baselines, models, tracking, train


def test_scalars_round_trip_through_the_event_file(tmp_path):
  tracker = tracking.make_tracker(str(tmp_path / "tb"))
  assert isinstance(tracker, tracking.TensorBoardTracker)
  tracker.scalars(3, {"loss": 0.25, "count": np.int32(7)}, prefix="ae")
  tracker.scalars(5, {"loss": np.float32(0.125)}, prefix="ae/")
  tracker.scalars(0, {"top": -1.5})
  tracker.close()
  got = tracking.read_scalars(str(tmp_path / "tb"))
  assert got == {"ae/loss": [(3, 0.25), (5, 0.125)], "ae/count": [(3, 7.0)], "top": [(0, -1.5)]}


def test_reader_rejects_a_corrupted_event_file(tmp_path):
  tracker = tracking.make_tracker(str(tmp_path))
  tracker.scalars(1, {"x": 2.0})
  tracker.close()
  (path,) = list(tmp_path.glob("events.out.tfevents.*"))
  data = bytearray(path.read_bytes())
  data[-6] ^= 0xFF  # inside the last record's payload
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="bad or truncated record"):
    tracking.read_scalars(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no TensorBoard event file"):
    tracking.read_scalars(str(tmp_path / "nothing"))


def test_sample_grid_image_round_trip(tmp_path):
  """Two 2x3 grey images in one row with 1 px padding: the PNG in the event decodes to the hand-built grid."""
  a = np.full((2, 3, 1), 1.0, np.float32)
  b = np.full((2, 3, 1), 0.5, np.float32)
  tracker = tracking.make_tracker(str(tmp_path))
  tracking.write_sample_grid(tracker, "samples/exact", np.stack([a, b]), step=4, ncols=2)
  tracker.close()
  expected = np.zeros((4, 9), np.uint8)
  expected[1:3, 1:4] = 255
  expected[1:3, 5:8] = 128  # round(0.5 * 255)
  images = tracking.read_images(str(tmp_path))
  assert list(images) == ["samples/exact"] and [s for s, _ in images["samples/exact"]] == [4]
  pixels = images["samples/exact"][0][1]
  assert pixels.shape == (4, 9, 3) and pixels.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(pixels[..., c], expected)
  with pytest.raises(ValueError, match="C in"):
    tracker = tracking.make_tracker(str(tmp_path / "bad"))
    tracker.image("x", 0, np.zeros((4, 4, 2)))


def test_null_tracker_and_factory_errors(tmp_path):
  null = tracking.make_tracker(None)
  assert isinstance(null, tracking.NullTracker)
  null.scalars(1, {"a": 1.0})
  null.image("x", 1, np.zeros((2, 2)))
  null.close()
  with pytest.raises(ValueError, match="logdir"):
    tracking.make_tracker(3)
  assert not list(tmp_path.iterdir())


def test_solver_history_is_written_per_step_and_chunk_by_chunk(tmp_path):
  """A state with 5 steps done, written in two chunks (3 then 2 new steps): steps 1..5, each once."""
  errors = np.array([0.5, 0.4, 0.3, 0.2, 0.1, np.inf, np.inf], np.float32)
  state = types.SimpleNamespace(it=np.int32(3), errors=errors, sample_sizes=np.array([8, 8, 32, 32, 32, 0, 0]),
                                energies=np.arange(7, dtype=np.float32))
  tracker = tracking.make_tracker(str(tmp_path))
  done = tracking.write_solver_history(tracker, state, prefix="ot")
  assert done == 3
  state.it = np.int32(5)
  assert tracking.write_solver_history(tracker, state, prefix="ot", start=done) == 5
  tracking.write_metrics(tracker, 5, {"l1": 0.1, "name": "exact", "quality": {"modes": 8, "kl": float("nan")},
                                      "converged": True, "list": [1, 2]})
  tracker.close()
  got = tracking.read_scalars(str(tmp_path))
  np.testing.assert_allclose([v for _, v in got["ot/l1"]], errors[:5])
  assert [s for s, _ in got["ot/l1"]] == [1, 2, 3, 4, 5]
  assert got["ot/num_samples"] == [(1, 8.0), (2, 8.0), (3, 32.0), (4, 32.0), (5, 32.0)]
  assert [v for _, v in got["ot/energy"]] == [0.0, 1.0, 2.0, 3.0, 4.0]
  assert got["final/l1"] == [(5, pytest.approx(0.1))]
  assert got["final/quality/modes"] == [(5, 8.0)] and got["final/converged"] == [(5, 1.0)]
  assert "final/quality/kl" not in got and "final/name" not in got
  with pytest.raises(ValueError, match="unbatched"):
    tracking.write_solver_history(tracker, types.SimpleNamespace(it=np.zeros(3, np.int32)))


@pytest.fixture(scope="module")
def digits():
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  return x[:640], d.target[:640], x[1400:], d.target[1400:]


SMALL_AE = models.AutoencoderConfig(kind="mlp", input_shape=(8, 8, 1), latent_dim=8, widths=(32, 16))


def test_autoencoder_with_tracker_same_params_and_scalars(digits, tmp_path):
  x = digits[0]
  cfg = train.TrainConfig(seed=2, epochs=2, batch_size=64, learning_rate=2e-3, log_every=4)
  _, ref, _ = train.train_autoencoder(x, SMALL_AE, str(tmp_path / "a"), cfg, progress=False)
  tracker = tracking.make_tracker(str(tmp_path / "tb"))
  graphdef, params, history = train.train_autoencoder(x, SMALL_AE, str(tmp_path / "b"), cfg, progress=False,
                                                      tracker=tracker)
  tracker.close()
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  got = tracking.read_scalars(str(tmp_path / "tb"))
  steps_per_epoch = 640 // 64
  losses = got["autoencoder/loss"]
  assert [s for s, _ in losses] == list(range(1, 2 * steps_per_epoch + 1))
  # Step 1's loss is the loss of the initial parameters on the first batch of epoch 0.
  _, init = models.init_autoencoder(jax.random.fold_in(jax.random.key(2), 0), SMALL_AE)
  first = x[train.epoch_permutation(2, 0, 640)[:64]]
  want = float(models.autoencoder_loss(graphdef, init, first)[0])
  assert losses[0][1] == pytest.approx(want, rel=1e-5)
  # Each epoch's record is the mean of its step losses.
  for e in range(2):
    mean = np.mean([v for _, v in losses[e * steps_per_epoch:(e + 1) * steps_per_epoch]])
    assert history[e]["loss"] == pytest.approx(mean, rel=1e-5)
    assert got["autoencoder/epoch_loss"][e] == ((e + 1) * steps_per_epoch, pytest.approx(history[e]["loss"]))
  assert [s for s, _ in got["autoencoder/examples_per_sec"]] == [steps_per_epoch, 2 * steps_per_epoch]


def test_classifier_writes_its_test_accuracy(digits, tmp_path):
  x, y, xt, yt = digits
  model = models.ClassifierConfig(kind="mlp", input_shape=(8, 8, 1), num_classes=10, widths=(32,))
  tracker = tracking.make_tracker(str(tmp_path / "tb"))
  _, _, accuracy = train.train_classifier(x, y, xt, yt, model, str(tmp_path / "c"), progress=False,
                                          tracker=tracker, epochs=1, batch_size=128)
  tracker.close()
  got = tracking.read_scalars(str(tmp_path / "tb"))
  assert got["classifier/test_accuracy"] == [(5, pytest.approx(accuracy))]
  assert len(got["classifier/loss"]) == 5


def test_wgan_gp_losses_are_written_after_the_scan(tmp_path):
  codes = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
  kw = dict(batch_size=32, hidden_sizes=(16, 16), noise_dim=3, return_history=True)
  ref, hist = baselines.train_wgan_gp(jax.random.key(0), codes, 12, **kw)
  tracker = tracking.make_tracker(str(tmp_path))
  params, _ = baselines.train_wgan_gp(jax.random.key(0), codes, 12, tracker=tracker, **kw)
  tracker.close()
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  got = tracking.read_scalars(str(tmp_path))
  for name in ("critic_loss", "generator_loss"):
    assert [s for s, _ in got[f"wgan_gp/{name}"]] == list(range(1, 13))
    np.testing.assert_array_equal(np.array([v for _, v in got[f"wgan_gp/{name}"]], np.float32),
                                  np.asarray(hist[name]))


def test_progress_logger_writes_log_lines_without_a_terminal(caplog):
  stream = io.StringIO()  # isatty() is False
  every = tracking.ProgressLogger(total=4, desc="ot", log_every_s=0.0, stream=stream)
  with caplog.at_level(logging.INFO, logger="lsot_jax.tracking"):
    for k in range(1, 4):
      every(dict(step=k, l1=1.0 / k, num_samples=1024, stage=0))
    every.close()
  lines = [r.getMessage() for r in caplog.records]
  assert lines == [f"ot: step {k}/4 l1={1.0 / k:.4g} num_samples=1024 stage=0" for k in range(1, 4)]
  assert stream.getvalue() == ""

  caplog.clear()
  sparse = tracking.ProgressLogger(total=10, desc="fit", log_every_s=3600.0, stream=stream)
  with caplog.at_level(logging.INFO, logger="lsot_jax.tracking"):
    for k in range(1, 7):
      sparse(dict(step=k, l1=0.5))
    sparse.close()
  assert [r.getMessage() for r in caplog.records] == ["fit: step 1/10 l1=0.5", "fit: step 6/10 l1=0.5"]
  with pytest.raises(ValueError, match="step"):
    sparse(dict(l1=0.5))


def test_progress_logger_draws_a_bar_on_a_terminal(caplog):
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  stream = Terminal()
  bar = tracking.ProgressLogger(total=8, desc="newton", stream=stream)
  with caplog.at_level(logging.INFO, logger="lsot_jax.tracking"):
    bar(dict(step=3, l1=0.25))
    bar(dict(step=8, l1=0.125))
    bar.close()
  assert not caplog.records
  out = stream.getvalue()
  assert "newton" in out and "8/8" in out and "l1=0.125" in out
