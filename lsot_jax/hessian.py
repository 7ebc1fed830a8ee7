"""The sampled Hessian of the semi-discrete energy and the linear algebra of a Newton step.

The Hessian is the weighted graph Laplacian of the power diagram (see :mod:`lsot_jax.newton`): here it is
estimated from top-k scores as an edge list (gap bands), applied with segment sums and inverted by
Jacobi-preconditioned conjugate gradient. All functions are pure and jit-able.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

__all__ = ["cell_bands", "hessian_edges", "laplacian_matvec", "pcg"]


# A cell's own band needs this many Hessian rows whose best cell it is; cells with fewer use the global one.
MIN_CELL_BAND_ROWS = 4


def hessian_edges(
    vals: jax.Array, idx: jax.Array, num_rows, band_quantile: float, num_cells: int | None = None
) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The sampled Hessian as a weighted edge list, from the top-k scores of M_H samples.

  A sample whose best cell is i and whose r-th score is within eps_i of the best lies in a slab of width
  eps_i / |y_i - y_j| beside the facet (i, j_r), of mass |H_ij| eps_i: it adds 1 / (2 M_H eps_i) to the edge
  (the 2: both sides of the facet count). With ``num_cells`` each cell has its own band, eps_i the
  ``band_quantile`` quantile of the gaps s_(1) - s_(2) of the rows it wins (the global quantile for cells
  with fewer than :data:`MIN_CELL_BAND_ROWS` rows): the slab is then the same share of every cell, so the
  estimate's bias (it grows with the slab's share of the cell) is the same for small cells as for large
  ones, and a single step length suits all of them. Without it, one global eps: where cells are small in
  score units (tight clusters) the slab covers whole cells, their counts saturate and their H is too small.

  Args:
    vals: Array of shape [R, k], descending top-k scores (rows that are not samples hold ``-inf``).
    idx: int32 array of shape [R, k], their cells.
    num_rows: M_H, the number of real sample rows (a scalar).
    band_quantile: the band's quantile of the gaps s_(1) - s_(2).
    num_cells: n, for per-cell bands; None for one global band.

  Returns:
    ``(a, b, w, eps)``: int32 arrays of shape [R * (k - 1)] (edge ends) and the weight array of that shape,
    w = 1 / (2 M_H eps_i) for a pair within its row's band, 0 otherwise; and the global eps (scalar). The
    Laplacian of these edges estimates H.
  """
  gaps = vals[:, :1] - vals[:, 1:]
  real = jnp.isfinite(vals[:, 0])
  first = jnp.where(real & jnp.isfinite(gaps[:, 0]), gaps[:, 0], jnp.nan)
  eps = jnp.nanquantile(first, band_quantile)
  eps = jnp.where(jnp.isfinite(eps) & (eps > 0), eps, jnp.nanmax(jnp.where(first > 0, first, jnp.nan)))
  eps = jnp.where(jnp.isfinite(eps) & (eps > 0), eps, 1.0)
  row_eps = eps if num_cells is None else cell_bands(first, idx[:, 0], num_cells, band_quantile, eps)[idx[:, 0]]
  row_eps = jnp.broadcast_to(row_eps, first.shape)[:, None]
  in_band = real[:, None] & jnp.isfinite(gaps) & (gaps < row_eps)
  w = jnp.where(in_band, 1.0 / (2.0 * jnp.asarray(num_rows, vals.dtype) * row_eps), 0.0)
  a = jnp.broadcast_to(idx[:, :1], gaps.shape)
  return a.reshape(-1), idx[:, 1:].reshape(-1), w.reshape(-1), eps


def cell_bands(first: jax.Array, best: jax.Array, num_cells: int, band_quantile: float,
               fallback: jax.Array) -> jax.Array:
  """Per-cell band widths: the ``band_quantile`` (lower) quantile of each cell's first gaps.

  Args:
    first: Array of shape [R], each row's gap s_(1) - s_(2) (nan for rows that are not samples).
    best: int32 array of shape [R], each row's best cell.
    num_cells: n.
    band_quantile: the quantile, in (0, 1).
    fallback: scalar > 0, the width of cells with fewer than :data:`MIN_CELL_BAND_ROWS` rows or a zero
      quantile (duplicate codes).

  Returns:
    Array of shape [n], positive.
  """
  valid = jnp.isfinite(first)
  cell = jnp.where(valid, best, num_cells)
  order = jnp.lexsort((jnp.where(valid, first, jnp.inf), cell))
  sorted_gaps = jnp.where(valid, first, jnp.inf)[order]
  counts = jax.ops.segment_sum(valid.astype(jnp.int32), cell, num_segments=num_cells + 1)[:num_cells]
  starts = jnp.cumsum(counts) - counts
  pick = starts + jnp.floor(band_quantile * (counts - 1).astype(jnp.float32)).astype(jnp.int32)
  width = sorted_gaps[jnp.clip(pick, 0, first.shape[0] - 1)]
  ok = (counts >= MIN_CELL_BAND_ROWS) & jnp.isfinite(width) & (width > 0)
  return jnp.where(ok, width, fallback)


def laplacian_matvec(a: jax.Array, b: jax.Array, w: jax.Array, v: jax.Array) -> jax.Array:
  """(L v) for the graph Laplacian of the weighted edges (a, b, w): (L v)_i = sum_{e ~ i} w_e (v_i - v_other).

  Args:
    a: int32 array of shape [E], first ends.
    b: int32 array of shape [E], second ends.
    w: Array of shape [E], weights (0 for unused slots).
    v: Array of shape [n].

  Returns:
    Array of shape [n].
  """
  n = v.shape[0]
  flow = w * (v[a] - v[b])
  return jax.ops.segment_sum(flow, a, num_segments=n) - jax.ops.segment_sum(flow, b, num_segments=n)


def pcg(matvec, rhs: jax.Array, diag: jax.Array, *, tol: float, max_iter: int) -> Tuple[jax.Array, jax.Array]:
  """Jacobi-preconditioned conjugate gradient for a symmetric positive definite operator.

  Args:
    matvec: v [n] -> A v [n].
    rhs: Array of shape [n].
    diag: Array of shape [n], positive: the preconditioner diag(A).
    tol: stop when |r| <= tol |rhs|.
    max_iter: iteration cap (static).

  Returns:
    ``(x, iterations)``: Array of shape [n] and a scalar int32.
  """
  inv = 1.0 / diag
  target = (tol * jnp.linalg.norm(rhs)) ** 2

  def cond(c):
    k, _, r, _, _ = c
    return (k < max_iter) & (jnp.sum(r * r) > target)

  def body(c):
    k, x, r, p, rz = c
    ap = matvec(p)
    alpha = rz / jnp.maximum(jnp.sum(p * ap), 1e-30)
    x = x + alpha * p
    r = r - alpha * ap
    z = inv * r
    rz_new = jnp.sum(r * z)
    p = z + (rz_new / jnp.maximum(rz, 1e-30)) * p
    return k + 1, x, r, p, rz_new

  z0 = inv * rhs
  init = (jnp.zeros((), jnp.int32), jnp.zeros_like(rhs), rhs, z0, jnp.sum(rhs * z0))
  k, x, _, _, _ = jax.lax.while_loop(cond, body, init)
  return x, k
