"""How the training loops of :mod:`lsot_jax.train` get their batches: from arrays in memory or from a stream.

Training step ``s = e * steps_per_epoch + p`` uses batch ``p`` of epoch ``e``'s order
:func:`lsot_jax.streaming.epoch_order` ``(seed, e, N)`` (``default_rng([seed, e]).permutation(N)``), in
batches of ``B`` with the last partial batch of every epoch dropped. Two feeds serve these batches:

* :class:`ArrayFeed`: arrays in memory, gathered by index (the whole split as float32 on the host).
* :class:`StreamFeed`: an :class:`lsot_jax.streaming.ImageStream` opened by :func:`training_stream`, which
  reads and decodes the same batches with grain (a few batches in memory). Its position
  (``ImageStream.get_state()``) goes into the checkpoint's JSON metadata (:meth:`StreamFeed.state`) and a
  resume restores it (:meth:`StreamFeed.restore`), so a killed-and-resumed streamed training continues the
  same stream.

Both feeds give the same batches for the same data, seed and batch size, so streamed training reaches the
in-memory training's parameters, and either may resume the other's checkpoint (a streamed resume of an
in-memory checkpoint reads the stream up to the checkpoint's step).

:func:`batched_apply` is the other direction: a jitted function applied to an array in fixed-size chunks;
:func:`classification_accuracy` applies a classifier to test arrays or a test stream. :func:`labelled_data`
checks a classifier's training data (arrays and labels, or a stream with labels).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from lsot_jax import streaming

__all__ = ["ArrayFeed", "StreamFeed", "batched_apply", "classification_accuracy", "float_array",
           "labelled_data", "make_feed", "training_data", "training_stream"]

_LOG = logging.getLogger(__name__)
Batch = Tuple[np.ndarray, ...]


def float_array(x: Any, shape: Tuple[int, ...], what: str) -> np.ndarray:
  """``x`` as a float32 array of shape [N, *shape] (ValueError naming ``what`` otherwise)."""
  x = np.asarray(x, np.float32)
  if x.ndim < 1 or tuple(x.shape[1:]) != tuple(shape):
    raise ValueError(f"{what} must have shape [N, {', '.join(map(str, shape))}], got {x.shape}.")
  return x


def training_data(x: Any, shape: Tuple[int, ...], what: str
                  ) -> Union[Tuple[np.ndarray], streaming.ImageStream]:
  """The training data of a loop: ``(float32 array [N, *shape],)``, or ``x`` itself if it is a stream.

  Raises:
    ValueError: an array of the wrong shape, or a stream whose examples are not of ``shape``.
  """
  if isinstance(x, streaming.ImageStream):
    if tuple(x.example_shape) != tuple(shape):
      raise ValueError(f"{what}: the stream's examples have shape {tuple(x.example_shape)}, the model takes "
                       f"{tuple(shape)}; open the source with the model's image size.")
    return x
  return (float_array(x, shape, what),)


def labelled_data(x: Any, labels: Any, shape: Tuple[int, ...], num_classes: int, split: str
                  ) -> Union[Tuple[np.ndarray, np.ndarray], streaming.ImageStream]:
  """A classifier's data: ``(float32 array [N, *shape], int32 labels [N])``, or ``x`` itself if it is a stream.

  Args:
    x: array [N, *shape], or a stream with labels (:class:`lsot_jax.streaming.ImageStream`).
    labels: int array [N] with values in [0, num_classes); None with a stream (it brings its own).
    shape: the model's input shape.
    num_classes: the number of classes.
    split: ``"train"`` or ``"test"``: error messages name ``x_<split>`` and ``labels_<split>``.

  Raises:
    ValueError: arrays of the wrong shape, labels of the wrong shape, dtype or range, or a stream without
      labels (or given labels besides its own).
  """
  what, name = f"x_{split}", f"labels_{split}"
  if isinstance(x, streaming.ImageStream):
    if labels is not None or not x.has_labels:
      raise ValueError(f"{what}: a stream must bring its own labels ({name} None), got "
                       f"{'a stream without labels' if labels is None else f'{name} besides the stream'}.")
    return training_data(x, shape, what)
  x = float_array(x, shape, what)
  lab = np.asarray(labels)
  if lab.shape != (x.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
    raise ValueError(f"{name} must be an int array of shape [{x.shape[0]}], got {lab.dtype} {lab.shape}.")
  if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, {num_classes}), got [{lab.min()}, {lab.max()}].")
  return x, lab.astype(np.int32)


def classification_accuracy(predict: Callable[[jax.Array], Any],
                            data: Union[Tuple[np.ndarray, np.ndarray], streaming.ImageStream],
                            batch_size: int = 1024) -> float:
  """The fraction of examples whose predicted class is their label.

  Args:
    predict: maps images [B, ...] to int classes [B] (jitted by the caller).
    data: ``(images [N, ...], int labels [N])``, applied in chunks of ``batch_size`` (:func:`batched_apply`),
      or a fresh one-epoch stream with labels that keeps every example (``streaming.image_stream(source,
      batch_size, shuffle=False)``), its last batch padded to the stream's batch size (one trace).

  Returns:
    The accuracy in [0, 1]: the same for arrays and for a stream of them.

  Raises:
    ValueError: a stream without labels, one not fresh, or one that does not visit each example once.
  """
  if not isinstance(data, streaming.ImageStream):
    x, labels = data
    return float(np.mean(batched_apply(predict, x, batch_size=batch_size) == labels))
  spec = data.spec
  if not data.has_labels or spec["num_epochs"] != 1 or spec["drop_remainder"] or data.position:
    raise ValueError("classification_accuracy needs a fresh one-epoch stream with labels that keeps every "
                     f"example: image_stream(source, batch_size, shuffle=False); got {spec} at batch "
                     f"{data.position}{'' if data.has_labels else ', without labels'}.")
  bs, correct, count = spec["batch_size"], 0, 0
  for batch in data:
    x, k = batch["image"], batch["image"].shape[0]
    if k < bs:
      x = np.concatenate([x, np.repeat(x[-1:], bs - k, axis=0)], axis=0)
    correct += int(np.sum(np.asarray(jax.device_get(predict(x)))[:k] == batch["label"]))
    count += k
  return correct / count


def training_stream(source: streaming.ImageSource, train_cfg: Any, *, num_threads: Optional[int] = None,
                    prefetch_batches: int = 2, num_workers: int = 0) -> streaming.ImageStream:
  """The stream a training loop with ``train_cfg`` reads: its seed, batch size and epochs, partial batches
  dropped, shuffled by :func:`lsot_jax.streaming.epoch_order`.

  Args:
    source: the training split (:func:`lsot_jax.streaming.image_source`, ``folder_source``,
      ``array_source``).
    train_cfg: a :class:`lsot_jax.train.TrainConfig` (``seed``, ``batch_size``, ``epochs`` are read).
    num_threads / prefetch_batches / num_workers: as :func:`lsot_jax.streaming.image_stream`.

  Returns:
    A fresh :class:`lsot_jax.streaming.ImageStream` of ``train_cfg.epochs`` epochs.
  """
  return streaming.image_stream(source, int(train_cfg.batch_size), int(train_cfg.seed), shuffle=True,
                                num_epochs=int(train_cfg.epochs), drop_remainder=True,
                                num_threads=num_threads, prefetch_batches=prefetch_batches,
                                num_workers=num_workers)


@dataclasses.dataclass
class ArrayFeed:
  """Batches gathered from arrays in memory.

  Attributes:
    arrays: arrays of the same length N (e.g. images [N, ...] and labels [N]).
    batch_size: B (already clipped to N).
    seed: the data order's seed.
  """

  arrays: Tuple[np.ndarray, ...]
  batch_size: int
  seed: int
  _order: Optional[np.ndarray] = dataclasses.field(default=None, init=False, repr=False)
  _order_epoch: int = dataclasses.field(default=-1, init=False, repr=False)

  @property
  def num_examples(self) -> int:
    """N."""
    return int(self.arrays[0].shape[0])

  @property
  def steps_per_epoch(self) -> int:
    """``N // B``."""
    return self.num_examples // self.batch_size

  def batch(self, step: int) -> Batch:
    """The arrays' rows of training step ``step`` (0-based), each of leading dimension B."""
    epoch, pos = divmod(int(step), self.steps_per_epoch)
    if epoch != self._order_epoch:
      self._order, self._order_epoch = streaming.epoch_order(self.seed, epoch, self.num_examples), epoch
    idx = self._order[pos * self.batch_size:(pos + 1) * self.batch_size]
    return tuple(a[idx] for a in self.arrays)

  def state(self) -> Optional[Dict[str, Any]]:
    """None: the position is the step count."""
    return None

  def restore(self, step: int, state: Optional[Dict[str, Any]]) -> None:
    """Nothing to restore (any checkpoint's stream state is not needed: batches are read by step)."""
    del step, state


class StreamFeed:
  """Batches read from an :class:`lsot_jax.streaming.ImageStream`, one per training step, in order.

  Args:
    stream: a fresh stream (position 0) of :func:`training_stream`'s settings.
    keys: the batch entries a step takes, in order (``("image",)``; ``("image", "label")`` for labels).
  """

  def __init__(self, stream: streaming.ImageStream, keys: Sequence[str] = ("image",)):
    self.stream = stream
    self.keys = tuple(keys)

  @property
  def num_examples(self) -> int:
    """N."""
    return self.stream.num_examples

  @property
  def batch_size(self) -> int:
    """B."""
    return self.stream.batch_size

  @property
  def seed(self) -> int:
    """The data order's seed."""
    return int(self.stream.spec["seed"])

  @property
  def steps_per_epoch(self) -> int:
    """``N // B``."""
    return self.stream.batches_per_epoch

  def batch(self, step: int) -> Batch:
    """The stream's next batch, which is that of training step ``step``.

    Raises:
      ValueError: the stream is not at ``step`` (it was read elsewhere) or ended before it.
    """
    if self.stream.position != step:
      raise ValueError(f"the training stream is at batch {self.stream.position}, not at step {step}: do not "
                       "read the stream passed to a training loop elsewhere.")
    try:
      batch = next(self.stream)
    except StopIteration:
      raise ValueError(f"the training stream ended at batch {step}; open it with num_epochs >= the "
                       "training's epochs (feeds.training_stream).") from None
    return tuple(batch[k] for k in self.keys)

  def state(self) -> Dict[str, Any]:
    """The stream's position, JSON-able (:meth:`lsot_jax.streaming.ImageStream.get_state`)."""
    return self.stream.get_state()

  def restore(self, step: int, state: Optional[Dict[str, Any]]) -> None:
    """Moves the fresh stream to training step ``step``: ``set_state(state)``, or, for a checkpoint written
    without a stream (``state`` None), reading ``step`` batches.

    Raises:
      ValueError: the state is not at ``step``, or was written by a stream of other settings.
    """
    if state is None:
      if step:
        _LOG.info("resuming a checkpoint of in-memory training from a stream: reading %d batches.", step)
      for s in range(step):
        self.batch(s)
      return
    self.stream.set_state(state)
    if self.stream.position != step:
      raise ValueError(f"the checkpoint of step {step} holds a stream state at batch {self.stream.position}.")


Feed = Union[ArrayFeed, StreamFeed]


def make_feed(stage: str, data: Union[Sequence[np.ndarray], streaming.ImageStream], train_cfg: Any,
              keys: Sequence[str] = ("image",)) -> Feed:
  """The feed of a training loop: :class:`ArrayFeed` over arrays, :class:`StreamFeed` over a stream.

  Args:
    stage: the training stage's name (for error messages).
    data: arrays of the same length N, or a fresh :class:`lsot_jax.streaming.ImageStream` opened with
      ``train_cfg``'s settings (:func:`training_stream`).
    train_cfg: the loop's :class:`lsot_jax.train.TrainConfig`.
    keys: the stream's batch entries a step takes.

  Raises:
    ValueError: empty or unequal arrays, or a stream that is not fresh or whose settings (seed, batch size,
      shuffle, drop_remainder, epochs) differ from the training's, naming the fields.
  """
  if not isinstance(data, streaming.ImageStream):
    arrays = tuple(data)
    n = int(arrays[0].shape[0])
    if n == 0 or any(a.shape[0] != n for a in arrays):
      raise ValueError(f"{stage}: training arrays must be non-empty and have the same length, "
                       f"got {[a.shape[0] for a in arrays]}.")
    return ArrayFeed(arrays, min(int(train_cfg.batch_size), n), int(train_cfg.seed))
  spec = data.spec
  epochs = spec["num_epochs"]
  wanted = {"seed": int(train_cfg.seed), "batch_size": min(int(train_cfg.batch_size), spec["num_examples"]),
            "shuffle": True, "drop_remainder": True}
  differ = [f"{k}={spec[k]!r} (training needs {v!r})" for k, v in wanted.items() if spec[k] != v]
  if epochs is not None and epochs < int(train_cfg.epochs):
    differ.append(f"num_epochs={epochs!r} (training needs >= {train_cfg.epochs})")
  if differ:
    raise ValueError(f"{stage}: the training stream has {', '.join(differ)}; open it with "
                     "feeds.training_stream(source, train_cfg).")
  if data.position:
    raise ValueError(f"{stage}: the training stream was already read ({data.position} batches); pass a fresh "
                     "one (a resume restores its position from the checkpoint).")
  if "label" in keys and not data.has_labels:
    raise ValueError(f"{stage}: the training stream has no labels.")
  return StreamFeed(data, keys)


def batched_apply(fn: Callable[[jax.Array], Any], x: np.ndarray, batch_size: int = 1024) -> Any:
  """Applies a batch function over ``x`` in fixed-size chunks (the last one padded), concatenating outputs.

  Args:
    fn: maps an Array of shape [B, ...] to a pytree of Arrays with leading dimension B; jit it yourself.
    x: array of shape [N, ...].
    batch_size: chunk size B (clipped to N).

  Returns:
    The pytree of outputs with leading dimension N, as NumPy arrays.
  """
  x = np.asarray(x)
  n = x.shape[0]
  if n == 0:
    raise ValueError("batched_apply needs at least one example.")
  bs = max(1, min(int(batch_size), n))
  outs = []
  for start in range(0, n, bs):
    chunk = x[start:start + bs]
    pad = bs - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)], axis=0)
    out = jax.device_get(fn(chunk))
    outs.append(jax.tree.map(lambda a, k=bs - pad: np.asarray(a)[:k], out))
  return jax.tree.map(lambda *a: np.concatenate(a, axis=0), *outs)
