"""Tests for lsot_jax.streaming.

References: the in-memory loaders of :mod:`lsot_jax.data` (same examples,
same order), PIL decoding written out here, :func:`lsot_jax.train.
epoch_permutation` (same epoch order), and reading the stream in one go
(resume). TFDS runs through a tiny dataset built into array_record (the real
read path) and through ``tfds.testing.mock_data``.
"""
import functools
import io
import json

import grain
import jax
import jax.numpy as jnp
import mock_tfds
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from lsot_jax import checkpoint as checkpoint_lib
from lsot_jax import data
from lsot_jax import streaming
from lsot_jax import train


def _read(stream):
  batches = list(stream)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ---------------------------------------------------------------------------
# Order, determinism and resume (in-memory source: fast).


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits", "train")


def test_epoch_order_is_the_training_permutation():
  for seed, epoch, n in ((0, 0, 10), (3, 7, 1500), (12, 1, 1)):
    np.testing.assert_array_equal(streaming.epoch_order(seed, epoch, n),
                                  train.epoch_permutation(seed, epoch, n))


def test_first_epoch_unshuffled_equals_load_dataset(digits):
  stream = streaming.image_stream(streaming.image_source("digits", "train"),
                                  64, shuffle=False)
  assert stream.batches_per_epoch == 24 and stream.num_batches == 24
  out = _read(stream)
  np.testing.assert_array_equal(out["image"], digits.x)
  np.testing.assert_array_equal(out["label"], digits.labels)
  np.testing.assert_array_equal(out["index"], np.arange(1500))
  assert out["image"].dtype == np.float32 and out["label"].dtype == np.int32


def test_shuffled_epochs_follow_the_training_loop(digits):
  # The batches _fit would build: epoch_permutation, drop the partial batch.
  stream = streaming.image_stream(streaming.array_source(digits.x,
                                                         digits.labels),
                                  128, seed=5, num_epochs=3,
                                  drop_remainder=True)
  assert stream.batches_per_epoch == 1500 // 128
  batches = list(stream)
  assert len(batches) == 3 * (1500 // 128)
  for step, batch in enumerate(batches):
    epoch, pos = divmod(step, 1500 // 128)
    idx = train.epoch_permutation(5, epoch, 1500)[pos * 128:(pos + 1) * 128]
    np.testing.assert_array_equal(batch["index"], idx)
    np.testing.assert_array_equal(batch["image"], digits.x[idx])
    np.testing.assert_array_equal(batch["label"], digits.labels[idx])
  # Every epoch differs from the next.
  assert not np.array_equal(batches[0]["index"], batches[11]["index"])


def test_deterministic_whatever_the_threads(digits):
  source = streaming.array_source(digits.x, digits.labels)
  runs = [_read(streaming.image_stream(source, 100, seed=2, num_epochs=2,
                                       num_threads=t, prefetch_batches=p))
          for t, p in ((0, 1), (1, 1), (3, 5))]
  for other in runs[1:]:
    for key in runs[0]:
      np.testing.assert_array_equal(other[key], runs[0][key])
  # Each epoch is a permutation of the split, with its own order.
  first, second = runs[0]["index"][:1500], runs[0]["index"][1500:]
  np.testing.assert_array_equal(np.sort(first), np.arange(1500))
  np.testing.assert_array_equal(np.sort(second), np.arange(1500))
  assert not np.array_equal(first, second)
  other_seed = _read(streaming.image_stream(source, 100, seed=3))
  assert not np.array_equal(other_seed["index"], first)


@pytest.mark.parametrize("n_first", [3, 14, 15, 20])
def test_resume_continues_the_same_stream(digits, n_first):
  source = streaming.array_source(digits.x, digits.labels)
  make = functools.partial(streaming.image_stream, source, 100, seed=4,
                           num_epochs=2, num_threads=2)
  whole = list(make())
  stream = make()
  head = [next(stream) for _ in range(n_first)]
  state = json.loads(json.dumps(stream.get_state()))
  assert state["position"] == n_first
  stream.close()
  fresh = make()
  fresh.set_state(state)
  assert fresh.position == n_first and fresh.epoch == n_first // 15
  tail = list(fresh)
  assert len(head) + len(tail) == len(whole) == 30
  for got, want in zip(head + tail, whole):
    np.testing.assert_array_equal(got["index"], want["index"])
    np.testing.assert_array_equal(got["image"], want["image"])


def test_state_of_other_settings_is_refused(digits):
  source = streaming.array_source(digits.x)
  stream = streaming.image_stream(source, 100, seed=1)
  next(stream)
  state = stream.get_state()
  other = streaming.image_stream(source, 100, seed=2)
  with pytest.raises(ValueError, match="seed: saved 1, here 2"):
    other.set_state(state)
  with pytest.raises(ValueError, match="keys"):
    other.set_state({"next_index": 3})


def test_state_in_orbax_checkpoints(digits, tmp_path):
  source = streaming.array_source(digits.x)
  make = functools.partial(streaming.image_stream, source, 64, seed=7,
                           num_epochs=None)
  whole = make()
  want = [next(whole)["index"] for _ in range(40)]
  stream = make()
  for _ in range(30):
    next(stream)
  # grain's own Orbax handler ...
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / "grain", args=grain.checkpoint.CheckpointSave(
      stream))
  # ... and the JSON metadata of the stage checkpointer the training uses.
  with checkpoint_lib.StageCheckpointer(tmp_path / "stage") as ckpt:
    ckpt.save(30, {"w": jnp.zeros(2)}, {"data_state": stream.get_state()})
  restored = checkpointer.restore(
      tmp_path / "grain", args=grain.checkpoint.CheckpointRestore(make()))
  with checkpoint_lib.StageCheckpointer(tmp_path / "stage") as ckpt:
    _, _, meta = ckpt.restore({"w": jnp.zeros(2)})
  from_meta = make()
  from_meta.set_state(meta["data_state"])
  for resumed in (restored, from_meta):
    got = [next(resumed)["index"] for _ in range(10)]
    for g, w in zip(got, want[30:]):
      np.testing.assert_array_equal(g, w)


def test_stream_codes_in_dataset_order(digits):
  w = jax.random.normal(jax.random.key(0), (64, 5))
  shapes = []

  def encode(x):
    shapes.append(x.shape)
    return x.reshape(x.shape[0], -1) @ w

  encode_jit = jax.jit(encode)
  source = streaming.array_source(digits.x)
  codes = streaming.stream_codes(
      encode_jit, streaming.image_stream(source, 256, seed=3, shuffle=True))
  expected = np.asarray(digits.x.reshape(1500, -1) @ np.asarray(w))
  np.testing.assert_allclose(codes, expected, rtol=1e-5, atol=1e-5)
  assert codes.shape == (1500, 5) and codes.dtype == np.float32
  assert shapes == [(256, 8, 8, 1)]  # 1500 = 5 * 256 + 220: padded, one trace.
  with pytest.raises(ValueError, match="drop_remainder=False"):
    streaming.stream_codes(encode_jit, streaming.image_stream(
        source, 256, drop_remainder=True))


def test_head_gather_and_labels_read_only_what_they_return(digits):
  source = streaming.array_source(digits.x, digits.labels)
  first = streaming.head(source, 100)
  assert first.num_examples == 100
  assert streaming.head(source, 10**6).num_examples == 1500
  out = _read(streaming.image_stream(first, 32, shuffle=False))
  np.testing.assert_array_equal(out["image"], digits.x[:100])
  index = np.array([1499, 3, 3, 700])
  np.testing.assert_array_equal(streaming.gather(source, index),
                                digits.x[index])
  assert streaming.gather(source, []).shape == (0, 8, 8, 1)
  with pytest.raises(IndexError, match=r"\[0, 100\)"):
    streaming.gather(first, [100])
  with pytest.raises(IndexError):
    streaming.gather(source, [-1])
  np.testing.assert_array_equal(streaming.source_labels(source),
                                digits.labels)
  assert streaming.source_labels(streaming.array_source(digits.x)) is None
  # A source not held in memory is read once for its labels, in order.
  records = [(digits.x[i], int(digits.labels[i])) for i in range(300)]
  listed = streaming.ImageSource(records, source.decode, (8, 8, 1), True,
                                 "listed")
  labels = streaming.source_labels(listed, batch_size=64, num_threads=2)
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, digits.labels[:300])
  np.testing.assert_array_equal(
      streaming.source_labels(streaming.head(listed, 70)), digits.labels[:70])


def test_bad_arguments(digits):
  source = streaming.array_source(digits.x)
  with pytest.raises(ValueError, match="batch_size"):
    streaming.image_stream(source, 0)
  with pytest.raises(ValueError, match="num_epochs"):
    streaming.image_stream(source, 8, num_epochs=0)
  with pytest.raises(ValueError, match="num_threads"):
    streaming.image_stream(source, 8, num_threads=-1)
  with pytest.raises(ValueError, match="ImageSource"):
    streaming.image_stream(digits.x, 8)
  with pytest.raises(ValueError, match="float32"):
    streaming.array_source(np.zeros((3, 2), np.float64))
  with pytest.raises(ValueError, match="labels"):
    streaming.array_source(digits.x, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="mnist.*ring"):
    streaming.image_source("imagenet", "train")


def test_closing_streams_closes_only_streams_even_on_error(digits, monkeypatch):
  source = streaming.array_source(digits.x)
  streams = [streaming.image_stream(source, 8), streaming.image_stream(source, 16)]
  closed = []
  for s in streams:
    monkeypatch.setattr(s, "close", functools.partial(closed.append, s))
  with pytest.raises(RuntimeError, match="training failed"):
    with streaming.closing_streams(streams[0], digits.x, None, streams[1]):
      next(streams[0])
      raise RuntimeError("training failed")
  assert closed == streams
  with streaming.closing_streams(digits.x):
    pass


# ---------------------------------------------------------------------------
# Folders of image files.


def _reference_decode(path, size, crop):
  """PIL decode, centre crop and bicubic resize, written out independently."""
  with Image.open(path) as pil:
    rgb = pil.convert("RGB")
  w, h = rgb.size
  side = min(w, h) if crop is None else min(crop, w, h)
  left, top = (w - side) // 2, (h - side) // 2
  square = rgb.crop((left, top, left + side, top + side))
  if side != size:
    square = square.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(square, np.float32) / 255.0


def _write_images(folder, count, np_rng):
  paths = []
  for i in range(count):
    h, w = int(np_rng.integers(20, 40)), int(np_rng.integers(20, 40))
    image = np_rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if i % 3 == 2:  # A grey-scale PNG: converted to RGB.
      pil = Image.fromarray(image[..., 0])
    else:
      pil = Image.fromarray(image)
    path = folder / f"img_{i:03d}.{'jpg' if i % 2 else 'png'}"
    pil.save(path)
    paths.append(path)
  (folder / "README.txt").write_text("not an image")
  return paths


def test_folder_stream_matches_pil(tmp_path, np_rng):
  paths = _write_images(tmp_path, 9, np_rng)
  source = streaming.folder_source(tmp_path, image_size=16, crop=18)
  assert source.num_examples == 9 and source.example_shape == (16, 16, 3)
  assert not source.has_labels
  out = _read(streaming.image_stream(source, 4, shuffle=False, num_threads=3))
  assert "label" not in out and out["image"].shape == (9, 16, 16, 3)
  for image, path in zip(out["image"], paths):
    np.testing.assert_allclose(image, _reference_decode(path, 16, 18),
                               atol=1e-6)
  shuffled = _read(streaming.image_stream(source, 4, seed=1))
  np.testing.assert_array_equal(shuffled["image"], out["image"][
      shuffled["index"]])
  assert not np.array_equal(shuffled["index"], np.arange(9))


def test_celeba_folder_stream_equals_load_dataset(tmp_path, np_rng):
  for i in range(7):
    image = np_rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / f"{i + 1:06d}.jpg", quality=90)
  for split in ("train", "test"):
    ref = data.load_dataset("celeba_folder", split, data_dir=tmp_path,
                            image_size=32)
    source = streaming.image_source("celeba_folder", split, data_dir=tmp_path,
                                    image_size=32)
    out = _read(streaming.image_stream(source, 4, shuffle=False))
    np.testing.assert_allclose(out["image"], ref.x, atol=1e-6)


def test_folder_bad_input(tmp_path, np_rng):
  with pytest.raises(data.DataNotFoundError, match="does not exist"):
    streaming.folder_source(tmp_path / "nope", image_size=8)
  with pytest.raises(data.DataNotFoundError, match="No .jpg"):
    streaming.folder_source(tmp_path, image_size=8)
  with pytest.raises(data.DataNotFoundError, match="does not exist"):
    streaming.image_source("celeba_folder", "train", data_dir=tmp_path / "x")
  with pytest.raises(ValueError, match="image_size"):
    streaming.folder_source(tmp_path, image_size=0)
  paths = _write_images(tmp_path, 6, np_rng)
  # A corrupt file among the others: raised, naming it, when its batch is read.
  paths[4].write_bytes(b"garbage")
  stream = streaming.image_stream(streaming.folder_source(
      tmp_path, image_size=8), 2, shuffle=False, num_threads=2)
  next(stream)
  with pytest.raises(data.DataCorruptError, match=paths[4].name):
    list(stream)
  # The first file corrupt: refused when the source is opened.
  paths[0].write_bytes(b"")
  with pytest.raises(data.DataCorruptError, match=paths[0].name):
    streaming.folder_source(tmp_path, image_size=8)


# ---------------------------------------------------------------------------
# TFDS.

_SHAPE = (7, 5, 3)
_SIZES = {"train": 23, "test": 4}


def _tiny_images(split):
  rng = np.random.default_rng(_SIZES[split] + 100)
  return [rng.integers(0, 256, _SHAPE, dtype=np.uint8)
          for _ in range(_SIZES[split])]


def _png(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


class LsotStreamImages(tfds.core.GeneratorBasedBuilder):
  """A tiny image set built into array_record without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=_SHAPE),
            "label": tfds.features.ClassLabel(num_classes=4),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in _SIZES}

  def _generate_examples(self, split):
    for i, image in enumerate(_tiny_images(split)):
      yield i, {"image": _png(image), "label": i % 4}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = LsotStreamImages(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return data_dir


def test_tfds_array_record_stream(tiny_tfds_dir):
  name = "tfds:lsot_stream_images"
  for kwargs in ({}, {"image_size": 4}, {"num_examples": 10}):
    ref = data.load_dataset(name, "train", data_dir=tiny_tfds_dir, **kwargs)
    source = streaming.image_source(name, "train", data_dir=tiny_tfds_dir,
                                    **kwargs)
    out = _read(streaming.image_stream(source, 5, shuffle=False,
                                       num_threads=2))
    np.testing.assert_array_equal(out["image"], ref.x)
    np.testing.assert_array_equal(out["label"], ref.labels)
  # Shuffled and resumed over real ArrayRecord reads.
  source = streaming.image_source(name, "train", data_dir=tiny_tfds_dir)
  make = functools.partial(streaming.image_stream, source, 4, seed=9,
                           num_epochs=2, drop_remainder=True)
  whole = list(make())
  stream = make()
  head = [next(stream) for _ in range(7)]
  fresh = make()
  fresh.set_state(stream.get_state())
  for got, want in zip(head + list(fresh), whole):
    np.testing.assert_array_equal(got["image"], want["image"])
  ref = data.load_dataset(name, "train", data_dir=tiny_tfds_dir)
  np.testing.assert_array_equal(whole[6]["image"], ref.x[
      train.epoch_permutation(9, 1, 23)[4:8]])


def test_tfds_mock_stream_equals_load_dataset():
  with mock_tfds.mock_data(num_examples=11):
    for name, kwargs in (("fashion_mnist", {}), ("celeb_a", {}),
                         ("cifar10", {"image_size": 16, "num_examples": 6})):
      ref = data.load_dataset(name, "train", **kwargs)
      source = streaming.image_source(name, "train", **kwargs)
      out = _read(streaming.image_stream(source, 4, shuffle=False))
      np.testing.assert_allclose(out["image"], ref.x, atol=1e-6)
      if ref.labels is None:
        assert "label" not in out
      else:
        np.testing.assert_array_equal(out["label"], ref.labels)
    assert source.example_shape == (16, 16, 3)


def test_tfds_missing_fails_with_the_build_command(tmp_path):
  with pytest.raises(data.DataNotFoundError,
                     match="tfds build celeb_a --file_format=array_record"):
    streaming.image_source("celeb_a", "train", data_dir=tmp_path)


@pytest.mark.slow
def test_worker_processes_match_threads(digits):
  source = streaming.array_source(digits.x, digits.labels)
  make = functools.partial(streaming.image_stream, source, 100, seed=6,
                           num_epochs=2, drop_remainder=True)
  want = list(make())
  stream = make(num_workers=2)
  head = [next(stream) for _ in range(9)]
  state = stream.get_state()
  stream.close()
  fresh = make(num_workers=2)
  fresh.set_state(state)
  got = head + list(fresh)
  fresh.close()
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.sort(g["index"]), np.sort(w["index"]))
    np.testing.assert_array_equal(g["index"], w["index"])
