"""Runs with ``data.stream`` on ``tfds.testing.mock_data`` Fashion-MNIST: every stage reads the splits through
streams and random access, never loading a whole split, and gives the in-memory run's results."""
import mock_tfds
import numpy as np
import pytest

from lsot_jax import checkpoint as checkpoint_lib
from lsot_jax import config as config_lib
from lsot_jax import data as data_lib
from lsot_jax import pipeline
from lsot_jax import stages


def _config(stream, **overrides):
  """A tiny Fashion-MNIST run (MLP autoencoder) whose sample and eval stages read the training split: the VAE
  baseline, classifier features and the memorisation rate (with its nearest-neighbour grid of ``exact``)."""
  c = config_lib.default_config()
  c.data.name, c.data.num_train, c.data.num_test, c.data.stream = "fashion_mnist", 0, 0, stream
  c.ae.kind, c.ae.latent_dim, c.ae.widths = "mlp", 4, (32,)
  c.ae.epochs, c.ae.batch_size, c.ae.checkpoint_every = 2, 32, 5
  c.ot.num_iterations, c.ot.batch_size, c.ot.max_batch_size, c.ot.checkpoint_every = 10, 1024, 1024, 10
  c.ot.marginal_samples = 4096
  c.sample.methods, c.sample.num_samples, c.sample.num_seeds = ("exact", "vae"), 64, 1
  c.sample.grid_size, c.sample.vae_epochs = 16, 1
  c.eval.metrics, c.eval.feature_space = ("frechet", "sliced_wasserstein", "memorisation"), "classifier"
  c.eval.classifier_epochs, c.eval.classifier_batch_size, c.eval.num_real = 1, 32, 40
  c.log.progress, c.log.tensorboard = False, False
  for dotted, value in overrides.items():
    section, field = dotted.split("__")
    c[section][field] = value
  return c


def _no_whole_split(monkeypatch):
  """Makes every whole-split load (``data.load_dataset``, ``Context.dataset``) fail the test."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"a whole split was loaded: {args} {kwargs}")
  monkeypatch.setattr(data_lib, "load_dataset", refuse)
  monkeypatch.setattr(stages.Context, "dataset", refuse)


def _stream_position(folder):
  """``(the stream position in the newest checkpoint's metadata (None: trained in memory), its step)``."""
  with checkpoint_lib.StageCheckpointer(folder) as ckpt:
    return (ckpt.meta(ckpt.latest_step()).get("stream") or {}).get("position"), ckpt.latest_step()


def _numbers(tree, prefix=""):
  """The numbers of a metrics.json tree as ``{dotted: value}`` (stage seconds and the setting left out)."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if k == "setting" or "seconds" in k or "per_sec" in k:
      continue
    if isinstance(v, dict):
      out.update(_numbers(v, name + "."))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[name] = v
  return out


def test_a_streamed_run_loads_no_whole_split(tmp_path, monkeypatch):
  """Every stage of a streamed run (the VAE baseline, the classifier, memorisation and its grid included) with
  any whole-split load raising; the VAE and the classifier checkpoint their streams' positions. (The report's
  figure reads no data for images and is not drawn, to save time.)"""
  monkeypatch.setattr(stages, "draw_figures", lambda ctx, res: None)
  c = _config(True, ae__epochs=1, ot__num_iterations=4, eval__metrics=("frechet", "memorisation"))
  _no_whole_split(monkeypatch)
  lines = []
  with mock_tfds.mock_data(num_examples=64):
    out = pipeline.run(c, tmp_path / "run", log=lines.append)
  assert "ae: streaming 64 training examples in batches of 32" in lines
  assert set(out["methods"]) == {"exact", "vae"}
  for row in out["methods"].values():
    assert np.isfinite([row["frechet"], row["memorisation_rate"]]).all(), row
  assert 0.0 <= out["classifier_test_accuracy"] <= 1.0
  assert (tmp_path / "run" / "eval" / "exact_nn.png").is_file()
  assert _stream_position(tmp_path / "run" / "sample" / "vae_train") == (2, 2)
  assert _stream_position(tmp_path / "run" / "eval" / "classifier" / "ckpt") == (2, 2)


@pytest.mark.slow  # 11 s (32 s with a cold compilation cache); the fast ones: test_a_streamed_run_loads_no_whole_split,
# test_evaluator's and test_train's streamed-against-in-memory tests, test_streaming's stream_codes
def test_a_streamed_run_gives_the_in_memory_results(tmp_path, monkeypatch):
  """The same run with data.stream off and on (the streamed one loading no whole split): the same codes (bit
  for bit: same batches, same encoder batch size), the same metrics.json numbers (VAE baseline, classifier
  accuracy, features and memorisation included), the same stage keys; the streamed AE checkpoint holds the
  stream's position. (The report's figure, which reads no data, is not drawn: it is a quarter of the time.)"""
  monkeypatch.setattr(stages, "draw_figures", lambda ctx, res: None)
  c, streamed = _config(False), _config(True)
  assert config_lib.stage_keys(streamed) == config_lib.stage_keys(c)
  lines = []
  with mock_tfds.mock_data(num_examples=96):
    in_memory = pipeline.run(c, tmp_path / "memory", log=[].append)
    _no_whole_split(monkeypatch)
    out = pipeline.run(streamed, tmp_path / "stream", log=lines.append)
  assert "ae: streaming 96 training examples in batches of 32" in lines
  codes = [pipeline.load_encoded_codes(tmp_path / name) for name in ("memory", "stream")]
  np.testing.assert_array_equal(codes[1], codes[0])
  want, got = _numbers(in_memory), _numbers(out)
  assert set(got) == set(want), sorted(set(got) ^ set(want))
  for name in ("methods.exact.frechet", "methods.vae.memorisation_rate", "classifier_test_accuracy",
               "ae.test_mse"):
    assert name in got, sorted(got)
  for name, value in want.items():
    assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
  assert _stream_position(tmp_path / "stream" / "ae" / "ckpt") == (2 * (96 // 32),) * 2
  assert _stream_position(tmp_path / "memory" / "ae" / "ckpt")[0] is None
