"""Live progress of the solvers and TensorBoard tracking of the training loops.

Two independent pieces:

* :class:`ProgressLogger` consumes the records of a solver's progress ``callback``
  (:class:`lsot_jax.newton.NewtonSolver`, :class:`lsot_jax.solver.BrenierSolver`): a tqdm bar when stderr is a
  terminal, otherwise one ``logging`` line at most every ``log_every_s`` seconds (and at the last step), so
  a log file shows the fit advancing.
* A :class:`Tracker` writes scalars and images: :class:`TensorBoardTracker` into TensorBoard event files
  (tensorboardX, no TensorFlow), :class:`NullTracker` nowhere; :func:`make_tracker` picks one from a log
  directory or None. The training loops take one as ``tracker=`` (:mod:`lsot_jax.train`,
  :func:`lsot_jax.baselines.train_wgan_gp`); :func:`write_solver_history`, :func:`write_metrics` and
  :func:`write_sample_grid` write an OT fit, final metrics and samples. :func:`read_scalars` and
  :func:`read_images` read an event file back (a TFRecord reader with CRC checks, tensorboardX's protobufs).

Nothing here runs inside a jitted function: trackers are called on the host with fetched values.
"""
from __future__ import annotations

import glob
import logging
import math
import os
import struct
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple

import numpy as np
import tqdm

__all__ = [
    "NullTracker",
    "ProgressLogger",
    "TensorBoardTracker",
    "Tracker",
    "image_grid",
    "make_tracker",
    "read_images",
    "read_scalars",
    "write_history",
    "write_metrics",
    "write_sample_grid",
    "write_solver_history",
]

_LOG = logging.getLogger(__name__)

# Per-step solver histories written by `write_solver_history`: scalar name -> state fields to read, first
# one present wins (NewtonState / SolverState).
SOLVER_HISTORIES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("l1", ("errors",)),
    ("num_samples", ("sample_sizes", "batch_sizes")),
    ("energy", ("energies", "losses")),
    ("alpha", ("alphas",)),
    ("empty_cells", ("empty_cells",)),
)


# ---- progress ----------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


class ProgressLogger:
  """Shows solver progress records as a tqdm bar on a terminal, as periodic log lines otherwise.

  Pass it as a solver's ``callback``: ``NewtonSolver(callback=ProgressLogger(total=64, desc="ot"))``. A
  record is a dict with at least ``step`` (steps done); every other key is shown as ``key=value``. The bar's
  position is ``step``, so records from a resumed run continue it.

  Without a terminal the first record, then the first one at least ``log_every_s`` seconds after the last
  line, and the record that reaches ``total`` are logged at INFO level as
  ``"<desc>: step <step>/<total> key=value ..."``; :meth:`close` logs the last record if it was not.

  Args:
    total: the number of steps at most (the solver's ``num_iterations``).
    desc: the name at the start of the bar / each line.
    log_every_s: seconds between two log lines (0 logs every record).
    stream: where the bar goes and whose ``isatty()`` decides bar or log lines; default ``sys.stderr``.
    logger: the ``logging.Logger`` for the lines; default this module's.
  """

  def __init__(self, total: int, desc: str = "ot", log_every_s: float = 30.0, *, stream: Any = None,
               logger: Optional[logging.Logger] = None):
    if int(total) < 1:
      raise ValueError(f"ProgressLogger: total must be >= 1, got {total}.")
    if not log_every_s >= 0:
      raise ValueError(f"ProgressLogger: log_every_s must be >= 0, got {log_every_s}.")
    self.total, self.desc, self.log_every_s = int(total), str(desc), float(log_every_s)
    self._stream = sys.stderr if stream is None else stream
    self._logger = _LOG if logger is None else logger
    isatty = getattr(self._stream, "isatty", None)
    self.tty = bool(isatty()) if callable(isatty) else False
    self._bar = None
    self._last_line = -math.inf
    self._logged_last = True
    self.last_record: Optional[Dict[str, Any]] = None

  def __call__(self, record: Mapping[str, Any]) -> None:
    """Shows one record (a dict with ``step``)."""
    record = dict(record)
    if "step" not in record:
      raise ValueError(f"ProgressLogger: a record needs a 'step' entry, got keys {sorted(record)}.")
    self.last_record = dict(record)
    if self.tty:
      if self._bar is None:
        self._bar = tqdm.tqdm(total=self.total, desc=self.desc, unit="step", file=self._stream,
                              dynamic_ncols=True)
      step = int(record.pop("step"))
      self._bar.n = min(step, self.total)
      self._bar.set_postfix({k: _format_value(v) for k, v in sorted(record.items())}, refresh=False)
      self._bar.refresh()
      return
    now = time.monotonic()
    self._logged_last = False
    if now - self._last_line >= self.log_every_s or int(record["step"]) >= self.total:
      self._last_line = now
      self._log(record)

  def _log(self, record: Dict[str, Any]) -> None:
    record = dict(record)
    step = int(record.pop("step"))
    self._logger.info("%s: step %d/%d %s", self.desc, step, self.total,
                      " ".join(f"{k}={_format_value(v)}" for k, v in sorted(record.items())))
    self._logged_last = True

  def close(self) -> None:
    """Closes the bar (if any); without a terminal, logs the last record unless it was logged."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif not self._logged_last and self.last_record is not None:
      self._log(self.last_record)


# ---- trackers ----------------------------------------------------------------------------------------------


class Tracker(Protocol):
  """Where scalars and images go. ``step`` is an int; tags are ``prefix/name``."""

  def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
    """Writes every ``name: value`` as the scalar ``prefix/name`` at ``step``."""

  def image(self, tag: str, step: int, array: Any) -> None:
    """Writes an image: an array of shape [H, W], [H, W, C] or a batch [N, H, W, C] (shown as a grid)."""

  def close(self) -> None:
    """Flushes and closes."""


class NullTracker:
  """A :class:`Tracker` that writes nothing."""

  def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
    del step, values, prefix

  def image(self, tag: str, step: int, array: Any) -> None:
    del tag, step, array

  def close(self) -> None:
    pass


def _tag(prefix: str, name: str) -> str:
  return f"{prefix.rstrip('/')}/{name}" if prefix else str(name)


def image_grid(samples: Any, ncols: Optional[int] = None, pad: int = 1) -> np.ndarray:
  """Tiles a batch of images into one image, row by row.

  Args:
    samples: array of shape [N, H, W, C] (or [N, H, W]).
    ncols: images per row; default ceil(sqrt(N)).
    pad: pixels of background (0) between and around the images.

  Returns:
    Array of shape [rows * (H + pad) + pad, ncols * (W + pad) + pad, C], of the input's dtype.
  """
  x = np.asarray(samples)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[0] == 0:
    raise ValueError(f"image_grid: samples must have shape [N, H, W, C] with N >= 1, got {x.shape}.")
  n, h, w, c = x.shape
  ncols = int(math.ceil(math.sqrt(n))) if ncols is None else max(1, min(int(ncols), n))
  rows = -(-n // ncols)
  grid = np.zeros((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), x.dtype)
  for i in range(n):
    r, col = divmod(i, ncols)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top:top + h, left:left + w] = x[i]
  return grid


def _as_hwc_image(array: Any) -> np.ndarray:
  """uint8 array [H, W, 3 or 4] from [H, W], [H, W, C] or [N, H, W, C] (floats are taken in [0, 1])."""
  x = np.asarray(array)
  if x.ndim == 4:
    x = image_grid(x)
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image: array must have shape [H, W], [H, W, C] or [N, H, W, C] with C in (1, 3, 4), "
                     f"got {np.shape(array)}.")
  if x.dtype != np.uint8:
    x = np.asarray(np.round(np.clip(np.nan_to_num(x.astype(np.float64)), 0.0, 1.0) * 255.0), np.uint8)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x


class TensorBoardTracker:
  """A :class:`Tracker` writing TensorBoard event files into ``logdir`` (tensorboardX ``SummaryWriter``).

  Args:
    logdir: the directory (created); ``tensorboard --logdir`` on it (or a parent) shows the runs.
  """

  def __init__(self, logdir: str):
    import tensorboardX  # pylint: disable=import-outside-toplevel
    self.logdir = os.path.abspath(os.fspath(logdir))
    os.makedirs(self.logdir, exist_ok=True)
    self._writer = tensorboardX.SummaryWriter(logdir=self.logdir)

  def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
    for name, value in values.items():
      self._writer.add_scalar(_tag(prefix, name), float(value), global_step=int(step))

  def image(self, tag: str, step: int, array: Any) -> None:
    self._writer.add_image(tag, _as_hwc_image(array), global_step=int(step), dataformats="HWC")

  def flush(self) -> None:
    """Writes buffered events to disk."""
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def make_tracker(logdir: Optional[str]) -> Tracker:
  """A :class:`TensorBoardTracker` writing into ``logdir``, or a :class:`NullTracker` if it is None."""
  if logdir is None:
    return NullTracker()
  if not isinstance(logdir, (str, os.PathLike)) or not os.fspath(logdir):
    raise ValueError(f"make_tracker: logdir must be a directory path or None, got {logdir!r}.")
  return TensorBoardTracker(os.fspath(logdir))


# ---- writers for the library's outputs ---------------------------------------------------------------------


def write_history(tracker: Optional[Tracker], histories: Mapping[str, Any], prefix: str,
                  first_step: int = 1) -> None:
  """Writes per-step histories: entry j of each array is the scalar ``prefix/name`` at ``first_step + j``.

  Non-finite entries are written as they are (TensorBoard shows NaN); nothing is written when ``tracker``
  is None.

  Args:
    tracker: a :class:`Tracker` or None.
    histories: ``name -> array of shape [T]`` (all of one length T).
    prefix: the tag prefix.
    first_step: the step of entry 0.
  """
  if tracker is None:
    return
  arrays = {k: np.asarray(v, np.float64).reshape(-1) for k, v in histories.items()}
  lengths = {a.shape[0] for a in arrays.values()}
  if len(lengths) > 1:
    raise ValueError(f"write_history: histories must have one length, got "
                     f"{ {k: a.shape[0] for k, a in arrays.items()} }.")
  for j in range(lengths.pop() if lengths else 0):
    tracker.scalars(first_step + j, {k: a[j] for k, a in arrays.items()}, prefix)


def write_solver_history(tracker: Optional[Tracker], state: Any, prefix: str = "ot", start: int = 0) -> int:
  """Writes a solver state's per-step histories from step ``start`` on (a chunked fit writes each chunk).

  Step k (1-based: k steps done) gets ``prefix/l1`` (the step's L1 marginal error estimate),
  ``prefix/num_samples`` (its sample or batch size), ``prefix/energy`` and, for a
  :class:`~lsot_jax.newton.NewtonState`, ``prefix/alpha`` and ``prefix/empty_cells``: the histories the
  state holds (``errors``, ``sample_sizes`` / ``batch_sizes``, ``energies`` / ``losses``, ...).

  Args:
    tracker: a :class:`Tracker` or None (writes nothing).
    state: an unbatched solver state with ``it`` and preallocated histories.
    prefix: the tag prefix.
    start: steps already written (the return value of the previous call).

  Returns:
    The number of steps done, to pass as ``start`` next time.
  """
  if np.ndim(state.it) != 0:
    raise ValueError(f"write_solver_history: state must be unbatched (scalar it), got it of shape "
                     f"{np.shape(state.it)}; pick one element of a vmapped state first.")
  it = int(np.asarray(state.it))
  start = max(0, int(start))
  if tracker is None or it <= start:
    return it
  histories = {}
  for name, fields in SOLVER_HISTORIES:
    for field in fields:
      if hasattr(state, field):
        histories[name] = np.asarray(getattr(state, field))[start:it]
        break
  write_history(tracker, histories, prefix, first_step=start + 1)
  return it


def write_metrics(tracker: Optional[Tracker], step: int, metrics: Mapping[str, Any], prefix: str = "final") -> None:
  """Writes the finite real scalars of a (nested) metrics dict as ``prefix/key/subkey`` at ``step``.

  Non-numeric entries (strings, lists, None) are skipped, so ``metrics.json``'s dict can be passed whole.
  """
  if tracker is None:
    return
  flat: Dict[str, float] = {}

  def visit(name: str, value: Any) -> None:
    if isinstance(value, Mapping):
      for k, v in value.items():
        visit(_tag(name, str(k)), v)
    elif isinstance(value, (bool, np.bool_)):
      flat[name] = float(value)
    elif isinstance(value, (int, float, np.number)) or (isinstance(value, np.ndarray) and value.ndim == 0):
      if math.isfinite(float(value)):
        flat[name] = float(value)

  visit("", metrics)
  if flat:
    tracker.scalars(int(step), flat, prefix)


def write_sample_grid(tracker: Optional[Tracker], tag: str, samples: Any, step: int = 0,
                      ncols: Optional[int] = None) -> None:
  """Writes a batch of images (array [N, H, W, C], values in [0, 1] or uint8) as one grid image."""
  if tracker is None:
    return
  tracker.image(tag, int(step), image_grid(samples, ncols=ncols))


# ---- reading event files back ------------------------------------------------------------------------------


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC-32C: ((crc >> 15) | (crc << 17)) + 0xa282ead8, modulo 2^32."""
  from tensorboardX import crc32c  # pylint: disable=import-outside-toplevel
  crc = crc32c.crc32c(data) & 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: str):
  """The payloads of a TFRecord file (uint64 length, masked CRC of it, data, masked CRC of the data)."""
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    if pos + 12 > len(data):
      raise ValueError(f"{path}: truncated record header at byte {pos}.")
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    if _masked_crc32c(header) != length_crc:
      raise ValueError(f"{path}: bad length CRC at byte {pos}.")
    payload = data[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    if len(payload) != length or _masked_crc32c(payload) != data_crc:
      raise ValueError(f"{path}: bad or truncated record at byte {pos}.")
    yield payload
    pos += 16 + length


def read_scalars(logdir: str) -> Dict[str, List[Tuple[int, float]]]:
  """Reads the scalars of every event file in ``logdir`` (not recursive).

  Returns:
    ``tag -> [(step, value), ...]`` in file order (files sorted by name).
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  files = sorted(glob.glob(os.path.join(os.fspath(logdir), "events.out.tfevents.*")))
  if not files:
    raise FileNotFoundError(f"read_scalars: no TensorBoard event file in {logdir}.")
  out: Dict[str, List[Tuple[int, float]]] = {}
  for path in files:
    for payload in _records(path):
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        if value.WhichOneof("value") == "simple_value":
          out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
  return out


def read_images(logdir: str) -> Dict[str, List[Tuple[int, np.ndarray]]]:
  """The images of every event file in ``logdir``, decoded: ``tag -> [(step, uint8 array [H, W, C]), ...]``."""
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out: Dict[str, List[Tuple[int, np.ndarray]]] = {}
  for path in sorted(glob.glob(os.path.join(os.fspath(logdir), "events.out.tfevents.*"))):
    for payload in _records(path):
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        if value.WhichOneof("value") == "image":
          pixels = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
          out.setdefault(value.tag, []).append((int(event.step), pixels))
  return out
