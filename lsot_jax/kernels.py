"""Tiled power-diagram assignment: the hot loop of the semi-discrete solver.

For source points x [M, d], target codes y [n, d] and heights h [n], the assignment is

    idx[m] = argmax_i ( <x_m, y_i> + h_i ),       best[m] = max_i ( <x_m, y_i> + h_i ),

i.e. the power-diagram cell that contains x_m, and the value of the Brenier potential u_h at x_m. The score
matrix is never materialised: rows are processed in chunks (``row_chunk``) and targets in tiles
(``tile_size``) with a running reduction, so memory is O((M + n) d + row_chunk * tile_size).

Three reductions are available:

* ``"topk"`` (default on CPUs): :func:`top_k` with k = 1. Each [256, 2048] score tile is materialised (it stays
  in cache) and reduced by two plain float reductions (the max, then the lowest index attaining it), tiles
  merged by a running max. On the 2-core CPUs at d = 64 it runs at 44 % (Xeon) to 50-58 % (AMD EPYCs) of the
  dense matmul rate, against 30 % to 37 % for ``"fused"`` (``python benchmarks/bench_newton_kernels.py``).
  The result is the lowest index attaining the float32 maximum, as ``"argmax"``.
* ``"argmax"``: ``jnp.max`` and ``jnp.argmax`` of each score tile, tiles combined by an exact running max
  (lowest tile on exact ties). The result is the lowest index attaining the float32 maximum. On GPUs and
  TPUs XLA fuses this well.
* ``"fused"``: XLA:CPU fuses ``dot -> elementwise -> reduce_max`` into one cache-blocked
  kernel, but not a variadic ``argmax`` reduction (that runs at ~10 % of the matmul rate at d = 64). The
  fused method therefore makes two sweeps over the target tiles, each a dot + elementwise + reduce_max that
  XLA:CPU fuses. Sweep 1 computes the global max ``best`` (over all tiles, and over all shards when
  ``axis_name`` is given). Sweep 2 computes, per tile, ``max_i( min(s_i - (best - band), 0) * 2**60 - i )``,
  whose value is ``-i*`` for the lowest index i* of the tile with ``s_i >= best - band``, and keeps the
  lowest such index over the tiles (and shards). ``band`` is 16 float32 ulps of the scores' scale,
  ``eps * (|x| max_j |y_j| + max_j |h_j|)`` with the maxima over ALL real targets (padded and masked
  targets, height -1e30, excluded; see :func:`target_scale`): the two sweeps may round differently, so
  scores that close to the max count as ties.

Tie rule (every method is independent of the tiling, the row chunking and the sharding). ``"fused"``
returns the lowest index whose score is within ``band`` of the global max, ``"topk"`` and ``"argmax"`` the
lowest index attaining the global max exactly. Both are the float32 argmax up to rounding-level near-ties. Tilings,
chunkings and shardings give identical results whenever the matmuls round the scores alike; if they round
differently (XLA may block differently shaped matmuls differently), the fused result can change only for a
score whose distance to ``best - band`` is below that rounding difference. Optimisation barriers keep both
sweeps at run time and stop XLA from merging them into one materialised tile. Should sweep 2 find no score
within the band (pass 1 and pass 2 rounding more than 16 ulps apart), the index falls back to n - 1, so it
is always valid.

Sharding. With ``axis_name``, :func:`assign` is the per-device body of a ``shard_map`` whose targets are
split in equal shards along that mesh axis (x replicated): the global max, the target scale and the lowest
index are combined with ``pmax`` / ``pmin``, so the sharded result equals the single-device one.

All functions are pure and jit-able; the caller jits. Shapes are static, so the tile loop is a ``lax.scan``.
"""
from __future__ import annotations

import functools
from typing import Literal, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MASKED_HEIGHT",
    "TILE",
    "TOPK_ROW_CHUNK",
    "TOPK_TILE",
    "TOP_K_GROUP",
    "assign",
    "cell_histogram",
    "column_max_gap",
    "default_method",
    "scores",
    "target_scale",
    "tie_band",
    "top_k",
]

Method = Literal["auto", "topk", "fused", "argmax"]
METHODS = ("topk", "fused", "argmax")
# Targets per tile of the "fused" and "argmax" assignment.
TILE = 8192
# The top-k kernel (and the "topk" assignment) materialises one [row_chunk, tile] score tile at a time.
TOPK_ROW_CHUNK = 256
TOPK_TILE = 2048

# Scale that separates "score is within the band" from "score is below it" in the fused sweep 2.
_SEPARATION = float(2.0**60)
# Width of the fused tie band, in units of eps * (|x| max|y| + max|h|), a bound on the scale of the scores'
# rounding error.
_BAND_ULPS = 16.0
# Height of a cell that must never win (weight 0, padding): finite, so that max - height stays finite. Every
# module masks with this one constant.
MASKED_HEIGHT = -1e30
_PAD_HEIGHT = MASKED_HEIGHT
# Scores are computed at float32 "highest" precision everywhere: on GPUs the default TF32 matmul rounds to
# ~1e-3 relative and flips near-ties of the argmax (and the top-k gaps the Newton solver's Hessian reads).
_PRECISION = jax.lax.Precision.HIGHEST
# Columns per group whose maximum the top-k kernel reduces first (fastest of 8 / 16 / 32 / 64 at k = 4,
# d = 64 on the 2-core CPU); top_k rounds its tiles to multiples of it.
TOP_K_GROUP = 32
# "No index found" in the fused sweep 2 and the cross-shard pmin.
_INT_MAX = int(np.iinfo(np.int32).max)
# The fused sweep 2 encodes in-tile indices as floats: they must be exact.
_MAX_FUSED_TILE = 1 << 24


def default_method() -> str:
  """The reduction used by ``method="auto"``: ``"topk"`` on CPU, ``"argmax"`` elsewhere."""
  return "topk" if jax.default_backend() == "cpu" else "argmax"


def scores(x: jax.Array, y: jax.Array, h: jax.Array) -> jax.Array:
  """Dense scores ``x @ y.T + h`` (reference implementation; O(M n) memory).

  Args:
    x: Array of shape [M, d], source points.
    y: Array of shape [n, d], target codes.
    h: Array of shape [n], heights.

  Returns:
    Array of shape [M, n].
  """
  return jnp.matmul(x, y.T, precision=_PRECISION) + h[None, :]


def target_scale(y: jax.Array, h: jax.Array) -> jax.Array:
  """Scale of the targets that sets the fused method's tie band.

  Targets with height <= -5e29 (padded or masked cells, height -1e30) can never win and are left out.

  Args:
    y: Array of shape [n, d], target codes.
    h: Array of shape [n], heights.

  Returns:
    Array of shape [2]: ``(max_j |y_j|, max_j |h_j|)`` over the real targets (0 if there are none). For
    targets split over devices, the ``pmax`` of the per-shard scales is the global scale.
  """
  real = h > 0.5 * _PAD_HEIGHT
  y_norm = jnp.max(jnp.where(real, jnp.linalg.norm(y, axis=1), 0.0))
  h_abs = jnp.max(jnp.where(real, jnp.abs(h), 0.0))
  return jnp.stack([y_norm, h_abs])


def tie_band(x: jax.Array, scale: jax.Array) -> jax.Array:
  """Width of the fused method's tie band for each source point.

  Args:
    x: Array of shape [M, d], source points.
    scale: Array of shape [2], :func:`target_scale` of all targets.

  Returns:
    Array of shape [M]: ``16 * eps * (|x_m| max_j |y_j| + max_j |h_j|)``.
  """
  eps = jnp.finfo(x.dtype).eps
  return _BAND_ULPS * eps * (jnp.linalg.norm(x, axis=1) * scale[0] + scale[1])


def _tile_scores(x: jax.Array, y: jax.Array, h: jax.Array) -> jax.Array:
  return jnp.matmul(x, y.T, precision=_PRECISION) + h[None, :]


def _tile_max(x: jax.Array, y: jax.Array, h: jax.Array) -> jax.Array:
  """Fused sweep 1 on one [Mc, T] tile: the row max. Returns [Mc] float."""
  # Both sweeps must round alike: without this barrier XLA constant-folds one sweep when x and y are
  # compile-time constants (e.g. a DiscreteSource closed over in a jitted function) but not the other.
  x, y, h = jax.lax.optimization_barrier((x, y, h))
  return jnp.max(_tile_scores(x, y, h), axis=1)


def _tile_first_within(
    x: jax.Array, y: jax.Array, h: jax.Array, threshold: jax.Array
) -> jax.Array:
  """Fused sweep 2 on one [Mc, T] tile: lowest index with score >= threshold, or _INT_MAX. [Mc] int32."""
  # The barrier also stops XLA from merging the two sweeps' identical matmuls into one materialised tile.
  x, y, h, threshold = jax.lax.optimization_barrier((x, y, h, threshold))
  s = _tile_scores(x, y, h)
  iota = jnp.arange(y.shape[0], dtype=s.dtype)
  packed = jnp.max(
      jnp.minimum(s - threshold[:, None], 0.0) * _SEPARATION - iota[None, :], axis=1
  )
  # A score within the band gives -i in (-T, 0]; any other score gives a value far below -T.
  found = packed > -float(y.shape[0])
  return jnp.where(found, (-packed).astype(jnp.int32), _INT_MAX)


def _tile_argmax(x: jax.Array, y: jax.Array, h: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Max and argmax of the scores of one [Mc, T] tile. Returns ([Mc] float, [Mc] int32)."""
  s = _tile_scores(x, y, h)
  return jnp.max(s, axis=1), jnp.argmax(s, axis=1).astype(jnp.int32)


def _scan_tiles(body, init, y_tiles: jax.Array, h_tiles: jax.Array):
  """Folds ``body(carry, y_t, h_t, offset_t)`` over the target tiles (no loop for a single tile)."""
  num_tiles, tile = h_tiles.shape
  if num_tiles == 1:
    return body(init, y_tiles[0], h_tiles[0], jnp.int32(0))

  def step(carry, inputs):
    y_t, h_t, t = inputs
    return body(carry, y_t, h_t, t * tile), None

  carry, _ = jax.lax.scan(
      step, init, (y_tiles, h_tiles, jnp.arange(num_tiles, dtype=jnp.int32))
  )
  return carry


def _fused_rows(
    x: jax.Array,
    y_tiles: jax.Array,
    h_tiles: jax.Array,
    scale: jax.Array,
    n_local: int,
    axis_name: Optional[str],
) -> Tuple[jax.Array, jax.Array]:
  """Fused method for one row chunk x [Mc, d]: (global idx [Mc] int32, best [Mc])."""
  best = _scan_tiles(
      lambda b, y_t, h_t, _: jnp.maximum(b, _tile_max(x, y_t, h_t)),
      jnp.full((x.shape[0],), -jnp.inf, dtype=x.dtype), y_tiles, h_tiles,
  )
  if axis_name is not None:
    best = jax.lax.pmax(best, axis_name)
  threshold = best - tie_band(x, scale)

  def first(idx, y_t, h_t, offset):
    local = _tile_first_within(x, y_t, h_t, threshold)
    return jnp.minimum(idx, jnp.where(local == _INT_MAX, _INT_MAX, local + offset))

  idx = _scan_tiles(first, jnp.full((x.shape[0],), _INT_MAX, jnp.int32), y_tiles, h_tiles)
  n_total = n_local
  if axis_name is not None:
    offset = jax.lax.axis_index(axis_name).astype(jnp.int32) * n_local
    idx = jax.lax.pmin(jnp.where(idx == _INT_MAX, _INT_MAX, idx + offset), axis_name)
    n_total = n_local * jax.lax.axis_size(axis_name)
  return jnp.where(idx == _INT_MAX, n_total - 1, idx), best


def _argmax_rows(
    x: jax.Array,
    y_tiles: jax.Array,
    h_tiles: jax.Array,
    n_local: int,
    axis_name: Optional[str],
) -> Tuple[jax.Array, jax.Array]:
  """Argmax method for one row chunk x [Mc, d]: (global idx [Mc] int32, best [Mc])."""

  def body(carry, y_t, h_t, offset):
    best, idx = carry
    tile_best, tile_idx = _tile_argmax(x, y_t, h_t)
    better = tile_best > best  # strict: the lower tile keeps exact ties
    return jnp.where(better, tile_best, best), jnp.where(better, tile_idx + offset, idx)

  init = (
      jnp.full((x.shape[0],), -jnp.inf, dtype=x.dtype),
      jnp.zeros((x.shape[0],), dtype=jnp.int32),
  )
  best, idx = _scan_tiles(body, init, y_tiles, h_tiles)
  if axis_name is not None:
    best_all = jax.lax.pmax(best, axis_name)
    offset = jax.lax.axis_index(axis_name).astype(jnp.int32) * n_local
    idx = jax.lax.pmin(jnp.where(best == best_all, idx + offset, _INT_MAX), axis_name)
    best = best_all
  return idx, best


def _pad_to(a: jax.Array, size: int, value) -> jax.Array:
  pad = size - a.shape[0]
  if pad == 0:
    return a
  widths = [(0, pad)] + [(0, 0)] * (a.ndim - 1)
  return jnp.pad(a, widths, constant_values=value)


def _balanced_tile(n: int, tile_size: int) -> int:
  """Tile size <= tile_size that splits n into the fewest tiles with little padding (a multiple of 8)."""
  num_tiles = -(-n // tile_size)
  tile = -(-n // num_tiles)
  return min(tile_size, -(-tile // 8) * 8) if num_tiles > 1 else tile


@functools.partial(jax.named_call, name="lsot_assign")
def assign(
    x: jax.Array,
    y: jax.Array,
    h: jax.Array,
    *,
    tile_size: int = TILE,
    row_chunk: int = 4096,
    method: Method = "auto",
    axis_name: Optional[str] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Power-diagram cell of each source point, without an [M, n] score matrix.

  Args:
    x: Array of shape [M, d], source points.
    y: Array of shape [n, d], target codes (with ``axis_name``: this device's shard of n targets).
    h: Array of shape [n], heights (with ``axis_name``: this device's shard).
    tile_size: Targets per tile at most (static); the tiles are balanced, e.g. 20,000 targets with
      ``tile_size=8192`` make 3 tiles of 6,672. ``"topk"`` uses at most :data:`TOPK_TILE` (and
      :data:`TOPK_ROW_CHUNK` rows).
    row_chunk: Source rows per chunk (static).
    method: ``"topk"``, ``"fused"``, ``"argmax"`` or ``"auto"`` (see the module docstring).
    axis_name: inside ``shard_map`` / ``pmap`` with the targets split in equal shards along this axis (x
      replicated), the name of that axis: the results are then global over all shards (index
      ``device * n + local index``) and identical on every device. None on one device.

  Returns:
    A tuple ``(idx, best)``: ``idx`` int32 array of shape [M], the lowest index whose score attains the
    maximum (``"topk"``, ``"argmax"``) or lies within the tie band of it (``"fused"``), and ``best`` array of shape [M],
    the maximum score ``u_h(x)``. Neither depends on ``tile_size``, ``row_chunk`` or the sharding beyond
    matmul rounding (see the module docstring).
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
  if method not in METHODS:
    raise ValueError(f"Unknown assignment method {method!r}; use 'auto', 'topk', 'fused' or 'argmax'.")
  if tile_size < 1 or row_chunk < 1:
    raise ValueError(f"tile_size and row_chunk must be >= 1; got {tile_size}, {row_chunk}.")
  if method == "topk":
    vals, idx = top_k(x, y, h, 1, tile_size=min(tile_size, TOPK_TILE), row_chunk=min(row_chunk, TOPK_ROW_CHUNK),
                      axis_name=axis_name)
    return idx[:, 0], vals[:, 0]
  dtype = jnp.result_type(x.dtype, y.dtype, h.dtype)
  x, y, h = x.astype(dtype), y.astype(dtype), h.astype(dtype)

  m, d = x.shape
  n = y.shape[0]
  tile = _balanced_tile(n, tile_size)
  if method == "fused" and tile > _MAX_FUSED_TILE:
    raise ValueError(f"The fused method needs tile_size <= {_MAX_FUSED_TILE}; got {tile_size}.")
  num_tiles = -(-n // tile)
  y_tiles = _pad_to(y, num_tiles * tile, 0.0).reshape(num_tiles, tile, d)
  h_tiles = _pad_to(h, num_tiles * tile, _PAD_HEIGHT).reshape(num_tiles, tile)

  if method == "fused":
    scale = target_scale(y, h)
    if axis_name is not None:
      scale = jax.lax.pmax(scale, axis_name)
    rows = lambda xc: _fused_rows(xc, y_tiles, h_tiles, scale, n, axis_name)
  else:
    rows = lambda xc: _argmax_rows(xc, y_tiles, h_tiles, n, axis_name)

  chunk = min(row_chunk, m)
  num_chunks = -(-m // chunk)
  if num_chunks == 1:
    return rows(x)
  x_chunks = _pad_to(x, num_chunks * chunk, 0.0).reshape(num_chunks, chunk, d)
  idx, best = jax.lax.map(rows, x_chunks)
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


def _rounds_top_k(s: jax.Array, k: int) -> Tuple[jax.Array, jax.Array]:
  """k rounds of two plain float reductions over [Mc, T]: the next-lower maximum, then its lowest index."""
  iota = jnp.arange(s.shape[1], dtype=s.dtype)
  vals, idx = [], []
  prev = jnp.full((s.shape[0],), jnp.inf, s.dtype)
  for _ in range(k):
    v = jnp.max(jnp.where(s < prev[:, None], s, -jnp.inf), axis=1)
    i = jnp.max(jnp.where(s == v[:, None], -iota[None, :], -jnp.inf), axis=1)
    vals.append(v)
    idx.append(jnp.where(jnp.isfinite(i), -i, 0.0).astype(jnp.int32))
    prev = v
  return jnp.stack(vals, axis=1), jnp.stack(idx, axis=1)


def _tile_top_k(s: jax.Array, k: int) -> Tuple[jax.Array, jax.Array]:
  """The k highest scores of each row of one [Mc, T] tile, descending, and their in-tile indices.

  Plain float reductions, which XLA:CPU vectorises (a variadic sort or ``lax.top_k`` over the whole tile
  does not: it ran ~100x slower at k = 8). When T is a multiple of :data:`TOP_K_GROUP` with at least 2 k
  groups, one max over each group of consecutive columns comes first: the k best scores lie in the k
  groups of highest maximum (a group holding one of them has its maximum >= the k-th best score, and at
  most k groups can), so k rounds over the group maxima pick those groups, and k rounds over their
  k x ``TOP_K_GROUP`` gathered scores give the result: ~1.2 passes over the tile instead of 2 k. Exactly equal scores in one row keep
  only the lowest index (duplicate codes are merged by :func:`lsot_jax.solver.make_problem`, so exact ties
  are measure-zero). Rows with fewer than k finite scores end with ``-inf`` values, index 0.

  Returns:
    ``(vals [Mc, k], idx [Mc, k] int32)``.
  """
  mc, t = s.shape
  group = TOP_K_GROUP
  if t % group or t // group < 2 * k:
    return _rounds_top_k(s, k)
  grouped = s.reshape(mc, t // group, group)
  _, best_groups = _rounds_top_k(jnp.max(grouped, axis=2), k)
  candidates = jnp.take_along_axis(grouped, best_groups[:, :, None], axis=1).reshape(mc, k * group)
  vals, pos = _rounds_top_k(candidates, k)
  return vals, jnp.take_along_axis(best_groups, pos // group, axis=1) * group + pos % group


def _merge_top_k(
    v1: jax.Array, i1: jax.Array, v2: jax.Array, i2: jax.Array, k: int
) -> Tuple[jax.Array, jax.Array]:
  """Top k of two candidate lists [Mc, k1], [Mc, k2] (``lax.top_k`` over 2k columns only: cheap)."""
  vals, pos = jax.lax.top_k(jnp.concatenate([v1, v2], axis=1), k)
  return vals, jnp.take_along_axis(jnp.concatenate([i1, i2], axis=1), pos, axis=1)


@functools.partial(jax.named_call, name="lsot_top_k")
def top_k(
    x: jax.Array,
    y: jax.Array,
    h: jax.Array,
    k: int,
    *,
    tile_size: int = TOPK_TILE,
    row_chunk: int = TOPK_ROW_CHUNK,
    axis_name: Optional[str] = None,
) -> Tuple[jax.Array, jax.Array]:
  """The k best cells of each point: the k highest scores ``<x_m, y_i> + h_i`` and their indices.

  Tiled like :func:`assign` (memory O((M + n) d + row_chunk * tile_size), never [M, n]): each [row_chunk,
  tile] score tile is reduced to its top k (:func:`_tile_top_k`) and merged into a running top k.

  Args:
    x: Array of shape [M, d], source points.
    y: Array of shape [n, d], target codes (with ``axis_name``: this device's shard of n targets).
    h: Array of shape [n], heights (masked cells at :data:`MASKED_HEIGHT`).
    k: number of cells kept per point (static), 1 <= k.
    tile_size: targets per tile at most (static).
    row_chunk: source rows per chunk (static).
    axis_name: inside ``shard_map`` with the targets split in equal shards along this axis (x replicated):
      the per-shard top k are all-gathered and merged, so the result is the global one on every device.

  Returns:
    ``(vals, idx)``: Array of shape [M, k], descending scores (``vals[:, 0]`` is u_h(x)), and int32 array of
    shape [M, k], their (global) target indices. If k exceeds the number of targets, the missing entries
    have value ``-inf``.
  """
  if x.ndim != 2 or y.ndim != 2 or h.shape != y.shape[:1] or x.shape[1] != y.shape[1]:
    raise ValueError(f"top_k expects x [M, d], y [n, d], h [n]; got {x.shape}, {y.shape}, {h.shape}.")
  k = int(k)
  if k < 1:
    raise ValueError(f"k must be >= 1; got {k}.")
  if tile_size < 1 or row_chunk < 1:
    raise ValueError(f"tile_size and row_chunk must be >= 1; got {tile_size}, {row_chunk}.")
  dtype = jnp.result_type(x.dtype, y.dtype, h.dtype)
  x, y, h = x.astype(dtype), y.astype(dtype), h.astype(dtype)
  m, d = x.shape
  n = y.shape[0]
  tile = _balanced_tile(n, max(tile_size, k))
  if tile >= 2 * k * TOP_K_GROUP:  # whole groups, so that _tile_top_k reduces group maxima first
    tile = -(-tile // TOP_K_GROUP) * TOP_K_GROUP
  num_tiles = -(-n // tile)
  y_tiles = _pad_to(y, num_tiles * tile, 0.0).reshape(num_tiles, tile, d)
  # Padding scores -inf, not MASKED_HEIGHT: a padded target must never enter the top k.
  h_tiles = _pad_to(h, num_tiles * tile, -jnp.inf).reshape(num_tiles, tile)
  k_tile = min(k, tile)

  def rows(xc):
    def body(carry, y_t, h_t, offset):
      tv, ti = _tile_top_k(_tile_scores(xc, y_t, h_t), k_tile)
      return _merge_top_k(carry[0], carry[1], tv, ti + offset, k)

    init = (jnp.full((xc.shape[0], k), -jnp.inf, dtype), jnp.zeros((xc.shape[0], k), jnp.int32))
    vals, idx = _scan_tiles(body, init, y_tiles, h_tiles)
    if axis_name is not None:
      shard = jax.lax.axis_index(axis_name).astype(jnp.int32)
      all_v = jax.lax.all_gather(vals, axis_name, axis=1, tiled=True)
      all_i = jax.lax.all_gather(idx + shard * n, axis_name, axis=1, tiled=True)
      vals, pos = jax.lax.top_k(all_v, k)
      idx = jnp.take_along_axis(all_i, pos, axis=1)
    return vals, idx

  chunk = min(row_chunk, m)
  num_chunks = -(-m // chunk)
  if num_chunks == 1:
    return rows(x)
  x_chunks = _pad_to(x, num_chunks * chunk, 0.0).reshape(num_chunks, chunk, d)
  vals, idx = jax.lax.map(rows, x_chunks)
  return vals.reshape(-1, k)[:m], idx.reshape(-1, k)[:m]


@functools.partial(jax.named_call, name="lsot_column_max_gap")
def column_max_gap(
    x: jax.Array,
    y: jax.Array,
    h: jax.Array,
    best: jax.Array,
    *,
    tile_size: int = TOPK_TILE,
    row_chunk: int = TOPK_ROW_CHUNK,
) -> jax.Array:
  """For each target, how close it comes to winning a point: ``max_m (<x_m, y_i> + h_i - best_m)``.

  The value is <= 0; ``-value`` is the height a cell that wins no point must gain to win the point where it
  is closest to winning (its *deficit*). Tiled like :func:`assign`; the reduction runs over rows.

  Args:
    x: Array of shape [M, d], source points.
    y: Array of shape [n, d], target codes (per shard inside ``shard_map``: the result is per target, so
      no collective is needed).
    h: Array of shape [n], heights.
    best: Array of shape [M], the best score of each point (e.g. ``top_k(...)[0][:, 0]``).
    tile_size: targets per tile at most (static).
    row_chunk: source rows per chunk (static).

  Returns:
    Array of shape [n].
  """
  if x.ndim != 2 or y.ndim != 2 or h.shape != y.shape[:1] or best.shape != x.shape[:1]:
    raise ValueError(
        f"column_max_gap expects x [M, d], y [n, d], h [n], best [M]; got {x.shape}, {y.shape}, {h.shape}, "
        f"{best.shape}.")
  m, d = x.shape
  n = y.shape[0]
  tile = _balanced_tile(n, tile_size)
  num_tiles = -(-n // tile)
  y_tiles = _pad_to(y, num_tiles * tile, 0.0).reshape(num_tiles, tile, d)
  h_tiles = _pad_to(h, num_tiles * tile, -jnp.inf).reshape(num_tiles, tile)
  chunk = min(row_chunk, m)
  num_chunks = -(-m // chunk)
  # Padded rows get best = +inf, so they never raise a column's maximum.
  x_chunks = _pad_to(x, num_chunks * chunk, 0.0).reshape(num_chunks, chunk, d)
  b_chunks = _pad_to(best, num_chunks * chunk, jnp.inf).reshape(num_chunks, chunk)

  def chunk_body(acc, inputs):
    xc, bc = inputs
    cols = jax.lax.map(
        lambda t: jnp.max(_tile_scores(xc, t[0], t[1]) - bc[:, None], axis=0), (y_tiles, h_tiles))
    return jnp.maximum(acc, cols.reshape(-1)), None

  init = jnp.full((num_tiles * tile,), -jnp.inf, x.dtype)
  out, _ = jax.lax.scan(chunk_body, init, (x_chunks, b_chunks))
  return out[:n]
