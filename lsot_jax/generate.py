"""Generation from the semi-discrete Brenier map (stage 3).

The solver produces codes y [n, d] and heights h [n]. The Brenier potential and map are

    u_h(z) = max_i s_i(z),   s_i(z) = <z, y_i> + h_i,      T(z) = y_{argmax_i s_i(z)},

and T pushes the source mu forward onto sum_i nu_i delta(y_i). Three ways to turn source samples z ~ mu
into codes are provided, all pure functions ``(z, y, h, ...) -> codes [M, d]`` that the caller jits:

* :func:`exact`: T itself. It returns training codes only (the decoder then reproduces training images).
* :func:`extended`: the AE-OT extension (An et al., ICLR 2020, "AE-OT: a new generative model based on
  extended semi-discrete optimal transport"). Inside a mode, T is made continuous by blending the codes of
  neighbouring cells near their shared facet; across the singular set (facets whose dihedral angle is large,
  i.e. between modes) it stays discontinuous, so no code is produced in the gaps between clusters.
* :func:`soft`: the entropic / softmax-weighted barycentre sum_i softmax(s_i(z) / temperature) y_i. It is
  continuous everywhere, so it does fill gaps when the temperature is not small: a baseline to compare with.

:func:`generate` draws z from a source and dispatches on the mode name.

Memory: the score matrix [M, n] is never materialised. Rows are processed in chunks of ``chunk_size`` with
``lax.map`` and codes in tiles of ``tile_size`` with a ``lax.scan`` (running max / top-k / online softmax),
so memory is O((M + n) d + chunk_size * tile_size). The assignment and the top-k are the kernels of
:mod:`lsot_jax.kernels`, which owns every tiled reduction and its precision policy (float32 "highest": the
argmax is precision-sensitive on accelerators that default to TF32).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from lsot_jax import kernels

__all__ = [
    "DEFAULT_BLEND_SCALE",
    "MODES",
    "default_angle_threshold",
    "default_blend_radius",
    "exact",
    "extended",
    "facet_normals",
    "generate",
    "normal_angles",
    "soft",
    "top_k_cells",
]

MODES = ("exact", "extended", "soft")
# Default multiple of the median facet distance that makes the blend radius of `extended`: half a typical cell.
DEFAULT_BLEND_SCALE = 2.0

_HIGHEST = jax.lax.Precision.HIGHEST
# Number of source samples drawn by `generate` to estimate the default blend radius.
_NUM_RADIUS_PROBE = 2048
# Salt folded into the generation key to draw that probe batch.
_RADIUS_PROBE_SALT = 0x5EED


def _check_inputs(z: jax.Array, y: jax.Array, h: jax.Array) -> None:
  """Static shape checks shared by the public functions."""
  if y.ndim != 2:
    raise ValueError(f"y must have shape [n, d], got {y.shape}.")
  if h.shape != (y.shape[0],):
    raise ValueError(f"h must have shape [n] = [{y.shape[0]}], got {h.shape}.")
  if y.shape[0] < 1:
    raise ValueError("y must contain at least one code.")
  if z.ndim != 2 or z.shape[1] != y.shape[1]:
    raise ValueError(f"z must have shape [M, d] with d = {y.shape[1]}, got {z.shape}.")


def _check_sizes(chunk_size: int, tile_size: int) -> None:
  if int(chunk_size) < 1 or int(tile_size) < 1:
    raise ValueError(f"chunk_size and tile_size must be >= 1, got {chunk_size} and {tile_size}.")


def _tiles(
    y: jax.Array, bias: jax.Array, tile_size: int
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Splits codes and biases into tiles; padded codes are zero with bias -inf.

  Returns:
    (y_tiles [T, tile, d], bias_tiles [T, tile], offsets [T] int32).
  """
  n, d = y.shape
  tile = min(int(tile_size), n)
  num_tiles = -(-n // tile)
  pad = num_tiles * tile - n
  y_pad = jnp.pad(y, ((0, pad), (0, 0)))
  b_pad = jnp.pad(bias, (0, pad), constant_values=-jnp.inf)
  offsets = jnp.arange(num_tiles, dtype=jnp.int32) * tile
  return y_pad.reshape(num_tiles, tile, d), b_pad.reshape(num_tiles, tile), offsets


def _map_rows(fn: Callable[[jax.Array], Any], z: jax.Array, chunk_size: int) -> Any:
  """Applies ``fn`` ([c, d] -> pytree of [c, ...]) to row chunks of z and concatenates the results."""
  m, d = z.shape
  chunk = max(1, min(int(chunk_size), m))
  num_chunks = -(-m // chunk)
  z_pad = jnp.pad(z, ((0, num_chunks * chunk - m), (0, 0)))
  out = jax.lax.map(fn, z_pad.reshape(num_chunks, chunk, d))
  return jax.tree_util.tree_map(lambda a: a.reshape((num_chunks * chunk,) + a.shape[2:])[:m], out)


def _tile_scores(zc: jax.Array, yt: jax.Array, bt: jax.Array) -> jax.Array:
  """Scores of a row chunk against a code tile: [c, d] x [t, d] + [t] -> [c, t]."""
  return jnp.matmul(zc, yt.T, precision=_HIGHEST) + bt[None, :]


def top_k_cells(
    z: jax.Array,
    y: jax.Array,
    h: jax.Array,
    k: int,
    *,
    chunk_size: int = kernels.TOPK_ROW_CHUNK,
    tile_size: int = kernels.TOPK_TILE,
) -> Tuple[jax.Array, jax.Array]:
  """The k highest scores <z, y_i> + h_i per sample and their code indices (:func:`lsot_jax.kernels.top_k`).

  Args:
    z: Array of shape [M, d], source samples.
    y: Array of shape [n, d], codes.
    h: Array of shape [n], heights.
    k: number of cells to keep (static), 1 <= k <= n.
    chunk_size: rows per chunk (static).
    tile_size: codes per tile (static).

  Returns:
    (scores, idx): Arrays of shape [M, k] (float, descending) and [M, k] (int32). ``idx[:, 0]`` is the cell
    of each sample (the lowest index on exact ties).
  """
  _check_inputs(z, y, h)
  _check_sizes(chunk_size, tile_size)
  n = y.shape[0]
  k = int(k)
  if not 1 <= k <= n:
    raise ValueError(f"k must be in [1, n] = [1, {n}], got {k}.")
  return kernels.top_k(z, y, h, k, tile_size=int(tile_size), row_chunk=int(chunk_size))


def exact(
    z: jax.Array,
    y: jax.Array,
    h: jax.Array,
    *,
    chunk_size: int = 1024,
    tile_size: int = 4096,
) -> jax.Array:
  """The semi-discrete Brenier map T(z) = y[argmax_i (<z, y_i> + h_i)].

  Args:
    z: Array of shape [M, d], source samples.
    y: Array of shape [n, d], codes.
    h: Array of shape [n], heights.
    chunk_size: rows per chunk (static).
    tile_size: codes per tile (static); at most [chunk_size, tile_size] scores exist at once.

  Returns:
    Array of shape [M, d]: rows of y (the lowest index wins ties, see :func:`lsot_jax.kernels.assign`,
    which computes the assignment).
  """
  _check_inputs(z, y, h)
  _check_sizes(chunk_size, tile_size)
  idx, _ = kernels.assign(z, y, h, tile_size=tile_size, row_chunk=chunk_size)
  return y[idx]


def facet_normals(y: jax.Array) -> jax.Array:
  """Unit normals n_i = (y_i, -1) / |(y_i, -1)| of the facets of the graph of u_h.

  Args:
    y: Array of shape [..., d], codes.

  Returns:
    Array of shape [..., d + 1].
  """
  ext = jnp.concatenate([y, -jnp.ones(y.shape[:-1] + (1,), y.dtype)], axis=-1)
  return ext / jnp.linalg.norm(ext, axis=-1, keepdims=True)


def normal_angles(a: jax.Array, b: jax.Array) -> jax.Array:
  """Dihedral angles (radians, in [0, pi]) between the facet normals of codes a and b.

  Computed as 2 asin(|n_a - n_b| / 2), which, unlike arccos(<n_a, n_b>), is accurate for small angles.

  Args:
    a: Array of shape [..., d].
    b: Array of shape [..., d], broadcastable against a with equal rank.

  Returns:
    Array of shape [...] (the broadcast batch shape).
  """
  chord = jnp.linalg.norm(facet_normals(a) - facet_normals(b), axis=-1)
  return 2.0 * jnp.arcsin(jnp.clip(0.5 * chord, 0.0, 1.0))


def default_angle_threshold(
    y: jax.Array,
    *,
    num_neighbors: int = 8,
    quantile: float = 0.9,
    factor: float = 2.0,
    num_probe: int = 2048,
    tile_size: int = 4096,
) -> jax.Array:
  """A data-driven dihedral-angle threshold for :func:`extended`.

  The angle between facet normals depends on the latent scale (rescaling y by s changes it), so a fixed
  number is only meaningful for one encoder. Instead, the threshold is read off the codes themselves: for
  each code (a probe of at most ``num_probe`` evenly spaced codes), take the angle between its normal and
  the normal of its ``num_neighbors``-th nearest code in angle (self excluded); the threshold is
  ``factor`` times the ``quantile`` of these angles. Codes of one mode see their few nearest neighbours at
  small angles (the local spacing of the codes), while the angle to another mode is set by the gap between
  modes; the threshold admits candidates up to ``factor`` times the local spacing, so the ``quantile``
  fraction of codes can blend with at least ``num_neighbors`` neighbours and with the farther neighbours of
  a sparse region of their mode, and it refuses the singular set wherever the gap between modes exceeds
  twice the local spacing (on the ring and grid toys it is 20-50 times larger). The rule follows any
  rescaling of y, since it is computed on the same scale as the angles it is compared with. Many exact
  duplicate codes can drive it to 0, which reduces :func:`extended` to :func:`exact`. A config may
  override it with an explicit number.

  Why ``factor = 2`` (``python benchmarks/mnist_references.py --workdir runs/mnist`` on the MNIST run of
  ``configs/mnist.py``: 60,000 codes in d = 32, 10,000 samples, classifier features, top_k 8, default
  radius; ``exact``: memorisation rate 0.991): with factor 1 the gate refuses so many within-digit
  neighbours that ``extended`` is nearly ``exact`` (memorisation 0.979, Frechet 1.63); factor 1.5 gives
  0.850 (Frechet 1.83), factor 2 gives 0.736 (Frechet 2.93, precision 0.936, recall 0.910), and from
  factor 3 on nearly every top-8 candidate is admitted (0.693, Frechet 3.76, precision 0.927): the gate no
  longer acts. Factor 2 sits where the gate still refuses the tail of the angle distribution yet the
  generated images are mostly new.

  Args:
    y: Array of shape [n, d], codes.
    num_neighbors: which nearest neighbour defines a code's typical within-mode angle (static).
    quantile: quantile over codes, in [0, 1].
    factor: multiplier (> 0) of the quantile.
    num_probe: how many codes to probe (static); cost O(num_probe * n * d).
    tile_size: codes per tile (static).

  Returns:
    Scalar array, radians.
  """
  if y.ndim != 2:
    raise ValueError(f"y must have shape [n, d], got {y.shape}.")
  if not 0.0 <= float(quantile) <= 1.0:
    raise ValueError(f"quantile must be in [0, 1], got {quantile}.")
  if int(num_neighbors) < 1 or int(num_probe) < 1:
    raise ValueError("num_neighbors and num_probe must be >= 1.")
  if not float(factor) > 0.0:
    raise ValueError(f"factor must be > 0, got {factor}.")
  n = y.shape[0]
  if n < 2:
    return jnp.zeros((), y.dtype)
  k = min(int(num_neighbors), n - 1)
  num_probe = min(int(num_probe), n)
  probe = jnp.asarray([(i * n) // num_probe for i in range(num_probe)], jnp.int32)
  normals = facet_normals(y)
  _, idx = top_k_cells(
      normals[probe], normals, jnp.zeros((n,), y.dtype), k + 1, tile_size=tile_size
  )
  self_in_first_k = jnp.any(idx[:, :k] == probe[:, None], axis=1)
  kth = jnp.where(self_in_first_k, idx[:, k], idx[:, k - 1])
  angles = normal_angles(y[probe], y[kth])
  return factor * jnp.quantile(angles, quantile)


def default_blend_radius(
    z: jax.Array,
    y: jax.Array,
    h: jax.Array,
    *,
    scale: float = DEFAULT_BLEND_SCALE,
    chunk_size: int = 1024,
    tile_size: int = 4096,
) -> jax.Array:
  """A data-driven blend radius (source-space length) for :func:`extended`.

  For each probe sample z, (s_1 - s_2) / |y_1 - y_2| (best and runner-up cells) is its distance to the
  nearest facet of its cell, up to the cell's corners. In one dimension these distances are uniform on
  [0, w / 2] for a cell of width w, so ``scale`` (2) times their median is half a typical cell width: the
  blend then reaches from each facet to about the cell centre, as in AE-OT, where the piecewise-linear map
  sends each cell's centre to its code.

  Args:
    z: Array of shape [P, d], samples from the source (a probe batch).
    y: Array of shape [n, d], codes (n >= 2).
    h: Array of shape [n], heights.
    scale: multiplier of the median facet distance.
    chunk_size: rows per chunk (static).
    tile_size: codes per tile (static).

  Returns:
    Scalar array.
  """
  _check_inputs(z, y, h)
  if y.shape[0] < 2:
    return jnp.zeros((), z.dtype)
  vals, idx = top_k_cells(z, y, h, 2, chunk_size=chunk_size, tile_size=tile_size)
  gap = vals[:, 0] - vals[:, 1]
  sep = jnp.linalg.norm(y[idx[:, 0]] - y[idx[:, 1]], axis=-1)
  dist = jnp.where(sep > 0, gap / jnp.where(sep > 0, sep, 1.0), jnp.inf)
  return scale * jnp.median(dist)


def extended(
    z: jax.Array,
    y: jax.Array,
    h: jax.Array,
    *,
    angle_threshold: jax.Array | float,
    radius: Optional[jax.Array | float] = None,
    top_k: int = 8,
    chunk_size: int = 1024,
    tile_size: int = 4096,
) -> jax.Array:
  """AE-OT extended Brenier map: piecewise-linear blending inside modes, none across the singular set.

  Construction. Let s_i(z) = <z, y_i> + h_i, i* = argmax_i s_i(z) the cell of z and C the ``top_k``
  best-scoring cells (the runner-ups, i.e. the cells nearest to z). The facet of the graph of u_h over cell i
  has unit normal n_i = (y_i, -1) / |(y_i, -1)|. A candidate j in C is *admissible* if the dihedral angle
  between n_{i*} and n_j is below ``angle_threshold``; i* itself always is. Let A be the admissible set.

  For j != l the power facet between cells j and l lies on the hyperplane s_j = s_l, and

      d_{lj}(z) = (s_l(z) - s_j(z)) / |y_l - y_j|

  is the signed Euclidean distance (in source space) from z to that hyperplane, positive on l's side. So

      t_j(z) = max_{l in A, l != j} d_{lj}(z)

  is <= 0 exactly when z lies in cell j (relative to A) and otherwise is the distance from z to cell j up to
  its corners (the max of facet distances of a polytope is its distance function away from its ridges).
  The weight of code j is

      w_j(z) = clip(1 - t_j(z) / radius, 0, 1)    for j in A,  0 otherwise,

  i.e. 1 inside cell j, falling linearly to 0 at distance ``radius`` from it, and the output is

      T_ext(z) = sum_j w_j(z) y_j / sum_j w_j(z).

  Properties (derivation):
    * w_{i*} = 1 always, so the normaliser is >= 1 and the output is a convex combination of y_{i*} and
      admissible neighbours: it never leaves the convex hull of one mode's codes, and never mixes codes
      whose normals differ by the threshold or more (the singular set between modes).
    * Deeper than ``radius`` inside cell i* (every other admissible cell farther than ``radius``), all other
      weights vanish: T_ext = y_{i*}, the cell's core (around its centre when ``radius`` is half its width).
    * On the facet shared by i and j (and farther than ``radius`` from other cells) w_i = w_j = 1, so the
      output is (y_i + y_j) / 2; on a d-fold junction of k cells, the plain mean of the k codes.
      Between core and facet, in the two-cell case, T_ext = y_i + lambda (y_j - y_i) with
      lambda = w / (1 + w), w = 1 - dist(z, facet) / radius: monotone from 0 to 1/2.
    * Continuity: each w_j depends on z only through the continuous functions s_l(z), and the formula is
      symmetric in the cell labels, so the output is continuous across every facet whose two sides see the
      same admissible set, in particular inside a mode. Across an inadmissible facet it jumps (as the true
      OT map does). Residual jumps occur only where the admissible set changes on a facet (within
      ``radius`` of a junction with an inadmissible cell) or where a cell outside the top_k would have had
      weight; a larger ``top_k`` shrinks the latter.
    * ``angle_threshold = 0`` or ``radius = 0`` give exactly :func:`exact` (ties aside).

  The generated codes are new (not training codes) for samples within ``radius`` of an admissible facet.

  Args:
    z: Array of shape [M, d], source samples.
    y: Array of shape [n, d], codes.
    h: Array of shape [n], heights.
    angle_threshold: scalar, radians; see :func:`default_angle_threshold`. May be traced (vmappable).
    radius: scalar source-space length of the blend band. None estimates it from z itself with
      :func:`default_blend_radius`, which makes the map depend on the batch: pass a value (as
      :func:`generate` does) for a fixed map. May be traced.
    top_k: number of candidate cells per sample (static), clipped to n.
    chunk_size: rows per chunk (static); memory O(chunk_size * (tile_size + top_k^2 * d)).
    tile_size: codes per tile (static).

  Returns:
    Array of shape [M, d].
  """
  _check_inputs(z, y, h)
  _check_sizes(chunk_size, tile_size)
  if int(top_k) < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}.")
  k = min(int(top_k), y.shape[0])
  if radius is None:
    radius = default_blend_radius(z, y, h, chunk_size=chunk_size, tile_size=tile_size)
  radius = jnp.asarray(radius, z.dtype)
  threshold = jnp.asarray(angle_threshold, z.dtype)
  if radius.ndim != 0 or threshold.ndim != 0:
    raise ValueError("angle_threshold and radius must be scalars.")
  y_tiles, h_tiles, offsets = _tiles(y, h, max(int(tile_size), k))
  tile = y_tiles.shape[1]
  off_diag = ~jnp.eye(k, dtype=bool)

  def chunk_fn(zc):
    c = zc.shape[0]
    iota = jnp.broadcast_to(jnp.arange(tile, dtype=jnp.int32)[None, :], (c, tile))

    def body(carry, xs):
      vals, idx = carry
      yt, ht, off = xs
      s = _tile_scores(zc, yt, ht)
      new_v, pos = jax.lax.top_k(jnp.concatenate([vals, s], axis=1), k)
      return (new_v, jnp.take_along_axis(jnp.concatenate([idx, iota + off], axis=1), pos, axis=1)), None

    init = (jnp.full((c, k), -jnp.inf, zc.dtype), jnp.zeros((c, k), jnp.int32))
    (vals, idx), _ = jax.lax.scan(body, init, (y_tiles, h_tiles, offsets))
    yc = y[idx]  # [c, k, d]
    angles = normal_angles(yc[:, :1, :], yc)  # [c, k]
    admissible = (angles < threshold) | (jnp.arange(k) == 0)[None, :]
    # d[c, l, j] = (s_l - s_j) / |y_l - y_j|: distance from z to the facet hyperplane between l and j.
    gap = vals[:, :, None] - vals[:, None, :]
    sep = jnp.linalg.norm(yc[:, :, None, :] - yc[:, None, :, :], axis=-1)
    safe_sep = jnp.where(sep > 0, sep, 1.0)
    dist = jnp.where(sep > 0, gap / safe_sep, jnp.where(gap > 0, jnp.inf, 0.0))
    use = admissible[:, :, None] & off_diag[None, :, :]
    t = jnp.max(jnp.where(use, dist, -jnp.inf), axis=1)  # [c, k]
    ratio = t / jnp.where(radius > 0, radius, 1.0)
    w_band = jnp.where(radius > 0, jnp.clip(1.0 - ratio, 0.0, 1.0), 0.0)
    w = jnp.where(admissible, jnp.where(t <= 0, 1.0, w_band), 0.0)
    return jnp.sum(w[:, :, None] * yc, axis=1) / jnp.sum(w, axis=1)[:, None]

  return _map_rows(chunk_fn, z, chunk_size)


def soft(
    z: jax.Array,
    y: jax.Array,
    h: jax.Array,
    *,
    temperature: jax.Array | float,
    weights: Optional[jax.Array] = None,
    chunk_size: int = 1024,
    tile_size: int = 4096,
) -> jax.Array:
  """Softmax-weighted barycentre (entropic map): sum_i p_i(z) y_i with p = softmax(s / T + log nu).

  With s_i(z) = <z, y_i> + h_i and T = ``temperature`` (score units, i.e. [source] x [code] length). As
  T -> 0 this tends to :func:`exact` (away from facets); as T -> inf to the nu-weighted mean of the codes
  (the plain mean if ``weights`` is None). With ``weights`` = nu and h the dual potential of an entropic
  semi-discrete problem at epsilon = T, this is that problem's entropic (barycentric) map. Computed with an
  online softmax over code tiles, so memory is O(chunk_size * tile_size).

  Args:
    z: Array of shape [M, d], source samples.
    y: Array of shape [n, d], codes.
    h: Array of shape [n], heights.
    temperature: positive scalar (may be traced, e.g. vmapped over a scan of temperatures).
    weights: optional Array of shape [n], nonnegative target weights nu (added as log nu to the logits).
    chunk_size: rows per chunk (static).
    tile_size: codes per tile (static).

  Returns:
    Array of shape [M, d].
  """
  _check_inputs(z, y, h)
  _check_sizes(chunk_size, tile_size)
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}.")
  temperature = jnp.asarray(temperature, z.dtype)
  if temperature.ndim != 0:
    raise ValueError("temperature must be a scalar.")
  if weights is None:
    log_w = jnp.zeros_like(h)
  else:
    if weights.shape != h.shape:
      raise ValueError(f"weights must have shape {h.shape}, got {weights.shape}.")
    log_w = jnp.log(weights.astype(h.dtype))
  y_tiles, h_tiles, offsets = _tiles(y, h, tile_size)
  lw_tiles = _tiles(y, log_w, tile_size)[1]
  del offsets

  def chunk_fn(zc):
    c, d = zc.shape

    def body(carry, xs):
      run_max, run_sum, acc = carry
      yt, ht, lwt = xs
      logits = _tile_scores(zc, yt, ht) / temperature + lwt[None, :]
      new_max = jnp.maximum(run_max, jnp.max(logits, axis=1))
      safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
      decay = jnp.exp(run_max - safe_max)
      p = jnp.exp(logits - safe_max[:, None])
      run_sum = run_sum * decay + jnp.sum(p, axis=1)
      acc = acc * decay[:, None] + jnp.matmul(p, yt, precision=_HIGHEST)
      return (new_max, run_sum, acc), None

    init = (
        jnp.full((c,), -jnp.inf, zc.dtype),
        jnp.zeros((c,), zc.dtype),
        jnp.zeros((c, d), zc.dtype),
    )
    (_, run_sum, acc), _ = jax.lax.scan(body, init, (y_tiles, h_tiles, lw_tiles))
    return acc / run_sum[:, None]

  return _map_rows(chunk_fn, z, chunk_size)


def generate(
    mode: str,
    key: jax.Array,
    source_sampler: Any,
    y: jax.Array,
    h: jax.Array,
    num: int,
    **kwargs: Any,
) -> jax.Array:
  """Draws ``num`` source samples and maps them to codes with the chosen mode.

  Jit with ``mode``, ``source_sampler`` and ``num`` static (``jax.jit(generate, static_argnums=(0, 2, 5))``
  or close over them); vmap over keys works.

  Args:
    mode: one of :data:`MODES`: "exact", "extended" or "soft".
    key: PRNG key.
    source_sampler: an object with ``.sample(key, num) -> [num, d]`` (e.g. ``lsot_jax.sources.Gaussian``,
      which is a pytree and may also be passed as a traced argument) or a callable ``(key, num) -> [num, d]``.
    y: Array of shape [n, d], codes.
    h: Array of shape [n], heights.
    num: number of samples (static).
    **kwargs: keyword arguments of the mode's function. For "extended", ``angle_threshold`` defaults to
      :func:`default_angle_threshold` (y) and ``radius`` to :func:`default_blend_radius` on a separate probe
      batch of 2048 source samples drawn from ``fold_in(key, salt)``, with that function's ``scale`` set by
      the extra keyword ``blend_scale`` (default 2.0; ignored when ``radius`` is given); "soft" needs
      ``temperature``.

  Returns:
    Array of shape [num, d].
  """
  if mode not in MODES:
    raise ValueError(f"Unknown generation mode {mode!r}; valid modes are: {', '.join(MODES)}.")
  sample = getattr(source_sampler, "sample", source_sampler)
  if not callable(sample):
    raise ValueError("source_sampler must be callable as (key, num) or have a .sample(key, num) method.")
  z = sample(key, num)
  if mode == "exact":
    return exact(z, y, h, **kwargs)
  if mode == "soft":
    return soft(z, y, h, **kwargs)
  kwargs = dict(kwargs)
  blend_scale = kwargs.pop("blend_scale", DEFAULT_BLEND_SCALE)
  if kwargs.get("angle_threshold") is None:
    kwargs["angle_threshold"] = default_angle_threshold(y)
  if kwargs.get("radius") is None:
    probe = sample(jax.random.fold_in(key, _RADIUS_PROBE_SALT), _NUM_RADIUS_PROBE)
    kwargs["radius"] = default_blend_radius(
        probe, y, h, scale=blend_scale,
        chunk_size=kwargs.get("chunk_size", 1024),
        tile_size=kwargs.get("tile_size", 4096),
    )
  return extended(z, y, h, **kwargs)
