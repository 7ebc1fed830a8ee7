"""Tests for lsot_jax.figures: the rasterised power diagram, jump detection, the panel and the strip."""
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from lsot_jax import figures
from lsot_jax import solver as solver_lib

RED = np.asarray((0.85, 0.1, 0.1), np.float32)


def _potential(y, h):
  return solver_lib.BrenierPotential(y=jnp.asarray(y, jnp.float32), h=jnp.asarray(h, jnp.float32))


# Three codes: a near pair at x1 = -1 (their facet is the x1 axis, x2 = 0) and a far code at (1, 0).
THREE = ([(-1.0, -0.01), (-1.0, 0.01), (1.0, 0.0)], [0.0, 0.0, 0.0])


def test_grid_points_are_pixel_centres():
  pts = figures.grid_points((0.0, 4.0, -1.0, 1.0), 4)
  assert pts.shape == (16, 2)
  np.testing.assert_allclose(pts[:4, 0], [0.5, 1.5, 2.5, 3.5])
  np.testing.assert_allclose(pts[::4, 1], [-0.75, -0.25, 0.25, 0.75])


def test_cell_raster_equals_assign_and_brute_force(np_rng):
  y, h = np_rng.normal(size=(7, 2)), 0.3 * np_rng.normal(size=7)
  pot = _potential(y, h)
  extent = (-2.0, 2.0, -1.5, 2.5)
  raster = figures.cell_raster(pot, extent, resolution=24, angle_threshold=0.5)
  pts = figures.grid_points(extent, 24)
  assert raster.idx.shape == (24, 24)
  np.testing.assert_array_equal(raster.idx.ravel(), np.asarray(pot.assign(jnp.asarray(pts))))
  brute = np.argmax(pts.astype(np.float64) @ y.T + h[None, :], axis=1)
  np.testing.assert_array_equal(raster.idx.ravel(), brute)


def test_two_cells_boundary_is_the_shifted_bisector():
  # s_1 - s_0 = 2 x1 + h_1 - h_0: the bisector x1 = 0 moved to x1 = (h_0 - h_1) / 2 = 0.2.
  pot = _potential([(-1.0, 0.0), (1.0, 0.0)], [0.3, -0.1])
  raster = figures.cell_raster(pot, (-1.0, 1.0, -1.0, 1.0), resolution=20, angle_threshold=0.1)
  centres = -0.95 + 0.1 * np.arange(20)
  expected = np.broadcast_to((centres > 0.2).astype(np.int32)[None, :], (20, 20))
  np.testing.assert_array_equal(raster.idx, expected)
  edge = figures.cell_boundaries(raster.idx)
  cols = np.flatnonzero(edge.any(axis=0))
  np.testing.assert_array_equal(cols, [11])  # the pixel at x1 = 0.15, left of the boundary
  assert edge[:, 11].all()
  # The two codes are far apart: the pixels within one pixel diagonal (0.141) of x1 = 0.2 are singular,
  # the centres 0.15 and 0.25 (0.05 away), not 0.05 and 0.35 (0.15 away).
  jump_cols = np.flatnonzero(raster.jumps.all(axis=0))
  np.testing.assert_array_equal(jump_cols, [11, 12])
  assert not raster.jumps[:, np.r_[0:11, 13:20]].any()


def test_raster_singular_set_is_the_far_facet_only():
  pot = _potential(*THREE)
  raster = figures.cell_raster(pot, (-1.0, 1.0, -1.0, 1.0), resolution=20, angle_threshold=0.1)
  pts = figures.grid_points((-1.0, 1.0, -1.0, 1.0), 20).reshape(20, 20, 2)
  # Far facet: -2 x1 + 0.01 |x2| = 0 (x1 within 0.005 of 0), between columns 9 (x1 = -0.05) and 10.
  expected = np.zeros((20, 20), bool)
  expected[:, 9:11] = True
  np.testing.assert_array_equal(raster.jumps, expected)
  # The near facet x2 = 0 (x1 < 0) is a cell boundary, not a jump.
  assert figures.cell_boundaries(raster.idx)[9, :9].all()
  np.testing.assert_array_equal(raster.second[:, 10], np.where(pts[:, 10, 1] > 0, 1, 0))


def test_jumps_on_a_line_across_a_far_facet():
  pot = _potential(*THREE)
  # Horizontal line x2 = 0.5, x1 = -1 .. 1 in steps of 0.1; the facet between codes 1 and 2 is
  # -2 x1 + 0.01 x2 = 0, crossed at x1 = 0.0025 (between t = 10 and t = 11).
  x = figures.line_points(np.array([-1.0, 0.5]), np.array([1.0, 0.5]), 21)
  changes = figures.cell_changes(pot, x)
  np.testing.assert_array_equal(np.flatnonzero(changes), [10])
  jumps = figures.map_jumps(pot, x, band=0.1, angle_threshold=0.1)
  # Facet distances |-2 x1 + 0.005| / |(-2, 0.01)|: 0.0025 at t = 10, 0.0975 at t = 11, 0.1025 at t = 9.
  np.testing.assert_array_equal(np.flatnonzero(jumps.mask), [10, 11])
  np.testing.assert_array_equal(jumps.first[[10, 11]], [1, 2])
  np.testing.assert_array_equal(jumps.second[[10, 11]], [2, 1])
  np.testing.assert_allclose(jumps.distance[[9, 10, 11]], [0.1025, 0.0025, 0.0975], atol=1e-4)
  # Nothing is far apart under a threshold of pi: no jumps.
  assert not figures.map_jumps(pot, x, band=0.1, angle_threshold=np.pi).mask.any()


def test_a_facet_inside_a_cluster_is_a_cell_change_but_no_jump():
  pot = _potential(*THREE)
  # Vertical line x1 = -0.5 crosses only the facet x2 = 0 between the near codes 0 and 1.
  x = figures.line_points(np.array([-0.5, -1.0]), np.array([-0.5, 1.0]), 20)
  np.testing.assert_array_equal(np.flatnonzero(figures.cell_changes(pot, x)), [9])
  assert not figures.map_jumps(pot, x, band=0.2, angle_threshold=0.1).mask.any()


def test_methods_panel_axes_titles_and_png(tmp_path, np_rng):
  pot = _potential(*THREE)
  real = np_rng.normal(size=(50, 2))
  samples = {"exact": real + 0.1, "gaussian": np_rng.normal(size=(40, 2)), "gmm": real[:30]}
  path = tmp_path / "panel.png"
  fig = figures.methods_panel(samples, real, potential=pot, labels={"exact": "LSOT exact"}, path=path,
                              resolution=40, angle_threshold=0.1, cell_colors=np.array([0, 0, 1]))
  titles = [ax.get_title() for ax in fig.axes]
  assert len(fig.axes) == 1 + len(samples) + 1
  assert titles[0].startswith("data") and titles[1].startswith("LSOT exact") and titles[2] == "gaussian"
  assert titles[-1].startswith("LSOT: source cells")
  # The cells panel's image: the far facet pixels are black, the two near codes share one colour.
  img = fig.axes[-1].images[0].get_array()
  assert img.shape == (40, 40, 3) and (np.asarray(img).sum(axis=-1) == 0).any()
  limits = {ax.get_xlim() for ax in fig.axes[:-1]}
  assert len(limits) == 1  # shared data-space limits
  plt.close(fig)
  with Image.open(path) as png:
    assert png.size[0] > 100 and png.size[1] > 100
  fig = figures.methods_panel(samples, real)
  assert len(fig.axes) == 1 + len(samples)
  plt.close(fig)


def test_methods_panel_bad_input():
  with pytest.raises(ValueError, match="real must have shape"):
    figures.methods_panel({}, np.zeros((5, 3)))
  with pytest.raises(ValueError, match=r"samples\['a'\]"):
    figures.methods_panel({"a": np.zeros((5, 3))}, np.zeros((5, 2)))
  with pytest.raises(ValueError, match="cell_colors"):
    figures.methods_panel({}, np.zeros((5, 2)), potential=_potential(*THREE), cell_colors=np.zeros(2))


def test_strip_mosaic_layout():
  images = np.zeros((2, 3, 4, 5, 1), np.float32)
  images[1, 2] = 0.5
  out = figures.strip_mosaic(images, np.array([False, True]), pad=2)
  assert out.shape == (2 * 6 + 2, 3 * 7 + 2, 3)
  np.testing.assert_allclose(out[8:12, 16:21], 0.5)  # row 1, column 2
  np.testing.assert_allclose(out[:, 14:16], np.broadcast_to(RED, (14, 2, 3)))  # bar before column 2
  np.testing.assert_allclose(out[:, 7:9], 1.0)  # no bar before column 1
  with pytest.raises(ValueError, match="jumps must have shape"):
    figures.strip_mosaic(images, np.array([True]))


def test_interpolation_strip_shape_and_jump_marks(tmp_path):
  pot = _potential([(-1.0, 0.0), (1.0, 0.0)], [0.3, -0.1])  # boundary x1 = 0.2
  samplers = figures.lsot_samplers(pot, angle_threshold=0.1, radius=0.3)
  x_a, x_b, steps = np.array([-1.0, 0.4]), np.array([1.0, -0.4]), 9
  x = figures.line_points(x_a, x_b, steps)  # x1 = -1, -0.75, ..., 1: the change is between 0 and 0.25
  np.testing.assert_allclose(np.asarray(samplers["exact"](jnp.asarray(x)))[:, 0],
                             np.where(x[:, 0] > 0.2, 1.0, -1.0))
  hh, ww, pad = 3, 4, 2

  def decode(codes):
    return jnp.broadcast_to((0.5 + 0.4 * codes[:, 0])[:, None, None, None], (codes.shape[0], hh, ww, 1))

  path = tmp_path / "strip.png"
  fig = figures.interpolation_strip(decode, x_a, x_b, samplers, steps=steps, path=path, potential=pot,
                                    pad=pad)
  mosaic = np.asarray(fig.axes[0].images[0].get_array())
  assert mosaic.shape == (2 * (hh + pad) + pad, steps * (ww + pad) + pad, 3)
  bars = [j for j in range(1, steps) if np.allclose(mosaic[:, j * (ww + pad)], RED)]
  assert bars == [5]  # between x1 = 0 (column 4) and x1 = 0.25 (column 5)
  assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["exact", "extended"]
  # Without a potential the bars come from the exact row's code changes: the same column.
  fig2 = figures.interpolation_strip(decode, x_a, x_b, samplers, steps=steps, pad=pad)
  np.testing.assert_array_equal(np.asarray(fig2.axes[0].images[0].get_array()), mosaic)
  plt.close(fig)
  plt.close(fig2)
  with Image.open(path) as png:
    png.load()
    assert png.mode in ("RGB", "RGBA")


def test_lsot_samplers_needs_radius_or_probe():
  with pytest.raises(ValueError, match="radius= or probe="):
    figures.lsot_samplers(_potential(*THREE))


def test_line_points_endpoints():
  x = figures.line_points(np.array([0.0, 1.0]), np.array([2.0, -1.0]), 5)
  np.testing.assert_allclose(x[[0, 2, 4]], [[0.0, 1.0], [1.0, 0.0], [2.0, -1.0]])
  with pytest.raises(ValueError, match="steps"):
    figures.line_points(np.zeros(2), np.ones(2), 1)
