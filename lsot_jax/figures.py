"""Figures to look at: every method on one page with the power diagram, and latent interpolation strips.

* :func:`methods_panel`: one page for a 2-D problem (the eight-Gaussian ring, the 25-Gaussian grid). A grid
  of scatter panels with shared limits, the real data first, one panel per method and, for a fitted
  :class:`~lsot_jax.solver.BrenierPotential`, a panel "LSOT: source cells": the power diagram rasterised in
  SOURCE space (:func:`cell_raster`), cells coloured by their code's cluster, cell boundaries lighter and
  the singular set (facets between far-apart codes, where the Brenier map jumps) in
  black. In the data-space panels of the LSOT methods the jumps are drawn as thin red chords from one side's
  code to the other's: the map sends the two sides of such a facet to different modes and nothing in between.
* :func:`interpolation_strip`: for images, the straight line x_t between two source points, each method's map
  applied to it (:func:`lsot_samplers` builds ``exact`` and ``extended`` as :mod:`lsot_jax.generate` defines
  them) and decoded; one row per method, a red bar between the columns where the exact map's cell changes
  (:func:`cell_changes`). ``exact`` is piecewise constant and jumps at every facet; ``extended`` is
  continuous inside a mode and jumps only across the singular set.

Everything is a function of arrays and potentials that returns a matplotlib figure (Agg backend) and writes
a PNG when given a ``path``. ``python -m lsot_jax.figures --demo OUT_DIR`` writes both figures for the
eight-Gaussian ring and for scikit-learn's digits (see :func:`main`).

Singular set. A facet between cells i and j is singular (the map jumps there, also ``extended``) when the
dihedral angle between the two codes' facet normals (:func:`lsot_jax.generate.normal_angles`) is at least
``extended``'s angle threshold (:func:`lsot_jax.generate.default_angle_threshold` unless given); a source
point x in cell i lies on it when its facet distance (s_i(x) - s_j(x)) / |y_i - y_j| (s the scores
<x, y> + h, j among its ``top_k`` best cells) is below a band.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
from matplotlib import collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.figure  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from lsot_jax import generate  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsot_jax import kernels  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsot_jax import solver as solver_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

__all__ = [
    "CellRaster",
    "JumpSet",
    "cell_boundaries",
    "cell_changes",
    "cell_raster",
    "grid_points",
    "interpolation_strip",
    "line_points",
    "lsot_samplers",
    "main",
    "map_jumps",
    "methods_panel",
    "strip_mosaic",
]

Extent = Tuple[float, float, float, float]
# Light colours for the cells (the tab20 pale half), so the black singular set stays visible.
_PALETTE = np.asarray(plt.get_cmap("tab20").colors, np.float64)[1::2]
_JUMP_COLOUR = (0.85, 0.1, 0.1)
# Most chords drawn per data-space panel (a random subset of the jump pairs, fixed seed).
_MAX_CHORDS = 400


@dataclasses.dataclass(frozen=True)
class JumpSet:
  """Where the Brenier map jumps, for a batch of source points.

  Attributes:
    mask: bool array of shape [M]; the point lies within ``band`` of a singular facet.
    first: int32 array of shape [M], the point's cell (its best score).
    second: int32 array of shape [M], its runner-up cell.
    distance: array of shape [M], the source-space distance to the facet between the two cells.
  """

  mask: np.ndarray
  first: np.ndarray
  second: np.ndarray
  distance: np.ndarray


@dataclasses.dataclass(frozen=True)
class CellRaster:
  """The power diagram rasterised on a regular grid of source points.

  Attributes:
    idx: int32 array of shape [ny, nx], ``potential.assign`` of each pixel centre (row 0 at the bottom).
    jumps: bool array of shape [ny, nx], pixels on the singular set: a 4-neighbour pixel lies in a cell
      whose code is far from this pixel's (dihedral angle >= the threshold, see :func:`map_jumps`).
    second: int32 array of shape [ny, nx], that neighbour's cell on singular pixels, ``idx`` elsewhere.
    extent: ``(xmin, xmax, ymin, ymax)`` of the grid.
  """

  idx: np.ndarray
  jumps: np.ndarray
  second: np.ndarray
  extent: Extent


def _check_extent(extent, name: str) -> Extent:
  try:
    x0, x1, y0, y1 = (float(v) for v in extent)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be (xmin, xmax, ymin, ymax), got {extent!r}.") from None
  if not (x1 > x0 and y1 > y0):
    raise ValueError(f"{name} must have xmax > xmin and ymax > ymin, got {extent!r}.")
  return x0, x1, y0, y1


def _check_2d_potential(potential: solver_lib.BrenierPotential) -> None:
  if potential.y.ndim != 2 or potential.y.shape[1] != 2:
    raise ValueError(f"potential: the source-cells panel needs 2-D codes y [n, 2], got {potential.y.shape}.")


def grid_points(extent: Extent, resolution: int) -> np.ndarray:
  """Pixel centres of a ``resolution x resolution`` grid over ``extent``, row-major from the bottom.

  Args:
    extent: ``(xmin, xmax, ymin, ymax)``.
    resolution: pixels per side (>= 2).

  Returns:
    float32 array of shape [resolution**2, 2]; point ``r * resolution + c`` is the centre of row r (from
    ymin) and column c (from xmin).
  """
  x0, x1, y0, y1 = _check_extent(extent, "extent")
  if int(resolution) < 2:
    raise ValueError(f"resolution must be >= 2, got {resolution}.")
  res = int(resolution)
  xs = x0 + (np.arange(res) + 0.5) * (x1 - x0) / res
  ys = y0 + (np.arange(res) + 0.5) * (y1 - y0) / res
  gx, gy = np.meshgrid(xs, ys)
  return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("k",))
def _jump_distance(x: jax.Array, y: jax.Array, h: jax.Array, angle_threshold: jax.Array, k: int
                   ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """(distance to the nearest far cell [M], cell [M], that far cell [M]) of :func:`map_jumps`."""
  vals, idx = kernels.top_k(x, y, h, k)
  yc = y[idx]  # [M, k, d]
  # d[m, l, j] = (s_l - s_j) / |y_l - y_j|: the signed distance to the hyperplane between cells l and j, so
  # t_j = max_{l != j} d[l, j] is the distance to cell j (among the candidates), as in generate.extended.
  sep = jnp.linalg.norm(yc[:, :, None, :] - yc[:, None, :, :], axis=-1)
  gap = vals[:, :, None] - vals[:, None, :]
  d = jnp.where(sep > 0, gap / jnp.where(sep > 0, sep, 1.0), -jnp.inf)
  t = jnp.max(jnp.where(~jnp.eye(k, dtype=bool)[None, :, :], d, -jnp.inf), axis=1)[:, 1:]  # [M, k - 1]
  far = generate.normal_angles(yc[:, :1], yc[:, 1:]) >= angle_threshold
  dist = jnp.where(far, t, jnp.inf)
  pick = jnp.argmin(dist, axis=1)
  distance = jnp.min(dist, axis=1)
  second = jnp.where(jnp.isfinite(distance), jnp.take_along_axis(idx[:, 1:], pick[:, None], axis=1)[:, 0],
                     idx[:, 1])
  return distance, idx[:, 0], second


_assign = jax.jit(lambda potential, x: potential.assign(x))
_default_angle_threshold = jax.jit(generate.default_angle_threshold)
_default_blend_radius = jax.jit(generate.default_blend_radius)
_score_gap = jax.jit(solver_lib.score_gap)


def map_jumps(
    potential: solver_lib.BrenierPotential,
    x,
    *,
    band: float,
    angle_threshold: Optional[float] = None,
    top_k: int = 8,
) -> JumpSet:
  """Source points on the singular set: within ``band`` of a facet between far-apart codes.

  For each point x, with i its cell, the candidates are its ``top_k`` best cells j whose code is far from y_i
  (dihedral angle >= ``angle_threshold``); the distance from x to cell j is taken as in
  :func:`lsot_jax.generate.extended`, t_j = max_{l != j} (s_l - s_j) / |y_l - y_j| over the candidates l
  (s the scores; exact away from the cells' corners), and x is on the singular set when min_j t_j < band.
  A far cell outside the top k is missed, as in ``extended``.

  Args:
    potential: the fitted potential (y [n, d], h [n], n >= 2).
    x: array of shape [M, d], source points.
    band: source-space distance to the facet below which a point counts as on it (> 0).
    angle_threshold: dihedral angle (radians) from which two codes are far apart; None: ``extended``'s
      default, :func:`lsot_jax.generate.default_angle_threshold` of the codes.
    top_k: candidate cells per point (static), clipped to n.

  Returns:
    The :class:`JumpSet` (NumPy arrays); ``second`` is the far cell of the nearest singular facet (the
    runner-up cell where no candidate is far) and ``distance`` is inf where no candidate is far.
  """
  if not float(band) > 0:
    raise ValueError(f"band must be a positive source-space length, got {band}.")
  y = potential.y
  if y.shape[0] < 2:
    raise ValueError(f"potential: map_jumps needs at least 2 codes, got {y.shape[0]}.")
  if int(top_k) < 2:
    raise ValueError(f"top_k must be >= 2, got {top_k}.")
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"x must have shape [M, {y.shape[1]}], got {x.shape}.")
  if angle_threshold is None:
    angle_threshold = float(_default_angle_threshold(y))
  distance, first, second = _jump_distance(x, y, potential.h, jnp.float32(angle_threshold),
                                           min(int(top_k), y.shape[0]))
  distance = np.asarray(distance)
  return JumpSet(mask=distance < float(band), first=np.asarray(first),
                 second=np.asarray(second), distance=distance)


def cell_raster(
    potential: solver_lib.BrenierPotential,
    extent: Extent,
    *,
    resolution: int = 200,
    angle_threshold: Optional[float] = None,
) -> CellRaster:
  """Rasterises the power diagram of a 2-D potential over ``extent`` of the source space.

  Args:
    potential: the fitted potential with 2-D codes (y [n, 2], h [n]).
    extent: ``(xmin, xmax, ymin, ymax)`` in source space.
    resolution: pixels per side.
    angle_threshold: dihedral angle (radians) from which two codes are far apart (see :func:`map_jumps`).

  Returns:
    The :class:`CellRaster`; ``idx`` is ``potential.assign`` of :func:`grid_points`; the singular set is
    exact at the pixel scale (it does not rely on a top-k candidate list, unlike :func:`map_jumps`).
  """
  _check_2d_potential(potential)
  extent = _check_extent(extent, "extent")
  res = int(resolution)
  pts = grid_points(extent, res)
  idx = np.asarray(_assign(potential, jnp.asarray(pts))).reshape(res, res).astype(np.int32)
  if angle_threshold is None:
    angle_threshold = float(_default_angle_threshold(potential.y))
  y = np.asarray(potential.y)
  jumps, second = np.zeros(idx.shape, bool), idx.copy()
  # Each pair of 4-neighbour pixels in different, far-apart cells marks both pixels (right, then up).
  for a, b in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
               ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
    ia, ib = idx[a], idx[b]
    far = (ia != ib) & (np.asarray(generate.normal_angles(jnp.asarray(y[ia]), jnp.asarray(y[ib])))
                        >= float(angle_threshold))
    jumps[a] |= far
    jumps[b] |= far
    second[a] = np.where(far, ib, second[a])
    second[b] = np.where(far, ia, second[b])
  return CellRaster(idx=idx, jumps=jumps, second=second, extent=extent)


def cell_boundaries(idx: np.ndarray) -> np.ndarray:
  """Pixels of a label image whose right or upper neighbour lies in another cell.

  Args:
    idx: int array of shape [ny, nx].

  Returns:
    bool array of shape [ny, nx].
  """
  idx = np.asarray(idx)
  if idx.ndim != 2:
    raise ValueError(f"idx must be a 2-D label image, got shape {idx.shape}.")
  edge = np.zeros(idx.shape, bool)
  edge[:, :-1] |= idx[:, 1:] != idx[:, :-1]
  edge[:-1, :] |= idx[1:, :] != idx[:-1, :]
  return edge


def cell_changes(potential: solver_lib.BrenierPotential, x) -> np.ndarray:
  """Where consecutive points of a path lie in different cells: the exact map's jumps along it.

  Args:
    potential: the fitted potential.
    x: array of shape [T, d], points along a path (e.g. :func:`line_points`).

  Returns:
    bool array of shape [T - 1]; entry t is True when x_t and x_{t+1} have different cells.
  """
  idx = np.asarray(_assign(potential, jnp.asarray(x, jnp.float32)))
  return idx[1:] != idx[:-1]


def _panel_grid(num: int, ncols: Optional[int]) -> Tuple[matplotlib.figure.Figure, Sequence]:
  ncols = ncols or min(num, 4)
  nrows = -(-num // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * nrows), dpi=100, squeeze=False)
  flat = list(axes.ravel())
  for ax in flat[num:]:
    fig.delaxes(ax)
  return fig, flat[:num]


def _data_extent(real: np.ndarray) -> Extent:
  lo, hi = real.min(axis=0), real.max(axis=0)
  margin = 0.15 * float(np.max(hi - lo)) or 1.0
  return lo[0] - margin, hi[0] + margin, lo[1] - margin, hi[1] + margin


def _cell_image(raster: CellRaster, cell_colors: Optional[np.ndarray]) -> np.ndarray:
  """RGB image [ny, nx, 3] of a raster: pale cells, lighter boundaries, black singular set."""
  colour_of = raster.idx if cell_colors is None else np.asarray(cell_colors)[raster.idx]
  img = _PALETTE[np.mod(colour_of, _PALETTE.shape[0])]
  edge = cell_boundaries(raster.idx)
  img[edge] = 0.5 * img[edge] + 0.5
  img[raster.jumps] = 0.0
  return img


def methods_panel(
    samples: Dict[str, np.ndarray],
    real: np.ndarray,
    *,
    potential: Optional[solver_lib.BrenierPotential] = None,
    labels: Optional[Dict[str, str]] = None,
    extent: Optional[Extent] = None,
    path: Optional[os.PathLike | str] = None,
    means: Optional[np.ndarray] = None,
    cell_colors: Optional[np.ndarray] = None,
    source_extent: Extent = (-3.0, 3.0, -3.0, 3.0),
    resolution: int = 200,
    angle_threshold: Optional[float] = None,
    jump_methods: Sequence[str] = ("exact", "extended"),
    ncols: Optional[int] = None,
) -> matplotlib.figure.Figure:
  """All methods of a 2-D problem side by side on one page, with the power diagram of the LSOT fit.

  Args:
    samples: ``{method: array [N, 2]}``, one panel each, in this order.
    real: array of shape [M, 2], the real (held-out) data: the first panel, and grey under every other.
    potential: the fitted potential (codes y [n, 2], heights h [n]); adds the panel "LSOT: source cells"
      and the jump chords in the panels of ``jump_methods``. None: neither.
    labels: ``{method: title}``; the method name where missing.
    extent: ``(xmin, xmax, ymin, ymax)`` shared by the data panels; default: the real data's box plus 15 %.
    path: if given, the PNG written.
    means: optional array [K, 2] of mode centres, drawn as red crosses.
    cell_colors: optional int array [n], the colour class of each code's cell (e.g. its cluster); default:
      the cell index. Colours cycle through 10 pale hues.
    source_extent: ``(xmin, xmax, ymin, ymax)`` of the source-cells panel (default: +-3 std of a standard
      Gaussian source).
    resolution: pixels per side of the source-cells raster.
    angle_threshold: see :func:`map_jumps`.
    jump_methods: methods whose data-space panel gets the jump chords.
    ncols: panels per row (default: up to 4).

  Returns:
    The figure: ``1 + len(samples)`` axes (+ 1 with ``potential``), in the order data, methods, cells.
  """
  real = np.asarray(real, np.float32)
  if real.ndim != 2 or real.shape[1] != 2 or real.shape[0] == 0:
    raise ValueError(f"real must have shape [M, 2] with M >= 1, got {real.shape}.")
  for name, pts in samples.items():
    if np.ndim(pts) != 2 or np.shape(pts)[1] != 2:
      raise ValueError(f"samples[{name!r}] must have shape [N, 2], got {np.shape(pts)}.")
  labels = labels or {}
  x0, x1, y0, y1 = _check_extent(extent, "extent") if extent is not None else _data_extent(real)
  raster = None
  if potential is not None:
    _check_2d_potential(potential)
    if cell_colors is not None and np.shape(cell_colors) != (potential.y.shape[0],):
      raise ValueError(f"cell_colors must have shape [n] = [{potential.y.shape[0]}], got {np.shape(cell_colors)}.")
    raster = cell_raster(potential, source_extent, resolution=resolution, angle_threshold=angle_threshold)
  fig, axes = _panel_grid(1 + len(samples) + (raster is not None), ncols)

  chords = None
  if raster is not None and raster.jumps.any():
    pairs = np.unique(np.stack([raster.idx[raster.jumps], raster.second[raster.jumps]], axis=1), axis=0)
    if pairs.shape[0] > _MAX_CHORDS:
      pairs = pairs[np.random.default_rng(0).choice(pairs.shape[0], _MAX_CHORDS, replace=False)]
    y = np.asarray(potential.y)
    chords = np.stack([y[pairs[:, 0]], y[pairs[:, 1]]], axis=1)  # [P, 2 ends, 2]

  panels = [("data", real, "data (held-out)")] + [
      (name, np.asarray(pts), labels.get(name, name)) for name, pts in samples.items()]
  for ax, (name, pts, title) in zip(axes, panels):
    if name != "data":
      ax.scatter(real[:, 0], real[:, 1], s=2, c="0.8", linewidths=0, zorder=1)
    if chords is not None and name in jump_methods:
      ax.add_collection(collections.LineCollection(chords, colors=[_JUMP_COLOUR], linewidths=0.3, alpha=0.3,
                                                   zorder=2))
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="0.3" if name == "data" else "tab:blue", alpha=0.6,
               linewidths=0, zorder=3)
    if means is not None:
      ax.scatter(means[:, 0], means[:, 1], s=30, c="tab:red", marker="+", linewidths=0.6, zorder=4)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.set_title(title + (" (red: the map's jumps)" if chords is not None and name in jump_methods else ""),
                 fontsize=7)
    ax.tick_params(labelsize=6)
  if raster is not None:
    ax = axes[-1]
    ax.imshow(_cell_image(raster, cell_colors), origin="lower", extent=raster.extent, interpolation="nearest")
    ax.set_title("LSOT: source cells (black: singular set)", fontsize=7)
    ax.tick_params(labelsize=6)
  fig.tight_layout()
  if path is not None:
    _save(fig, path)
  return fig


def _save(fig: matplotlib.figure.Figure, path: os.PathLike | str) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  return path


def line_points(x_a, x_b, steps: int) -> np.ndarray:
  """The straight line x_t = (1 - t) x_a + t x_b at ``steps`` evenly spaced t in [0, 1].

  Args:
    x_a: array of shape [d].
    x_b: array of shape [d].
    steps: number of points (>= 2).

  Returns:
    float32 array of shape [steps, d].
  """
  x_a, x_b = np.asarray(x_a, np.float64), np.asarray(x_b, np.float64)
  if x_a.ndim != 1 or x_a.shape != x_b.shape:
    raise ValueError(f"x_a and x_b must be points of the same shape [d], got {x_a.shape} and {x_b.shape}.")
  if int(steps) < 2:
    raise ValueError(f"steps must be >= 2, got {steps}.")
  t = np.linspace(0.0, 1.0, int(steps))[:, None]
  return ((1.0 - t) * x_a[None, :] + t * x_b[None, :]).astype(np.float32)


def lsot_samplers(
    potential: solver_lib.BrenierPotential,
    *,
    angle_threshold: Optional[float] = None,
    radius: Optional[float] = None,
    probe=None,
    blend_scale: float = generate.DEFAULT_BLEND_SCALE,
) -> Dict[str, Callable[[jax.Array], jax.Array]]:
  """The ``exact`` and ``extended`` maps of a potential, as :mod:`lsot_jax.generate` defines them.

  Args:
    potential: the fitted potential (y [n, d], h [n]).
    angle_threshold: ``extended``'s dihedral-angle threshold; None: the sample stage's default,
      :func:`lsot_jax.generate.default_angle_threshold` (pass the run's value, e.g.
      ``pipeline.lsot_generate_kwargs(config, "extended", ...)``, to match a configured one).
    radius: ``extended``'s blend radius; None: :func:`lsot_jax.generate.default_blend_radius` on ``probe``.
    probe: array [P, d] of source samples, needed when ``radius`` is None (the sample stage draws 2,048).
    blend_scale: the ``scale`` of that estimate (the run's ``sample.blend_scale``).

  Returns:
    ``{"exact": f, "extended": f}``, each jitted ``f(x [T, d]) -> codes [T, d]``.
  """
  y, h = potential.y, potential.h
  if angle_threshold is None:
    angle_threshold = float(_default_angle_threshold(y))
  if radius is None:
    if probe is None:
      raise ValueError("lsot_samplers: pass radius= or probe= (source samples to estimate the blend radius).")
    radius = float(_default_blend_radius(jnp.asarray(probe, jnp.float32), y, h, scale=blend_scale))
  thr, rad = float(angle_threshold), float(radius)
  return {
      "exact": jax.jit(lambda x: generate.exact(x, y, h)),
      "extended": jax.jit(lambda x: generate.extended(x, y, h, angle_threshold=thr, radius=rad)),
  }


def strip_mosaic(images: np.ndarray, jumps: np.ndarray, *, pad: int = 2) -> np.ndarray:
  """Tiles images [R, T, H, W, C] into one RGB image, a red bar between the columns where ``jumps`` holds.

  Args:
    images: array of shape [R, T, H, W, C] (C = 1 or 3), values in [0, 1] (clipped).
    jumps: bool array of shape [T - 1]; entry t marks the gap between columns t and t + 1.
    pad: pixels between tiles (>= 1); the bars fill the gaps, over every row.

  Returns:
    float32 array of shape [R * (H + pad) + pad, T * (W + pad) + pad, 3] in [0, 1], white around tiles.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 5 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must have shape [rows, steps, H, W, C] with C = 1 or 3, got {images.shape}.")
  r, t, hh, ww, _ = images.shape
  jumps = np.asarray(jumps, bool)
  if jumps.shape != (t - 1,):
    raise ValueError(f"jumps must have shape [steps - 1] = [{t - 1}], got {jumps.shape}.")
  if int(pad) < 1:
    raise ValueError(f"pad must be >= 1, got {pad}.")
  pad = int(pad)
  rgb = np.clip(np.nan_to_num(np.broadcast_to(images, images.shape[:-1] + (3,))), 0.0, 1.0)
  out = np.ones((r * (hh + pad) + pad, t * (ww + pad) + pad, 3), np.float32)
  for col in np.flatnonzero(jumps) + 1:
    out[:, col * (ww + pad):col * (ww + pad) + pad] = _JUMP_COLOUR
  for i in range(r):
    for j in range(t):
      y0, x0 = pad + i * (hh + pad), pad + j * (ww + pad)
      out[y0:y0 + hh, x0:x0 + ww] = rgb[i, j]
  return out


def interpolation_strip(
    decode: Callable[[jax.Array], jax.Array],
    x_a,
    x_b,
    samplers: Dict[str, Callable[[jax.Array], jax.Array]],
    steps: int = 10,
    path: Optional[os.PathLike | str] = None,
    *,
    potential: Optional[solver_lib.BrenierPotential] = None,
    labels: Optional[Dict[str, str]] = None,
    pad: int = 2,
) -> matplotlib.figure.Figure:
  """Each method's map along the line between two source points, decoded: one row per method.

  The red bars sit between the columns where the exact map's cell changes: :func:`cell_changes` of
  ``potential`` when given, otherwise where the ``"exact"`` row's code changes (no bars without either).

  Args:
    decode: codes [T, d_latent] -> images [T, H, W, C] (C = 1 or 3) in [0, 1].
    x_a: array of shape [d], the first source point.
    x_b: array of shape [d], the last source point.
    samplers: ``{method: f(x [T, d]) -> codes [T, d_latent]}`` (e.g. :func:`lsot_samplers`), one row each.
    steps: number of points on the line (columns).
    path: if given, the PNG written.
    potential: the fitted potential, to mark the exact map's cell changes.
    labels: ``{method: row label}``; the method name where missing.
    pad: pixels between tiles.

  Returns:
    The figure: one axes whose image is :func:`strip_mosaic` of the rows and the jumps.
  """
  if not samplers:
    raise ValueError("samplers must hold at least one method.")
  labels = labels or {}
  x = line_points(x_a, x_b, steps)
  rows, exact_codes = [], None
  for name, fn in samplers.items():
    codes = np.asarray(fn(jnp.asarray(x)))
    if codes.ndim != 2 or codes.shape[0] != x.shape[0]:
      raise ValueError(f"samplers[{name!r}] must map [T, d] to codes [T, d_latent]; got {codes.shape}.")
    img = np.asarray(decode(jnp.asarray(codes)), np.float32)
    if img.ndim == 3:
      img = img[..., None]
    if img.ndim != 4 or img.shape[0] != x.shape[0] or img.shape[-1] not in (1, 3):
      raise ValueError(f"decode must return images [T, H, W, C] with C = 1 or 3, got {img.shape}.")
    rows.append(img)
    if name == "exact":
      exact_codes = codes
  if potential is not None:
    jumps = cell_changes(potential, x)
  elif exact_codes is not None:
    jumps = np.any(exact_codes[1:] != exact_codes[:-1], axis=1)
  else:
    jumps = np.zeros((x.shape[0] - 1,), bool)
  mosaic = strip_mosaic(np.stack(rows), jumps, pad=pad)
  hh, ww = rows[0].shape[1:3]
  fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * x.shape[0] + 1.5), 0.55 * len(rows) + 0.9), dpi=120)
  ax.imshow(mosaic, interpolation="nearest")
  ax.set_yticks([pad + i * (hh + pad) + hh / 2 for i in range(len(rows))])
  ax.set_yticklabels([labels.get(name, name) for name in samplers], fontsize=7)
  ax.set_xticks([pad + j * (ww + pad) + ww / 2 for j in range(x.shape[0])])
  ax.set_xticklabels([f"{t:.2g}" for t in np.linspace(0.0, 1.0, x.shape[0])], fontsize=6)
  ax.set_xlabel("t on the source line x_t = (1 - t) x_a + t x_b (red: the exact map changes cell)",
                fontsize=7)
  ax.tick_params(length=0)
  fig.tight_layout()
  if path is not None:
    _save(fig, path)
  return fig


_DEMO_LABELS = {"exact": "LSOT exact", "extended": "LSOT extended", "soft": "LSOT soft",
                "gaussian": "one Gaussian", "gmm": "GMM (8)"}


def _fit(codes: np.ndarray, key: jax.Array) -> Tuple[solver_lib.SemidiscreteProblem, solver_lib.BrenierPotential]:
  """The pipeline's default Adam fit of a uniform target on ``codes`` [n, d], standard Gaussian source."""
  problem = solver_lib.make_problem(codes)
  solver = solver_lib.BrenierSolver(num_iterations=400, batch_size=4096, max_batch_size=16384, tol=0.1)
  potential, _ = jax.jit(solver)(key, problem)
  return problem, potential


def _ring_demo(out_dir: pathlib.Path, key: jax.Array, log: Callable[[str], None]) -> pathlib.Path:
  from lsot_jax import baselines, data  # pylint: disable=g-import-not-at-top
  train = data.load_dataset("ring", "train", num_examples=2000)
  test = data.load_dataset("ring", "test", num_examples=2500)
  problem, potential = _fit(train.x, jax.random.fold_in(key, 0))
  log("ring: potential fitted")
  y, h, num = potential.y, potential.h, 2500
  maps = lsot_samplers(potential, probe=problem.source.sample(jax.random.fold_in(key, 1), 2048))
  temperature = float(_score_gap(problem.source.sample(jax.random.fold_in(key, 1), 2048), y, h))
  maps["soft"] = jax.jit(lambda z: generate.soft(z, y, h, temperature=temperature))
  samples = {m: np.asarray(maps[m](problem.source.sample(jax.random.fold_in(key, 10 + i), num)))
             for i, m in enumerate(("exact", "extended", "soft"))}
  samples["gaussian"] = np.asarray(baselines.sample_gaussian(
      baselines.fit_gaussian(train.x), jax.random.fold_in(key, 20), num))
  samples["gmm"] = np.asarray(baselines.sample_gmm(
      baselines.fit_gmm(train.x, 8, seed=0), jax.random.fold_in(key, 21), num))
  means, _ = data.toy_modes("ring")
  path = out_dir / "ring_methods.png"
  fig = methods_panel(samples, test.x, potential=potential, labels=_DEMO_LABELS, means=means,
                      cell_colors=train.labels, path=path, ncols=4)
  plt.close(fig)
  log(f"wrote {path}")
  return path


def _digits_demo(out_dir: pathlib.Path, key: jax.Array, log: Callable[[str], None],
                 latent_dim: int = 8, steps: int = 12) -> Tuple[pathlib.Path, pathlib.Path]:
  from sklearn import decomposition  # pylint: disable=g-import-not-at-top
  from lsot_jax import data  # pylint: disable=g-import-not-at-top
  train = data.load_dataset("digits", "train")
  flat = train.x.reshape(train.x.shape[0], -1)
  pca = decomposition.PCA(latent_dim, random_state=0).fit(flat)
  codes = pca.transform(flat).astype(np.float32)
  problem, potential = _fit(codes, jax.random.fold_in(key, 2))
  log("digits: potential fitted")

  def decode(c):
    return np.clip(pca.inverse_transform(np.asarray(c, np.float64)), 0.0, 1.0).reshape(-1, 8, 8, 1)

  samplers = lsot_samplers(potential, probe=problem.source.sample(jax.random.fold_in(key, 3), 2048))
  z = np.asarray(problem.source.sample(jax.random.fold_in(key, 4), 256))
  digit = train.labels[np.asarray(potential.assign(jnp.asarray(z)))]
  across = (z[0], z[int(np.flatnonzero(digit != digit[0])[0])])
  same = np.flatnonzero(digit == digit[0])[1:]
  within = (z[0], z[int(same[np.argmax(np.linalg.norm(z[same] - z[0], axis=1))])])
  paths = []
  for name, (x_a, x_b) in (("across", across), ("within", within)):
    path = out_dir / f"digits_strip_{name}.png"
    fig = interpolation_strip(decode, x_a, x_b, samplers, steps=steps, path=path, potential=potential,
                              labels=_DEMO_LABELS)
    plt.close(fig)
    log(f"wrote {path}")
    paths.append(path)
  return paths[0], paths[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``python -m lsot_jax.figures --demo OUT_DIR``: the figures of the ring and of the digits.

  Writes ``ring_methods.png`` (:func:`methods_panel` of LSOT exact / extended / soft, one Gaussian and an
  8-component GMM on the eight-Gaussian ring, 2,000 training codes fitted in data space, 2,500 samples
  each) and ``digits_strip_across.png`` / ``digits_strip_within.png`` (:func:`interpolation_strip` of
  exact / extended between two source points whose cells hold different digits / the same digit; the
  "decoder" is an 8-component PCA of scikit-learn's 8 x 8 digits, a linear stand-in for an autoencoder).
  129 s wall (61 s of CPU time) on the shared 2-core CPU of this project.

  Args:
    argv: command-line arguments (default: ``sys.argv[1:]``).

  Returns:
    The exit status, 0.
  """
  parser = argparse.ArgumentParser(prog="python -m lsot_jax.figures", description=main.__doc__.split("\n")[0])
  parser.add_argument("--demo", metavar="OUT_DIR", required=True, help="folder the PNGs are written to")
  parser.add_argument("--seed", type=int, default=0, help="seed of every random key")
  args = parser.parse_args(argv)
  out_dir = pathlib.Path(args.demo)
  out_dir.mkdir(parents=True, exist_ok=True)
  key = jax.random.key(args.seed)
  start = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)
  _ring_demo(out_dir, key, log)
  _digits_demo(out_dir, key, log)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
