"""Coarse-to-fine starts for the semi-discrete solvers: k-means levels and a per-cluster Gaussian refinement.

On clustered codes the hard directions of the semi-discrete energy are whole-cluster height shifts; a
damped Newton method started from one global Gaussian fit cannot take them (the line search on tight
clusters never accepts a step: every cell of a cluster is far from its share). The multiscale approach of
Merigot (2011, "A multiscale approach to optimal transport") solves a coarse problem first: the codes are
grouped by k-means, the K cluster means (weighted by the clusters' masses) form a small problem that is
solved, and its heights start the fine problem.

Refinement (:func:`refine_heights`): cluster k of the coarse solution holds the source region
C_k = {x : <x, c_k> + H_k is the max}; inside it the source is approximated by a Gaussian N(m_k, Sigma_k)
fitted to probe samples, the cluster's codes by N(mu_k, S_k), and the affine Brenier map between them,
T(x) = mu_k + A_k (x - m_k) with A_k = Sigma^(-1/2) (Sigma^(1/2) S Sigma^(1/2))^(1/2) Sigma^(-1/2), has the
potential phi_k(x) = <x, mu_k> + b_k + (x - m_k)^T A_k (x - m_k) / 2. Its Legendre dual gives the code
heights

    h_i = b_k - <m_k, y_i - mu_k> - (y_i - mu_k)^T A_k^(-1) (y_i - mu_k) / 2 ,

with b_k = H_k - tr(A_k Sigma_k) / 2 = H_k - tr((Sigma^(1/2) S Sigma^(1/2))^(1/2)) / 2 so that phi_k matches
the coarse potential on average over C_k (the cluster keeps its share). Splitting a cluster's cell by the
codes' heights alone (h_i = H_k, the classical choice) gives its whole mass to the codes on the cluster's
convex hull and leaves the others empty.

**High dimension.** The moment-matched map is the continuous answer; a cluster of a few codes per dimension
is far from continuous: nearest-code (Voronoi-like) cells favour the codes near the cluster's mean (hubs),
and the exact heights sit between that and equal heights. :func:`refine_heights` therefore scales the
quadratic part of the heights, the term -((y_i - mu_k)^T A_k^(-1) (y_i - mu_k) + tr(A_k Sigma_k)) / 2, by
one factor c for all clusters, the c in [0, 1.5] that minimises the energy on a fixed source sample (the
heights are affine in c, so the sampled energy is convex in c: golden-section search). Measured on 8
Gaussian clusters in d = 64 (n = 5,000, clusters of 625 codes): c = 1 left 364 cells empty on 2^17
points, c ~ 0.4 none. Clusters must also hold enough codes for the fits: the solver groups at least
``codes_per_dim`` x d codes per cluster (:meth:`lsot_jax.newton.NewtonSolver.level_sizes`).

All functions are pure and jit-able; :func:`multiscale_start` composes them for
:class:`lsot_jax.newton.NewtonSolver` (``initialisation="multiscale"``). Its cost is counted in the solver's
``samples_scored``: a coarse level's M samples against K targets count as M K / n.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import jax
import jax.numpy as jnp

from lsot_jax import kernels
from lsot_jax import solver as solver_lib

__all__ = ["gaussian_heights", "kmeans", "coarse_problem", "refine_heights", "level_sizes", "multiscale_start", "segment_outer",
           "sampled_energy", "line_minimise"]


def level_sizes(n: int, factor: int, coarsest: int) -> Tuple[int, ...]:
  """Cluster counts of the coarse levels for n targets, finest first (empty if n <= coarsest).

  Args:
    n: number of targets.
    factor: targets per cluster between consecutive levels (>= 2).
    coarsest: a level with at most this many targets is solved from the Gaussian start.

  Returns:
    Tuple of ints K_1 > K_2 > ... with K_1 = ceil(n / factor), the last one <= coarsest.
  """
  sizes = []
  k = n
  while k > coarsest:
    k = -(-k // factor)
    sizes.append(k)
  return tuple(sizes)


def _kmeans_plus_plus(key: jax.Array, y: jax.Array, weights: jax.Array, k: int) -> jax.Array:
  """k-means++ seeding (Arthur and Vassilvitskii 2007), weighted: each centre is drawn with probability
  proportional to weight x squared distance to the nearest centre so far.

  Each draw inverts the cumulative distribution at one uniform number, so appending weight-0 codes (the
  padding of the sharded solvers) does not change the centres.
  """
  n, d = y.shape

  def draw(j, p):
    u = jax.random.uniform(jax.random.fold_in(key, j)) * jnp.sum(p)
    return jnp.minimum(jnp.searchsorted(jnp.cumsum(p), u, side="right"), n - 1)

  first = y[draw(0, weights)]
  dist = jnp.sum((y - first[None, :]) ** 2, axis=1)
  centres = jnp.zeros((k, d), y.dtype).at[0].set(first)

  def body(j, carry):
    centres, dist = carry
    c = y[draw(j, weights * dist)]
    return centres.at[j].set(c), jnp.minimum(dist, jnp.sum((y - c[None, :]) ** 2, axis=1))

  centres, _ = jax.lax.fori_loop(1, k, body, (centres, dist))
  return centres


def kmeans(key: jax.Array, y: jax.Array, weights: jax.Array, k: int, num_iterations: int = 10
           ) -> Tuple[jax.Array, jax.Array]:
  """Weighted Lloyd iterations from a weighted k-means++ seeding.

  Args:
    key: PRNG key of the seeding.
    y: Array of shape [n, d], codes.
    weights: Array of shape [n], non-negative weights (codes of weight 0 are assigned but do not move
      centres).
    k: number of clusters (static, <= the number of positive weights for every cluster to start non-empty).
    num_iterations: Lloyd iterations (static).

  Returns:
    ``(centres, labels)``: Array of shape [k, d] and int32 array of shape [n]. A cluster that loses all its
    codes keeps its centre (it then has mass 0).
  """
  centres = _kmeans_plus_plus(key, y, weights, k)

  def labels_of(c):
    idx, _ = kernels.assign(y, c, -0.5 * jnp.sum(c * c, axis=1), method="argmax")
    return idx

  def body(_, c):
    labels = labels_of(c)
    mass = jax.ops.segment_sum(weights, labels, num_segments=k)
    total = jax.ops.segment_sum(weights[:, None] * y, labels, num_segments=k)
    return jnp.where(mass[:, None] > 0, total / jnp.maximum(mass, 1e-30)[:, None], c)

  centres = jax.lax.fori_loop(0, num_iterations, body, centres)
  return centres, labels_of(centres)


def coarse_problem(problem: solver_lib.SemidiscreteProblem, labels: jax.Array, k: int
                   ) -> solver_lib.SemidiscreteProblem:
  """The problem whose targets are the clusters' weighted means, weighted by the clusters' masses.

  Args:
    problem: the fine problem (n targets).
    labels: int32 array of shape [n], cluster of each target.
    k: number of clusters (static).

  Returns:
    A :class:`~lsot_jax.solver.SemidiscreteProblem` with k targets (clusters without mass get weight 0, so
    the solvers mask them) and the fine problem's source and scale.
  """
  nu = problem.weights
  mass = jax.ops.segment_sum(nu, labels, num_segments=k)
  total = jax.ops.segment_sum(nu[:, None] * problem.y, labels, num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones_like(nu), labels, num_segments=k)
  plain = jax.ops.segment_sum(problem.y, labels, num_segments=k) / jnp.maximum(counts, 1.0)[:, None]
  means = jnp.where(mass[:, None] > 0, total / jnp.maximum(mass, 1e-30)[:, None], plain)
  return solver_lib.SemidiscreteProblem(
      y=means, weights=mass / jnp.sum(mass), source=problem.source, scale=problem.scale,
      representative=jnp.arange(k, dtype=jnp.int32))


def segment_outer(v: jax.Array, segments: jax.Array, weights: jax.Array, k: int, chunk: int = 1024
                  ) -> jax.Array:
  """sum_{j in segment s} weights_j v_j v_j^T for each segment, chunk by chunk (memory chunk * d^2 + k * d^2).

  Args:
    v: Array of shape [N, d].
    segments: int32 array of shape [N], values in [0, k).
    weights: Array of shape [N].
    k: number of segments (static).
    chunk: rows per chunk (static).

  Returns:
    Array of shape [k, d, d].
  """
  n, d = v.shape
  pad = (-n) % chunk
  vp = jnp.pad(v, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  sp = jnp.pad(segments, (0, pad)).reshape(-1, chunk)
  wp = jnp.pad(weights, (0, pad)).reshape(-1, chunk)

  def body(i, acc):
    outer = wp[i][:, None, None] * vp[i][:, :, None] * vp[i][:, None, :]
    return acc + jax.ops.segment_sum(outer, sp[i], num_segments=k)

  return jax.lax.fori_loop(0, vp.shape[0], body, jnp.zeros((k, d, d), v.dtype))


def gaussian_heights(y: jax.Array, weights: jax.Array, source_mean: jax.Array, source_var: jax.Array) -> jax.Array:
  """Heights of the closed-form map from the source onto a Gaussian fitted to the codes.

  For an isotropic source of mean mu_s and per-coordinate variance v, and codes of weighted mean m and
  covariance S, the Brenier map onto N(m, S) is T(x) = m + A (x - mu_s) with A = S^(1/2) / sqrt(v). With
  z_i = y_i - m and h_i = -z_i^T A^(-1) z_i / 2 - <z_i, mu_s>, ``argmax_i <x, y_i> + h_i`` is the code
  nearest to T(x) in the A^(-1) metric: the semi-discrete start that matches the codes' first two moments.
  S is regularised by r = 1e-6 of its mean eigenvalue, so codes in a subspace are fine; its eigenvalues are
  clipped at r, since float32 eigh returns the null space of a singular S as eigenvalues of about +-1e-7 of
  the largest (below r or negative), which S^(-1/2) would blow up to heights of 1e9.

  Args:
    y: Array of shape [n, d], codes.
    weights: Array of shape [n], their weights.
    source_mean: Array of shape [d], the source's mean.
    source_var: scalar, the source's per-coordinate variance.

  Returns:
    Array of shape [n].
  """
  mean = jnp.sum(weights[:, None] * y, axis=0)
  z = y - mean[None, :]
  cov = (weights[:, None] * z).T @ z
  d = y.shape[1]
  reg = 1e-6 * jnp.trace(cov) / d + 1e-30
  evals, evecs = jnp.linalg.eigh(cov + reg * jnp.eye(d, dtype=y.dtype))
  # A^(-1) = sqrt(v) S^(-1/2).
  a_inv = (evecs * (jnp.sqrt(source_var) / jnp.sqrt(jnp.maximum(evals, reg)))[None, :]) @ evecs.T
  return -0.5 * jnp.sum((z @ a_inv) * z, axis=1) - z @ source_mean


def _psd_eigh(m: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Eigenvalues [..., d] and eigenvectors [..., d, d] of a batch of symmetric PSD matrices [..., d, d].

  Eigenvalues are clipped at 1e-5 of each matrix's largest: float32 eigh returns the null space of a
  singular matrix as eigenvalues of about +-1e-7 of the largest, which a negative power would blow up.
  """
  evals, evecs = jnp.linalg.eigh(m)
  floor = 1e-5 * jnp.max(evals, axis=-1, keepdims=True) + 1e-30
  return jnp.maximum(evals, floor), evecs


def _psd_power(evals: jax.Array, evecs: jax.Array, power: float) -> jax.Array:
  """m^power [..., d, d] from :func:`_psd_eigh`'s output."""
  return (evecs * evals[..., None, :] ** power) @ jnp.swapaxes(evecs, -1, -2)


def sampled_energy(x: jax.Array, y: jax.Array, h: jax.Array, weights: jax.Array, batch: int) -> jax.Array:
  """E(h) = mean_x max_i (<x, y_i> + h_i) - sum_i nu_i h_i on a fixed sample, batch by batch.

  Args:
    x: Array of shape [P, d], source samples (P a multiple of ``batch``).
    y: Array of shape [n, d], targets.
    h: Array of shape [n], heights (cells of weight 0 are masked).
    weights: Array of shape [n], target weights nu.
    batch: samples per assignment call (static).

  Returns:
    Scalar, the sampled energy (convex in h: an average of maxima of affine functions).
  """
  h_eff = solver_lib.masked_heights(h, weights)
  xb = x.reshape(-1, batch, x.shape[1])

  def body(i, total):
    _, best = kernels.assign(xb[i], y, h_eff, method="argmax")
    return total + jnp.sum(best)

  total = jax.lax.fori_loop(0, xb.shape[0], body, jnp.zeros((), jnp.float32))
  return total / x.shape[0] - jnp.sum(jnp.where(weights > 0, weights * h, 0.0))


def line_minimise(f, lo: float, hi: float, steps: int) -> jax.Array:
  """Golden-section search for the minimiser of a convex scalar function on [lo, hi].

  Args:
    f: traceable function of a scalar array, convex on [lo, hi].
    lo, hi: the bracket.
    steps: function evaluations after the first two (static; the bracket shrinks by 0.618 per step).

  Returns:
    Scalar, the midpoint of the final bracket.
  """
  g = (math.sqrt(5.0) - 1.0) / 2.0
  a, b = jnp.float32(lo), jnp.float32(hi)
  c, d = b - g * (b - a), a + g * (b - a)

  def body(_, carry):
    a, b, c, d, fc, fd = carry
    left = fc <= fd  # the minimiser lies in [a, d]
    a, b = jnp.where(left, a, c), jnp.where(left, d, b)
    new = jnp.where(left, b - g * (b - a), a + g * (b - a))
    fn = f(new)
    c, d = jnp.where(left, new, d), jnp.where(left, c, new)
    fc, fd = jnp.where(left, fn, fd), jnp.where(left, fc, fn)
    return a, b, c, d, fc, fd

  a, b, *_ = jax.lax.fori_loop(0, steps, body, (a, b, c, d, f(c), f(d)))
  return 0.5 * (a + b)


def refine_heights(key: jax.Array, problem: solver_lib.SemidiscreteProblem, labels: jax.Array,
                   coarse: solver_lib.SemidiscreteProblem, coarse_h: jax.Array, num_probe: int,
                   chunk: int = 1024, scale_samples: int = 0, scale_steps: int = 8,
                   max_scale: float = 1.5) -> Tuple[jax.Array, jax.Array]:
  """Fine heights from a coarse solution, by the per-cluster Gaussian map (see the module docstring).

  With ``scale_samples`` > 0 the quadratic (within-cluster) part of the heights is scaled by the factor
  c in [0, ``max_scale``] that minimises the energy on a fixed sample of that many source points
  (golden section; the heights are affine in c, so that sampled energy is convex in c). In high dimension
  a cluster holds few codes per dimension and the moment-matched map (c = 1) is far from the discrete
  optimum (measured at d = 64: c ~ 0.3 to 0.4 with 8 clusters of 625 codes).

  Args:
    key: PRNG key of the probe samples.
    problem: the fine problem (n targets in dimension d).
    labels: int32 array of shape [n], the cluster (coarse target) of each fine target.
    coarse: the coarse problem (:func:`coarse_problem`, K targets).
    coarse_h: Array of shape [K], the coarse heights.
    num_probe: source samples used to fit each coarse cell's Gaussian (static).
    chunk: fine targets per chunk when applying the per-cluster quadratic forms (memory chunk * d^2).
    scale_samples: source samples of the scale search (static; 0: no search, c = 1).
    scale_steps: golden-section steps of the scale search (static).
    max_scale: upper end of the searched scales (static).

  Returns:
    ``(h, c)``: Array of shape [n], mean-centred heights, and the scalar scale used.
  """
  k, d = coarse.y.shape
  nu = problem.weights
  x = problem.source.sample(key, num_probe)
  cells, _ = kernels.assign(x, coarse.y, solver_lib.masked_heights(coarse_h, coarse.weights), method="argmax")
  ones = jnp.ones((num_probe,), jnp.float32)
  count = jax.ops.segment_sum(ones, cells, num_segments=k)
  src_mean_all = jnp.mean(x, axis=0)
  src_var_all = jnp.mean(jnp.var(x, axis=0))
  m = jax.ops.segment_sum(x, cells, num_segments=k) / jnp.maximum(count, 1.0)[:, None]
  m = jnp.where(count[:, None] > 0, m, src_mean_all)
  xc = x - m[cells]
  sigma = segment_outer(xc, cells, ones, k, chunk) / jnp.maximum(count - 1.0, 1.0)[:, None, None]
  eye = jnp.eye(d, dtype=jnp.float32)[None]
  # A cell with fewer probe samples than dimensions has a singular fit: shrink it towards an isotropic
  # covariance of the same trace (all of it for a cell that no probe sample reached).
  shrink = jnp.clip((d + 1.0 - count) / (d + 1.0), 0.0, 1.0)[:, None, None]
  iso = jnp.trace(sigma, axis1=1, axis2=2)[:, None, None] / d
  iso = jnp.where(count[:, None, None] > 1, iso, src_var_all * 1e-2)
  sigma = (1.0 - shrink) * sigma + shrink * iso * eye + 1e-6 * src_var_all * eye

  mass = jax.ops.segment_sum(nu, labels, num_segments=k)
  z = problem.y - coarse.y[labels]
  s = segment_outer(z, labels, nu, k, chunk) / jnp.maximum(mass, 1e-30)[:, None, None]
  s = s + (1e-4 * jnp.trace(s, axis1=1, axis2=2)[:, None, None] / d + 1e-12) * eye

  sigma_half = _psd_power(*_psd_eigh(sigma), 0.5)
  middle_evals, middle_evecs = _psd_eigh(sigma_half @ s @ sigma_half)
  a_inv = sigma_half @ _psd_power(middle_evals, middle_evecs, -0.5) @ sigma_half

  def quad(args):
    zc, lab = args
    return jnp.einsum("nd,nde,ne->n", zc, a_inv[lab], zc)

  n = z.shape[0]
  pad = (-n) % chunk
  zp = jnp.pad(z, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  lp = jnp.pad(labels, (0, pad)).reshape(-1, chunk)
  q = jax.lax.map(quad, (zp, lp)).reshape(-1)[:n]
  linear = coarse_h[labels] - jnp.sum(m[labels] * z, axis=1)
  # tr(A Sigma) = tr((Sigma^(1/2) S Sigma^(1/2))^(1/2)): the eigenvalues' square roots, summed.
  quadratic = -0.5 * jnp.sum(jnp.sqrt(middle_evals), axis=1)[labels] - 0.5 * q
  if scale_samples > 0:
    batch = min(scale_samples, 65536)
    probe = problem.source.sample(jax.random.fold_in(key, 1), -(-scale_samples // batch) * batch)
    scale = line_minimise(lambda c: sampled_energy(probe, problem.y, linear + c * quadratic, nu, batch),
                          0.0, max_scale, scale_steps)
  else:
    scale = jnp.ones((), jnp.float32)
  return solver_lib.centre(linear + scale * quadratic, nu), scale


@jax.jit
def multiscale_start(solver: Any, problem: solver_lib.SemidiscreteProblem
                     ) -> Tuple[jax.Array, jax.Array]:
  """The ``"multiscale"`` start of a :class:`lsot_jax.newton.NewtonSolver`: k-means, a coarse solve with
  ``solver.coarse_solver(k)`` (itself multiscale down to ``solver.coarsest`` targets), the refinement.

  Args:
    solver: the fine level's solver (static: every field of a NewtonSolver is).
    problem: the fine problem (n targets).

  Returns:
    ``(h, scored)``: heights [n] and the coarse levels' work in samples scored against n targets.
  """
  n = problem.num_targets
  k = solver.level_sizes(n, problem.dim)[0]
  key = jax.random.key(0x3C5)
  _, labels = kmeans(jax.random.fold_in(key, 0), problem.y, problem.weights, k)
  coarse = coarse_problem(problem, labels, k)
  coarse_solver = solver.coarse_solver(k)
  state = coarse_solver.run(jax.random.fold_in(key, 1), coarse, coarse_solver.init(coarse))
  probe = min(max(64 * k, 16384), 1 << 18)
  scale_samples = solver.scale_samples_per_cell * n
  h, _ = refine_heights(jax.random.fold_in(key, 2), problem, labels, coarse, state.h, probe,
                        scale_samples=scale_samples, scale_steps=solver.scale_steps)
  # The scale search scores (scale_steps + 2) samples of scale_samples points against all n targets.
  search = (solver.scale_steps + 2) * scale_samples if scale_samples > 0 else 0
  return h, (state.samples_scored + probe) * (k / n) + search
