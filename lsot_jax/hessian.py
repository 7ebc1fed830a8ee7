"""The sampled Hessian of the semi-discrete energy and the linear algebra of a Newton step.

The Hessian is the weighted graph Laplacian of the power diagram (see :mod:`lsot_jax.newton`): here it is
estimated from top-k scores as an edge list (gap bands), applied with segment sums and inverted by
Jacobi-preconditioned conjugate gradient. All functions are pure and jit-able.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

__all__ = ["hessian_edges", "laplacian_matvec", "pcg"]


def hessian_edges(
    vals: jax.Array, idx: jax.Array, num_rows, band_quantile: float
) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The sampled Hessian as a weighted edge list, from the top-k scores of M_H samples.

  Args:
    vals: Array of shape [R, k], descending top-k scores (rows that are not samples hold ``-inf``).
    idx: int32 array of shape [R, k], their cells.
    num_rows: M_H, the number of real sample rows (a scalar).
    band_quantile: eps is this quantile of the real rows' gaps s_(1) - s_(2).

  Returns:
    ``(a, b, w, eps)``: int32 arrays of shape [R * (k - 1)] (edge ends) and the weight array of that shape,
    w = 1 / (2 M_H eps) for a pair within the band, 0 otherwise; and eps (scalar). The Laplacian of these
    edges estimates H.
  """
  gaps = vals[:, :1] - vals[:, 1:]
  real = jnp.isfinite(vals[:, 0])
  first = jnp.where(real & jnp.isfinite(gaps[:, 0]), gaps[:, 0], jnp.nan)
  eps = jnp.nanquantile(first, band_quantile)
  eps = jnp.where(jnp.isfinite(eps) & (eps > 0), eps, jnp.nanmax(jnp.where(first > 0, first, jnp.nan)))
  eps = jnp.where(jnp.isfinite(eps) & (eps > 0), eps, 1.0)
  in_band = real[:, None] & jnp.isfinite(gaps) & (gaps < eps)
  w = jnp.where(in_band, 1.0 / (2.0 * jnp.asarray(num_rows, vals.dtype) * eps), 0.0)
  a = jnp.broadcast_to(idx[:, :1], gaps.shape)
  return a.reshape(-1), idx[:, 1:].reshape(-1), w.reshape(-1), eps


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
