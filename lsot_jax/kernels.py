"""Tiled power-diagram assignment: the hot loop of the semi-discrete solver.

For source points x [M, d], target codes y [n, d] and heights h [n], the assignment is

    idx[m] = argmax_i ( <x_m, y_i> + h_i ),       best[m] = max_i ( <x_m, y_i> + h_i ),

i.e. the power-diagram cell that contains x_m, and the value of the Brenier potential u_h at x_m. The score
matrix is never materialised: rows are processed in chunks (``row_chunk``) and targets in tiles
(``tile_size``) with a running max / argmax, so memory is O((M + n) d + row_chunk * tile_size).

Two reductions are available inside a tile:

* ``"argmax"``: ``jnp.max`` and ``jnp.argmax`` of the score tile. On GPUs and TPUs XLA fuses this well.
* ``"fused"`` (default on CPUs): XLA:CPU fuses ``dot -> elementwise -> reduce_max`` into one cache-blocked
  kernel, but not a variadic ``argmax`` reduction (that runs at ~10 % of the matmul rate at d = 64). The
  fused method therefore does two max-reductions: pass 1 computes the tile max m; pass 2 computes
  ``max_i( min(s_i - (m - band), 0) * 2**60 - i )``, whose value is ``-i*`` for the lowest index i* with
  ``s_i >= m - band``. Both passes are dot + elementwise + reduce_max, which XLA:CPU fuses. ``band`` is
  16 float32 ulps of the scores' scale (``eps * (|x| max_j |y_j| + max |h|)``, padded and masked targets excluded): the two passes may round
  differently, so scores that close to the max count as ties and the lowest such index wins. The result is
  therefore the float32 argmax up to rounding-level near-ties. Optimisation barriers keep both passes at
  run time and stop XLA from merging them into one materialised tile; a final clip keeps the index valid.

All functions are pure and jit-able; the caller jits. Shapes are static, so the tile loop is a ``lax.scan``.
"""
from __future__ import annotations

import functools
from typing import Literal, Optional, Tuple

import jax
import jax.numpy as jnp

__all__ = [
    "assign",
    "cell_histogram",
    "default_method",
    "scores",
]

Method = Literal["auto", "fused", "argmax"]

# Scale that separates "score equals the max" from "score is below the max" in the fused pass 2.
_SEPARATION = float(2.0**60)
# Width of the "equals the max" band of the fused pass 2, in units of eps * |x| max|y| + max|h|, a bound on
# the scale of the scores' rounding error.
_BAND_ULPS = 16.0
# Heights of padded (non-existent) targets: finite, so that max - pad stays finite.
_PAD_HEIGHT = -1e30


def default_method() -> str:
  """The reduction used by ``method="auto"``: ``"fused"`` on CPU, ``"argmax"`` elsewhere."""
  return "fused" if jax.default_backend() == "cpu" else "argmax"


def scores(x: jax.Array, y: jax.Array, h: jax.Array) -> jax.Array:
  """Dense scores ``x @ y.T + h`` (reference implementation; O(M n) memory).

  Args:
    x: Array of shape [M, d], source points.
    y: Array of shape [n, d], target codes.
    h: Array of shape [n], heights.

  Returns:
    Array of shape [M, n].
  """
  return jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST) + h[None, :]


def _tile_argmax(
    x: jax.Array, y: jax.Array, h: jax.Array, method: str
) -> Tuple[jax.Array, jax.Array]:
  """Max and argmax of the scores of one [Mc, T] tile. Returns ([Mc] float, [Mc] int32)."""
  if method != "argmax":
    # Both passes must round alike: without this barrier XLA constant-folds pass 1 when x and y are
    # compile-time constants (e.g. a DiscreteSource closed over in a jitted function) but not pass 2.
    x, y, h = jax.lax.optimization_barrier((x, y, h))
  s = jnp.matmul(x, y.T) + h[None, :]
  best = jnp.max(s, axis=1)
  if method == "argmax":
    return best, jnp.argmax(s, axis=1).astype(jnp.int32)
  iota = jnp.arange(y.shape[0], dtype=s.dtype)
  # The barrier stops XLA from merging the two identical matmuls into one materialised [Mc, T] tile.
  x2, y2, h2, best2 = jax.lax.optimization_barrier((x, y, h, best))
  s2 = jnp.matmul(x2, y2.T) + h2[None, :]
  # Scores within a rounding band of the max count as attaining it (the two passes may round differently
  # when XLA picks different kernels for them, e.g. a matrix-vector product for a one-row chunk).
  band = _BAND_ULPS * jnp.finfo(s.dtype).eps * (
      jnp.linalg.norm(x2, axis=1) * jnp.max(jnp.linalg.norm(y2, axis=1))
      + jnp.max(jnp.where(h2 > 0.5 * _PAD_HEIGHT, jnp.abs(h2), 0.0))
  )
  packed = jnp.minimum(s2 - (best2 - band)[:, None], 0.0) * _SEPARATION - iota[None, :]
  # Exact arithmetic gives an index in [0, T); the clip only guards against a pathological pass-2 rounding.
  idx = jnp.clip(-jnp.max(packed, axis=1), 0, y.shape[0] - 1).astype(jnp.int32)
  return best, idx


def _assign_rows(
    x: jax.Array,
    y_tiles: jax.Array,
    h_tiles: jax.Array,
    method: str,
) -> Tuple[jax.Array, jax.Array]:
  """Running max/argmax over target tiles for one row chunk x [Mc, d]."""
  num_tiles, tile, _ = y_tiles.shape
  if num_tiles == 1:
    return _tile_argmax(x, y_tiles[0], h_tiles[0], method)[::-1]

  def body(carry, inputs):
    best, idx = carry
    y_t, h_t, t = inputs
    tile_best, tile_idx = _tile_argmax(x, y_t, h_t, method)
    better = tile_best > best
    best = jnp.where(better, tile_best, best)
    idx = jnp.where(better, tile_idx + t * tile, idx)
    return (best, idx), None

  init = (
      jnp.full((x.shape[0],), -jnp.inf, dtype=x.dtype),
      jnp.zeros((x.shape[0],), dtype=jnp.int32),
  )
  (best, idx), _ = jax.lax.scan(
      body, init, (y_tiles, h_tiles, jnp.arange(num_tiles, dtype=jnp.int32))
  )
  return idx, best


def _pad_to(a: jax.Array, size: int, value) -> jax.Array:
  pad = size - a.shape[0]
  if pad == 0:
    return a
  widths = [(0, pad)] + [(0, 0)] * (a.ndim - 1)
  return jnp.pad(a, widths, constant_values=value)


@functools.partial(jax.named_call, name="lsot_assign")
def assign(
    x: jax.Array,
    y: jax.Array,
    h: jax.Array,
    *,
    tile_size: int = 8192,
    row_chunk: int = 4096,
    method: Method = "auto",
) -> Tuple[jax.Array, jax.Array]:
  """Power-diagram cell of each source point, without an [M, n] score matrix.

  Args:
    x: Array of shape [M, d], source points.
    y: Array of shape [n, d], target codes.
    h: Array of shape [n], heights.
    tile_size: Targets per tile (static).
    row_chunk: Source rows per chunk (static).
    method: ``"fused"``, ``"argmax"`` or ``"auto"`` (see the module docstring).

  Returns:
    A tuple ``(idx, best)``: ``idx`` int32 array of shape [M], the lowest index attaining the maximum score
    (float32 argmax), and ``best`` array of shape [M], the maximum score ``u_h(x)``.
  """
  if x.ndim != 2 or y.ndim != 2 or h.ndim != 1:
    raise ValueError(
        f"assign expects x [M, d], y [n, d], h [n]; got {x.shape}, {y.shape}, {h.shape}."
    )
  if x.shape[1] != y.shape[1] or y.shape[0] != h.shape[0]:
    raise ValueError(
        f"Shape mismatch: x {x.shape}, y {y.shape}, h {h.shape} (need x.shape[1] == y.shape[1] and "
        "y.shape[0] == h.shape[0])."
    )
  if method == "auto":
    method = default_method()
  if method not in ("fused", "argmax"):
    raise ValueError(f"Unknown assignment method {method!r}; use 'auto', 'fused' or 'argmax'.")
  dtype = jnp.result_type(x.dtype, y.dtype, h.dtype)
  x, y, h = x.astype(dtype), y.astype(dtype), h.astype(dtype)

  m, d = x.shape
  n = y.shape[0]
  tile = min(tile_size, n)
  num_tiles = -(-n // tile)
  y_tiles = _pad_to(y, num_tiles * tile, 0.0).reshape(num_tiles, tile, d)
  h_tiles = _pad_to(h, num_tiles * tile, _PAD_HEIGHT).reshape(num_tiles, tile)

  chunk = min(row_chunk, m)
  num_chunks = -(-m // chunk)
  if num_chunks == 1:
    return _assign_rows(x, y_tiles, h_tiles, method)
  x_chunks = _pad_to(x, num_chunks * chunk, 0.0).reshape(num_chunks, chunk, d)
  idx, best = jax.lax.map(
      lambda xc: _assign_rows(xc, y_tiles, h_tiles, method), x_chunks
  )
  return idx.reshape(-1)[:m], best.reshape(-1)[:m]


def cell_histogram(
    idx: jax.Array, num_cells: int, weights: Optional[jax.Array] = None
) -> jax.Array:
  """Fraction of source points (optionally weighted) that fall in each cell.

  Args:
    idx: int array of shape [M], cell indices from :func:`assign`.
    num_cells: n, the number of cells (static).
    weights: optional array of shape [M] of sample weights summing to 1; uniform 1/M if None.

  Returns:
    Array of shape [n] summing to 1: the Monte-Carlo estimate of the cell masses w(h).
  """
  if weights is None:
    weights = jnp.full(idx.shape, 1.0 / idx.shape[0], dtype=jnp.float32)
  return jax.ops.segment_sum(weights, idx, num_segments=num_cells)
