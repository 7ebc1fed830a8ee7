"""Streamed image data with grain: bounded memory, parallel decode, resumable.

:mod:`lsot_jax.data` reads a whole split into one float32 array (CelebA at
64 x 64 is about 8 GB). This module reads the same examples batch by batch
through a `grain <https://github.com/google/grain>`_ pipeline instead::

  records (random access) -> epoch order -> decode + crop/resize -> batch
      -> repeat(num_epochs) -> threads (or worker processes) prefetching

* Sources (:class:`ImageSource`): a prepared TFDS split read with
  ``tfds.data_source`` (ArrayRecord, random access, no TensorFlow), a folder
  of JPEG/PNG files (decoded and resized where the batch is built), or
  arrays already in memory. :func:`image_source` opens them by the names of
  :func:`lsot_jax.data.load_dataset`, with the same decoding
  (:func:`lsot_jax.data.decode_tfds_example`,
  :func:`lsot_jax.data.decode_image_file`), so a stream's values equal the
  in-memory loader's.
* Random access: :func:`head` (the first examples, as a source),
  :func:`gather` (a few examples by index) and :func:`source_labels` (the
  labels alone) read no more than they return.
* Order: epoch ``e`` visits :func:`epoch_order` ``(seed, e, N)``, the
  permutation :func:`lsot_jax.train.epoch_permutation` uses (or ``0..N-1``
  with ``shuffle=False``), cut into batches per epoch (a batch never spans
  two epochs; ``drop_remainder`` drops the last partial one, as training
  does). Deterministic for a seed, whatever the number of threads.
* Memory: the records' index (file names, or TFDS's ArrayRecord index), one
  permutation of N int64 per epoch in flight, and ``prefetch_batches`` decoded
  batches; never the whole split as float32.
* Position (:class:`ImageStream`, a ``grain.DatasetIterator``):
  ``get_state()`` is a JSON-able dict (grain's own iterator state, the batch
  count and the stream's settings); ``set_state`` on a fresh stream with the
  same settings continues the same stream, and refuses a state written by
  other settings. The stream works with grain's Orbax handler
  (``grain.checkpoint.CheckpointSave(stream)``) and the state fits in the
  JSON metadata of :class:`lsot_jax.checkpoint.StageCheckpointer`.

Batches are dicts of NumPy arrays: ``"image"`` float32 [B, H, W, C] in
[0, 1] (or [B, D] for point sets), ``"index"`` int64 [B] (positions in the
split) and, when the source has labels, ``"label"`` int32 [B].
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib
import threading
from typing import Any, Callable, Iterator, Sequence

from absl import flags
import grain
import numpy as np

from lsot_jax import data as data_lib

__all__ = [
    "ImageSource",
    "ImageStream",
    "array_source",
    "epoch_order",
    "folder_source",
    "gather",
    "head",
    "image_source",
    "image_stream",
    "source_labels",
    "stream_codes",
]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_STATE_KEYS = ("grain", "position", "spec")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSource:
  """Random-access examples and how to decode them.

  Attributes:
    records: a sequence-like object (``len`` and ``[i]``, grain's
      ``RandomAccessDataSource`` protocol) of raw records: TFDS example
      dicts, file paths, or ``(x, label)`` pairs.
    decode: picklable callable, raw record -> ``(x, label)``: float32 array
      of shape ``example_shape`` and an int label or None.
    example_shape: shape of one decoded example, e.g. (H, W, C).
    has_labels: whether every example has an int label.
    name: what the source was opened by (recorded in stream states).
  """

  records: Sequence[Any]
  decode: Callable[[Any], tuple[np.ndarray, int | None]]
  example_shape: tuple[int, ...]
  has_labels: bool
  name: str

  @property
  def num_examples(self) -> int:
    """Number of examples N."""
    return len(self.records)


def _check_positive(value, what: str, allow_none: bool = True):
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
      value < 1):
    raise ValueError(
        f"{what} must be a positive integer{' or None' if allow_none else ''},"
        f" got {value!r}.")
  return int(value)


class _Prefix:
  """The first ``n`` records of a random-access source (picklable), with its
  length fixed once."""

  def __init__(self, records, n: int):
    self._records, self._n = records, min(int(n), len(records))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int):
    if not 0 <= index < self._n:
      raise IndexError(f"record {index} out of range [0, {self._n}).")
    return self._records[index]


def _decode_file(path, size, crop):
  return data_lib.decode_image_file(path, size, crop), None


def _decode_array(record):
  return record


class _ArrayRecords:
  """``(x[i], labels[i] or None)`` of in-memory arrays."""

  def __init__(self, x: np.ndarray, labels: np.ndarray | None):
    self._x, self._labels = x, labels

  def __len__(self) -> int:
    return int(self._x.shape[0])

  @property
  def labels(self) -> np.ndarray | None:
    """The labels [N], or None."""
    return self._labels

  def __getitem__(self, index: int):
    label = None if self._labels is None else int(self._labels[index])
    return self._x[index], label


def _from_records(records, decode, name: str) -> ImageSource:
  """Decodes record 0 (fails fast on bad data) to learn shape and labels."""
  if len(records) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"Source {name!r} has no examples.")
  x, label = decode(records[0])
  return ImageSource(records=records, decode=decode,
                     example_shape=tuple(np.shape(x)),
                     has_labels=label is not None, name=name)


def array_source(x: np.ndarray, labels: np.ndarray | None = None, *,
                 name: str = "array") -> ImageSource:
  """A source over arrays already in memory (no copy).

  Args:
    x: float32 array of shape [N, ...] (images [N, H, W, C] or points [N, D]).
    labels: int array of shape [N], or None.
    name: recorded in stream states.

  Returns:
    The :class:`ImageSource`.
  """
  x = np.asarray(x)
  if x.dtype != np.float32 or x.ndim < 2:
    raise ValueError(
        f"x must be a float32 array of shape [N, ...], got {x.dtype} "
        f"{x.shape}.")
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != x.shape[:1]:
      raise ValueError(
          f"labels must have shape {x.shape[:1]}, got {labels.shape}.")
  return _from_records(_ArrayRecords(x, labels), _decode_array, name)


def folder_source(folder: str | os.PathLike, *, image_size: int,
                  crop: int | None = None,
                  num_examples: int | None = None) -> ImageSource:
  """A source over the JPEG/PNG files of a folder (sorted by name).

  Each file is decoded to RGB, centre-cropped (``crop``, None: the shorter
  side) and resized to ``image_size`` with :func:`lsot_jax.data.
  decode_image_file` when its batch is built.

  Args:
    folder: the folder (not searched recursively).
    image_size: output side S; examples are float32 [S, S, 3] in [0, 1].
    crop: centre-crop side before resizing.
    num_examples: keep only the first files.

  Returns:
    The :class:`ImageSource` (its records are the file paths).

  Raises:
    DataNotFoundError: the folder is missing or holds no .jpg/.jpeg/.png.
    DataCorruptError: the first file cannot be decoded (later ones raise it
      when their batch is read).
  """
  image_size = _check_positive(image_size, "image_size", allow_none=False)
  crop = _check_positive(crop, "crop")
  num_examples = _check_positive(num_examples, "num_examples")
  path = pathlib.Path(folder).expanduser()
  if not path.is_dir():
    raise data_lib.DataNotFoundError(
        f"Image folder {path} does not exist; pass a folder of .jpg/.jpeg/.png "
        "files.")
  files = sorted(os.fspath(p) for p in path.iterdir()
                 if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
  if not files:
    raise data_lib.DataNotFoundError(
        f"No .jpg/.jpeg/.png images in {path}; put the images there.")
  decode = functools.partial(_decode_file, size=image_size, crop=crop)
  return _from_records(files[:num_examples], decode, f"folder:{path}")


def image_source(name: str, split: str, *,
                 data_dir: str | os.PathLike | None = None,
                 num_examples: int | None = None,
                 image_size: int | None = None, seed: int = 0) -> ImageSource:
  """Opens a dataset by the names of :func:`lsot_jax.data.load_dataset`.

  TFDS sets (``fashion_mnist``, ``cifar10``, ``celeb_a``, ``tfds:<name>``)
  are read record by record from ``tfds.data_source``; ``celeba_folder``
  file by file (crop 140, size 64 by default); the small sets (``mnist``,
  ``digits``, the toys) are loaded by ``load_dataset`` and served from
  memory. The arguments mean what they mean there, and the examples equal
  ``load_dataset(...).x`` in the same order.

  Args:
    name: the dataset name.
    split: the split (TFDS split strings for TFDS sets).
    data_dir: where the data lives (see ``load_dataset``).
    num_examples: keep only the first ``num_examples`` examples.
    image_size: resize (and centre-crop) images to this side.
    seed: the toy generators' seed.

  Returns:
    The :class:`ImageSource`.

  Raises:
    DataNotFoundError, DataCorruptError, ValueError: as ``load_dataset``.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a non-empty string, got {name!r}.")
  num_examples = _check_positive(num_examples, "num_examples")
  image_size = _check_positive(image_size, "image_size")
  prefix = "tfds:"
  if name.startswith(prefix) or name in data_lib.TFDS_NAMES:
    tfds_name = name[len(prefix):] if name.startswith(prefix) else name
    if not tfds_name:
      raise ValueError("Give a TFDS dataset name after 'tfds:'.")
    opened = data_lib.open_tfds_images(tfds_name, split, data_dir, image_size)
    # The wrapper also keeps grain from calling the source's len() per read.
    records = _Prefix(opened.source, num_examples or len(opened.source))
    decode = functools.partial(data_lib.decode_tfds_example,
                               image_size=opened.image_size,
                               crop=opened.crop)
    return _from_records(records, decode, name)
  if name == "celeba_folder":
    files = data_lib.celeba_folder_files(data_dir, split, num_examples)
    decode = functools.partial(
        _decode_file, size=image_size or data_lib.CELEBA_SIZE,
        crop=data_lib.CELEBA_CROP)
    return _from_records([os.fspath(f) for f in files], decode, name)
  ds = data_lib.load_dataset(name, split, data_dir=data_dir,
                             num_examples=num_examples, seed=seed,
                             image_size=image_size)
  return array_source(ds.x, ds.labels, name=name)


def head(source: ImageSource, num_examples: int) -> ImageSource:
  """The first ``num_examples`` examples of a source (all of them when it has
  fewer), as a source: nothing is read.

  Args:
    source: the :class:`ImageSource`.
    num_examples: how many to keep, a positive integer.

  Returns:
    The :class:`ImageSource` over records ``0..min(num_examples, N) - 1``.
  """
  num_examples = _check_positive(num_examples, "num_examples",
                                 allow_none=False)
  return dataclasses.replace(source,
                             records=_Prefix(source.records, num_examples))


def gather(source: ImageSource, indices: Sequence[int]) -> np.ndarray:
  """Decodes the examples at ``indices`` (random access: only those are
  read), e.g. a few training images to show.

  Args:
    source: the :class:`ImageSource`.
    indices: int positions in the split, shape [K].

  Returns:
    float32 array of shape [K, *example_shape], row ``k`` example
    ``indices[k]``.

  Raises:
    IndexError: an index outside ``[0, N)``.
  """
  indices = np.asarray(indices, np.int64).reshape(-1)
  n = source.num_examples
  if indices.size and (indices.min() < 0 or indices.max() >= n):
    raise IndexError(f"indices must lie in [0, {n}), got [{indices.min()}, "
                     f"{indices.max()}].")
  decode = _DecodeExample(source)
  rows = [decode((int(i), source.records[int(i)]))["image"] for i in indices]
  return np.stack(rows) if rows else np.zeros(
      (0,) + source.example_shape, np.float32)


def source_labels(source: ImageSource, batch_size: int = 1024,
                  num_threads: int | None = None) -> np.ndarray | None:
  """The labels of every example of a source, in dataset order.

  An :func:`array_source` hands its labels back; other sources are read once
  (one unshuffled epoch, images decoded and dropped batch by batch).

  Args:
    source: the :class:`ImageSource`.
    batch_size: examples per batch of that epoch.
    num_threads: as :func:`image_stream`.

  Returns:
    int32 array of shape [N], or None when the source has no labels.
  """
  if not source.has_labels:
    return None
  if isinstance(source.records, _ArrayRecords):
    return np.asarray(source.records.labels, np.int32)
  labels = np.empty((source.num_examples,), np.int32)
  for batch in image_stream(source, batch_size, shuffle=False,
                            num_threads=num_threads):
    labels[batch["index"]] = batch["label"]
  return labels


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of epoch ``epoch``: ``default_rng([seed, epoch]).permutation``.

  The same permutation as :func:`lsot_jax.train.epoch_permutation`, so a
  stream visits the examples in the order the in-memory training loop does.

  Returns:
    int64 array of shape [num_examples], a permutation of its range.
  """
  return np.random.default_rng([int(seed), int(epoch)]).permutation(
      int(num_examples))


class _EpochOrderMapDataset(grain.MapDataset):
  """Index ``e * N + i`` -> ``(j, parent[j])`` with ``j = order_e[i]``.

  ``BatchMapDataset`` followed by ``RepeatMapDataset`` asks for indices past
  N (epoch ``e`` at offset ``e * N``); the two latest permutations are
  cached (threads prefetching across an epoch boundary use both).
  """

  def __init__(self, parent: grain.MapDataset, seed: int, shuffle: bool):
    super().__init__(parent)
    self._seed, self._shuffle, self._n = int(seed), bool(shuffle), len(parent)
    self._orders: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._n

  def __str__(self) -> str:
    return f"EpochOrderMapDataset(seed={self._seed}, shuffle={self._shuffle})"

  def __getstate__(self):
    state = self.__dict__.copy()
    state.pop("_lock")
    state["_orders"] = {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _order(self, epoch: int) -> np.ndarray:
    with self._lock:
      order = self._orders.get(epoch)
      if order is None:
        order = epoch_order(self._seed, epoch, self._n)
        self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
        self._orders[epoch] = order
      return order

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(int(index), self._n)
    j = int(self._order(epoch)[i]) if self._shuffle else i
    return j, self._parent[j]


class _DecodeExample:
  """``(index, record)`` -> ``{"image", "index"[, "label"]}`` (picklable)."""

  def __init__(self, source: ImageSource):
    self._decode = source.decode
    self._shape = source.example_shape
    self._labels = source.has_labels
    self._name = source.name

  def __call__(self, item):
    index, record = item
    x, label = self._decode(record)
    x = np.asarray(x, np.float32)
    if x.shape != self._shape:
      raise ValueError(
          f"Example {index} of {self._name!r} has shape {x.shape}, the first "
          f"has {self._shape}; pass image_size to resize them all.")
    out = {"image": x, "index": np.int64(index)}
    if self._labels:
      out["label"] = np.int32(label)
    return out


class ImageStream(grain.DatasetIterator):
  """An iterator of batches with a saveable position (see module docstring).

  Made by :func:`image_stream`. ``next(stream)`` returns a dict of NumPy
  arrays: ``"image"`` float32 [B, *example_shape], ``"index"`` int64 [B] and
  optionally ``"label"`` int32 [B]; ``B`` is ``batch_size`` except for the
  last batch of an epoch when ``drop_remainder`` is False.
  """

  def __init__(self, parent: grain.DatasetIterator, spec: dict[str, Any],
               example_shape: tuple[int, ...], has_labels: bool):
    super().__init__(parent)
    self._spec = dict(spec)
    self._position = 0
    self.example_shape = example_shape
    self.has_labels = has_labels

  def __str__(self) -> str:
    return f"ImageStream({self._spec})"

  @property
  def spec(self) -> dict[str, Any]:
    """The settings a state must match: source, N, batch size, seed, ..."""
    return dict(self._spec)

  @property
  def num_examples(self) -> int:
    """N, the examples per epoch."""
    return self._spec["num_examples"]

  @property
  def batch_size(self) -> int:
    """B (clipped to N)."""
    return self._spec["batch_size"]

  @property
  def batches_per_epoch(self) -> int:
    """``N // B`` with ``drop_remainder``, else ``ceil(N / B)``."""
    return self._spec["batches_per_epoch"]

  @property
  def num_batches(self) -> int | None:
    """Total batches of the stream, None when it repeats forever."""
    epochs = self._spec["num_epochs"]
    return None if epochs is None else epochs * self.batches_per_epoch

  @property
  def position(self) -> int:
    """Batches returned so far (including those before a restored state)."""
    return self._position

  @property
  def epoch(self) -> int:
    """The epoch of the next batch (0-based)."""
    return self._position // self.batches_per_epoch

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    self._position += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """The position: ``{"grain": ..., "position": int, "spec": {...}}``."""
    return {"grain": self._parent.get_state(), "position": self._position,
            "spec": dict(self._spec)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a state of :meth:`get_state` (same settings).

    Raises:
      ValueError: the state is not one of a stream, or was written by a
        stream with other settings (the message names the fields).
    """
    if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
      raise ValueError(
          f"stream state must be a dict with keys {_STATE_KEYS} (from "
          f"ImageStream.get_state), got {state!r:.200}.")
    differ = sorted(k for k in set(state["spec"]) | set(self._spec)
                    if state["spec"].get(k) != self._spec.get(k))
    if differ:
      fields = ", ".join(f"{k}: saved {state['spec'].get(k)!r}, here "
                         f"{self._spec.get(k)!r}" for k in differ)
      raise ValueError(
          f"stream state was saved by a stream with other settings ({fields});"
          " open the stream with the saved settings or start a fresh one.")
    self._parent.set_state(state["grain"])
    self._position = int(state["position"])


@contextlib.contextmanager
def closing_streams(*data: Any) -> Iterator[None]:
  """Closes every :class:`ImageStream` among ``data`` when the block ends, however it ends.

  Training functions take either arrays or a stream; the caller that opened the stream owns it. Its reader
  threads stop here even when training raises.

  Args:
    *data: anything; only the ImageStreams are closed.
  """
  try:
    yield
  finally:
    for item in data:
      if isinstance(item, ImageStream):
        item.close()


def image_stream(source: ImageSource, batch_size: int, seed: int = 0, *,
                 shuffle: bool = True, num_epochs: int | None = 1,
                 drop_remainder: bool = False, num_threads: int | None = None,
                 prefetch_batches: int = 2,
                 num_workers: int = 0) -> ImageStream:
  """A deterministic, resumable stream of batches over ``source``.

  Args:
    source: the :class:`ImageSource`.
    batch_size: B (clipped to N, as in :mod:`lsot_jax.train`).
    seed: epoch ``e`` visits ``epoch_order(seed, e, N)``.
    shuffle: False visits ``0..N-1`` every epoch.
    num_epochs: epochs to stream; None repeats forever.
    drop_remainder: drop the last partial batch of every epoch (training);
      keep it for encoding every example.
    num_threads: threads building batches in parallel (decode and resize
      release the GIL); default ``min(4, cpu_count)``; 0 builds them in the
      caller's thread.
    prefetch_batches: batches decoded ahead (at least ``num_threads``):
      with the batch in hand, the stream holds this many + 1 batches.
    num_workers: worker processes (grain's ``mp_prefetch``) instead of
      threads when > 0; a state restores only into the same number. Outside
      ``absl.app`` this marks absl's flags parsed (grain reads one).

  Returns:
    The :class:`ImageStream`.
  """
  if not isinstance(source, ImageSource):
    raise ValueError(
        f"source must be an ImageSource (image_source, folder_source, "
        f"array_source), got {type(source).__name__}.")
  batch_size = _check_positive(batch_size, "batch_size", allow_none=False)
  num_epochs = _check_positive(num_epochs, "num_epochs")
  prefetch_batches = _check_positive(prefetch_batches, "prefetch_batches",
                                     allow_none=False)
  for value, what in ((num_threads, "num_threads"),
                      (num_workers, "num_workers")):
    if value is not None and (isinstance(value, bool) or not isinstance(
        value, (int, np.integer)) or value < 0):
      raise ValueError(f"{what} must be a non-negative integer, got {value!r}.")
  if num_threads is None:
    num_threads = min(4, os.cpu_count() or 1)
  n = source.num_examples
  bs = min(batch_size, n)
  ds = grain.MapDataset.source(source.records)
  ds = _EpochOrderMapDataset(ds, seed, shuffle).map(_DecodeExample(source))
  ds = ds.batch(bs, drop_remainder=drop_remainder)
  spec = {"source": source.name, "num_examples": n, "batch_size": bs,
          "seed": int(seed), "shuffle": bool(shuffle),
          "drop_remainder": bool(drop_remainder), "num_epochs": num_epochs,
          "batches_per_epoch": len(ds), "num_workers": int(num_workers)}
  ds = ds.repeat(num_epochs)
  read = grain.ReadOptions(num_threads=int(num_threads),
                           prefetch_buffer_size=max(prefetch_batches,
                                                    int(num_threads)))
  it_ds = ds.to_iter_dataset(read)
  if num_workers:
    if not flags.FLAGS.is_parsed():
      # grain's worker start reads an absl flag, which raises before absl
      # parsed a command line (outside absl.app): use the flags' defaults.
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(num_workers), per_worker_buffer_size=1))
  return ImageStream(iter(it_ds), spec, source.example_shape,
                     source.has_labels)


def stream_codes(encode_fn: Callable[[np.ndarray], Any],
                 stream: ImageStream) -> np.ndarray:
  """Encodes one epoch of a stream into codes in dataset order.

  The last partial batch is padded to B (repeating its last example) so a
  jitted ``encode_fn`` compiles once; padded rows are dropped.

  Args:
    encode_fn: maps float32 [B, *example_shape] to codes [B, ...] (a jitted
      encoder; NumPy or JAX arrays).
    stream: a fresh stream of one epoch with ``drop_remainder=False``
      (``image_stream(source, B, shuffle=False)`` reads in file order).

  Returns:
    float32 array of shape [N, ...]: row ``i`` is example ``i``'s code.
  """
  if not isinstance(stream, ImageStream):
    raise ValueError(
        f"stream must be an ImageStream, got {type(stream).__name__}.")
  spec = stream.spec
  if spec["num_epochs"] != 1 or spec["drop_remainder"] or stream.position:
    raise ValueError(
        "stream_codes needs a fresh one-epoch stream that keeps every example:"
        " image_stream(source, batch_size, num_epochs=1, drop_remainder=False)"
        f"; got {spec} at batch {stream.position}.")
  n, bs = spec["num_examples"], spec["batch_size"]
  codes = None
  for batch in stream:
    images, index = batch["image"], batch["index"]
    k = images.shape[0]
    if k < bs:
      images = np.concatenate([images, np.repeat(images[-1:], bs - k, 0)])
    out = np.asarray(encode_fn(images), np.float32)[:k]
    if codes is None:
      codes = np.empty((n,) + out.shape[1:], np.float32)
    codes[index] = out
  return codes
