"""Tests for lsot_jax.kernels: the tiled assignment against float64 NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsot_jax import kernels

# (tile_size, row_chunk): defaults, sizes that do not divide M = 203 or n = 37, and degenerate ones.
TILINGS = [(8192, 4096), (8, 50), (5, 7), (16, 203), (1, 1000), (37, 1)]


def _problem(np_rng, m=203, n=37, d=5):
  x = np_rng.normal(size=(m, d)).astype(np.float32)
  y = np_rng.normal(size=(n, d)).astype(np.float32)
  h = np_rng.normal(size=(n,)).astype(np.float32)
  return x, y, h


def _reference(x, y, h):
  """float64 scores of the float32 inputs: (argmax, max, gap between the two best scores)."""
  s = x.astype(np.float64) @ y.astype(np.float64).T + h.astype(np.float64)[None, :]
  idx = np.argmax(s, axis=1)
  best = s.max(axis=1)
  if s.shape[1] > 1:
    top2 = np.sort(s, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
  else:
    gap = np.full(s.shape[0], np.inf)
  return idx, best, gap


@pytest.mark.parametrize("method", ["topk", "fused", "argmax"])
@pytest.mark.parametrize("tile_size,row_chunk", TILINGS)
def test_assign_matches_float64_argmax(np_rng, method, tile_size, row_chunk):
  x, y, h = _problem(np_rng)
  idx, best = kernels.assign(
      jnp.asarray(x), jnp.asarray(y), jnp.asarray(h), tile_size=tile_size, row_chunk=row_chunk,
      method=method,
  )
  idx, best = np.asarray(idx), np.asarray(best)
  ref_idx, ref_best, gap = _reference(x, y, h)
  assert idx.shape == (x.shape[0],) and idx.dtype == np.int32
  assert ((idx >= 0) & (idx < y.shape[0])).all()
  # float32 rounding may legitimately flip near-ties: compare only rows whose two best scores differ by
  # more than 1e-4 (scores are O(1), float32 error O(1e-6)); nearly all rows must qualify.
  clear = gap > 1e-4
  assert clear.mean() > 0.97
  np.testing.assert_array_equal(idx[clear], ref_idx[clear])
  np.testing.assert_allclose(best, ref_best, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["topk", "fused", "argmax"])
def test_assign_wide_problem_d64(np_rng, method):
  """Realistic sizes: several target tiles, several row chunks, d = 64 (exercises the blocked matmul)."""
  x, y, h = _problem(np_rng, m=1000, n=3000, d=64)
  h = 0.1 * h
  idx, best = kernels.assign(
      jnp.asarray(x), jnp.asarray(y), jnp.asarray(h), tile_size=1024, row_chunk=256, method=method
  )
  ref_idx, ref_best, gap = _reference(x, y, h)
  idx = np.asarray(idx)
  assert ((idx >= 0) & (idx < y.shape[0])).all()
  clear = gap > 1e-3
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(idx[clear], ref_idx[clear])
  np.testing.assert_allclose(np.asarray(best), ref_best, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["topk", "fused", "argmax"])
def test_assign_single_target(np_rng, method):
  x, y, h = _problem(np_rng, m=17, n=1, d=3)
  idx, best = kernels.assign(jnp.asarray(x), jnp.asarray(y), jnp.asarray(h), method=method, row_chunk=4)
  np.testing.assert_array_equal(np.asarray(idx), np.zeros(17, np.int32))
  np.testing.assert_allclose(
      np.asarray(best), (x.astype(np.float64) @ y[0].astype(np.float64)) + h[0], rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("method", ["topk", "fused", "argmax"])
@pytest.mark.parametrize("tile_size", [8192, 2, 3])
def test_assign_exact_ties_take_lowest_index(method, tile_size):
  """Integer-valued data make the scores exact in float32, so ties are exact ties."""
  a = np.array([1.0, 2.0], np.float32)
  b = np.array([-1.0, 0.0], np.float32)
  # Targets 0/2/4 are the same code, as are 1/3; target 5 has a lower height.
  y = np.stack([a, b, a, b, a, a])
  h = np.array([0.0, 0.0, 0.0, 0.0, 0.0, -1.0], np.float32)
  x = np.array([[1.0, 1.0], [-3.0, 0.0], [2.0, -1.0], [0.0, 0.0]], np.float32)
  # Scores with a: 3, -3, 0, 0; with b: -1, 3, -2, 0.
  expected = np.array([0, 1, 0, 0], np.int32)
  idx, best = kernels.assign(
      jnp.asarray(x), jnp.asarray(y), jnp.asarray(h), tile_size=tile_size, method=method
  )
  np.testing.assert_array_equal(np.asarray(idx), expected)
  np.testing.assert_array_equal(np.asarray(best), np.array([3.0, 3.0, 0.0, 0.0], np.float32))


def _fused_reference(x, y, h):
  """float64 version of the fused rule: the lowest index whose score is within the tie band of the max.

  Returns the index and, per row, the distance of the nearest score to the band's edge in units of the
  band (rows with a score near the edge are ambiguous under float32 rounding).
  """
  x64, y64, h64 = (a.astype(np.float64) for a in (x, y, h))
  s = x64 @ y64.T + h64[None, :]
  band = 16 * np.finfo(np.float32).eps * (
      np.linalg.norm(x64, axis=1) * np.linalg.norm(y64, axis=1).max() + np.abs(h64).max()
  )
  edge = s.max(axis=1) - band
  idx = np.argmax(s >= edge[:, None], axis=1)
  margin = np.abs(s - edge[:, None]).min(axis=1) / band
  return idx, margin


@pytest.mark.parametrize("tile_size,row_chunk", TILINGS + [(3, 64), (12, 17)])
def test_fused_near_ties_lowest_index_in_global_band(np_rng, tile_size, row_chunk):
  """Copies of one target, 1-4 float32 ulps of the scores apart, in different tiles: for every tiling the
  fused method returns the lowest copy (the band is global), checked against a float64 reference."""
  x, y, h = _problem(np_rng)
  h[3] = 3.0  # a large cell, so that many rows pick a copy of target 3
  ulp = 1e-6  # ~1-4 ulps of these scores (|x||y| + |h| ~ 5-20), well inside the 16-ulp band
  for j, k in ((30, 4.0), (20, 1.0), (9, 2.0)):
    y[j], h[j] = y[3], h[3] + k * ulp
  ref_idx, margin = _fused_reference(x, y, h)
  idx, best = kernels.assign(
      jnp.asarray(x), jnp.asarray(y), jnp.asarray(h), tile_size=tile_size, row_chunk=row_chunk,
      method="fused",
  )
  idx = np.asarray(idx)
  clear = margin > 0.25
  assert clear.mean() > 0.97 and np.isin(ref_idx, [3, 9, 20, 30]).sum() > 20
  assert not np.isin(ref_idx, [9, 20, 30]).any()
  np.testing.assert_array_equal(idx[clear], ref_idx[clear])
  s64 = x.astype(np.float64) @ y.astype(np.float64).T + h[None, :]
  np.testing.assert_allclose(np.asarray(best), s64.max(axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["topk", "fused", "argmax"])
def test_assign_independent_of_tiling_wide(np_rng, method):
  """d = 64, n = 3000 with near-tied copies: every tiling gives the float64 reference on unambiguous rows,
  and (scores rounding alike) the same index on all rows."""
  x, y, h = _problem(np_rng, m=600, n=3000, d=64)
  h = 0.1 * h
  h[7] = 12.0  # a large cell
  for j, k in ((1500, 2.0), (2999, 1.0)):
    y[j], h[j] = y[7], h[7] + k * 1e-5  # 1-2 ulps at these score scales, ~1/20 of the band
  if method == "fused":
    ref_idx, margin = _fused_reference(x, y, h)
    clear = margin > 0.25
  else:
    ref_idx, _, gap = _reference(x, y, h)
    clear = gap > 1e-3
  results = []
  for tile_size, row_chunk in ((8192, 4096), (1000, 256), (333, 77)):
    idx, _ = kernels.assign(
        jnp.asarray(x), jnp.asarray(y), jnp.asarray(h), tile_size=tile_size, row_chunk=row_chunk,
        method=method,
    )
    results.append(np.asarray(idx))
    np.testing.assert_array_equal(results[-1][clear], ref_idx[clear], err_msg=f"tile {tile_size}")
  assert clear.mean() > 0.8  # argmax: the rows won by the near-tied copies are ambiguous
  if method == "fused":
    assert np.isin(ref_idx, [7, 1500, 2999]).sum() > 10 and not np.isin(ref_idx, [1500, 2999]).any()
    for r in results[1:]:
      np.testing.assert_array_equal(r, results[0])


def test_fused_band_uses_global_target_scale():
  """target_scale leaves out padded / masked targets (height -1e30); tie_band is 16 eps of the scale."""
  y = jnp.array([[3.0, 4.0], [0.0, 1.0], [30.0, 40.0]])
  h = jnp.array([-2.0, 1.0, -1e30])
  np.testing.assert_allclose(np.asarray(kernels.target_scale(y, h)), [5.0, 2.0])
  x = jnp.array([[0.0, 2.0], [0.0, 0.0]])
  eps = float(np.finfo(np.float32).eps)
  np.testing.assert_allclose(np.asarray(kernels.tie_band(x, kernels.target_scale(y, h))),
                             [16 * eps * 12.0, 16 * eps * 2.0], rtol=1e-6)


def test_assign_jit_equals_eager(np_rng):
  x, y, h = (jnp.asarray(a) for a in _problem(np_rng))
  for method in ("fused", "argmax"):
    kwargs = dict(tile_size=8, row_chunk=50, method=method)
    eager = kernels.assign(x, y, h, **kwargs)
    jitted = jax.jit(lambda x, y, h, kw=kwargs: kernels.assign(x, y, h, **kw))(x, y, h)
    np.testing.assert_array_equal(np.asarray(eager[0]), np.asarray(jitted[0]))
    np.testing.assert_allclose(np.asarray(eager[1]), np.asarray(jitted[1]), rtol=1e-6)


@pytest.mark.parametrize("method", ["topk", "fused", "argmax"])
def test_assign_on_compile_time_constants(np_rng, method):
  """Inputs closed over by a jitted function are constants that XLA may fold; the result must not change.

  (Regression: folding only the fused method's first pass made the two passes round differently, giving
  wrong and even out-of-range indices.)
  """
  x, y, h = _problem(np_rng, m=1000, n=37, d=5)
  idx, best = jax.jit(
      lambda: kernels.assign(jnp.asarray(x), jnp.asarray(y), jnp.asarray(h), method=method)
  )()
  idx = np.asarray(idx)
  ref_idx, ref_best, gap = _reference(x, y, h)
  assert ((idx >= 0) & (idx < y.shape[0])).all()
  clear = gap > 1e-4
  np.testing.assert_array_equal(idx[clear], ref_idx[clear])
  np.testing.assert_allclose(np.asarray(best), ref_best, rtol=1e-5, atol=1e-5)


def test_scores_reference(np_rng):
  x, y, h = _problem(np_rng, m=11, n=7, d=4)
  s = kernels.scores(jnp.asarray(x), jnp.asarray(y), jnp.asarray(h))
  np.testing.assert_allclose(np.asarray(s), x.astype(np.float64) @ y.T + h[None, :], rtol=1e-5, atol=1e-5)


def test_default_method_is_valid():
  assert kernels.default_method() in kernels.METHODS


def test_assign_bad_shapes(np_rng):
  x, y, h = (jnp.asarray(a) for a in _problem(np_rng, m=5, n=4, d=3))
  with pytest.raises(ValueError, match="Shape mismatch"):
    kernels.assign(x[:, :2], y, h)
  with pytest.raises(ValueError, match="Shape mismatch"):
    kernels.assign(x, y, h[:3])
  with pytest.raises(ValueError, match="expects"):
    kernels.assign(x[0], y, h)
  with pytest.raises(ValueError, match="Unknown assignment method"):
    kernels.assign(x, y, h, method="sort")


def test_cell_histogram_matches_bincount(np_rng):
  n = 13
  idx = np_rng.integers(0, n - 2, size=500)  # the last two cells stay empty
  hist = kernels.cell_histogram(jnp.asarray(idx, jnp.int32), n)
  np.testing.assert_allclose(np.asarray(hist), np.bincount(idx, minlength=n) / 500, rtol=1e-5, atol=1e-7)
  weights = np_rng.random(500)
  weights /= weights.sum()
  hist_w = kernels.cell_histogram(jnp.asarray(idx, jnp.int32), n, jnp.asarray(weights, jnp.float32))
  np.testing.assert_allclose(
      np.asarray(hist_w), np.bincount(idx, weights=weights, minlength=n), rtol=1e-5, atol=1e-7
  )


@pytest.mark.parametrize("method", ["topk", "fused", "argmax"])
def test_assign_large_problem_needs_no_score_matrix(method):
  """n = 200,000 codes in d = 64, M = 4,096: XLA's temporary buffers stay far below one M x n matrix.

  (A plain ``argmax(x @ y.T + h)`` needs 3,125 MiB of temporaries here; the tiled kernel about 50-180.)
  """
  m, n, d = 4096, 200_000, 64
  fn = jax.jit(lambda x, y, h: kernels.assign(x, y, h, method=method))
  lowered = fn.lower(
      jax.ShapeDtypeStruct((m, d), jnp.float32),
      jax.ShapeDtypeStruct((n, d), jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.float32),
  )
  analysis = lowered.compile().memory_analysis()
  temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
  if temp is None:
    pytest.skip("memory_analysis() is not available on this backend")
  dense = m * n * 4  # 3.3 GB
  assert temp < dense / 10, f"temp {temp / 2**20:.0f} MiB vs dense scores {dense / 2**20:.0f} MiB"


@pytest.mark.slow
def test_assign_large_problem_runs_and_matches_on_a_subset(np_rng):
  """Actually runs n = 200,000, d = 64 and checks rows against a float64 reference on a target subset."""
  m, n, d = 256, 200_000, 64
  x = np_rng.normal(size=(m, d)).astype(np.float32)
  y = np_rng.normal(size=(n, d)).astype(np.float32)
  h = np.zeros(n, np.float32)
  idx, best = jax.jit(lambda x, y, h: kernels.assign(x, y, h))(x, y, h)
  s = x.astype(np.float64) @ y.astype(np.float64).T
  ref_idx, ref_best = s.argmax(1), s.max(1)
  top2 = np.partition(s, n - 2, axis=1)[:, -2:]
  gap = top2[:, 1] - top2[:, 0]
  clear = gap > 1e-3
  np.testing.assert_array_equal(np.asarray(idx)[clear], ref_idx[clear])
  np.testing.assert_allclose(np.asarray(best), ref_best, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,k,tile_size", [(5, 8, 2048), (300, 4, 2048), (3000, 4, 1024), (2500, 8, 4096),
                                           (4099, 1, 2048), (700, 2, 256)])
def test_top_k_matches_numpy_argsort(n, k, tile_size):
  """The k best cells (plain rounds and the group-maxima path) equal a float64 NumPy sort of the dense scores."""
  rng = np.random.default_rng(n + k)
  m, d = 600, 16
  x = rng.standard_normal((m, d)).astype(np.float32)
  y = rng.standard_normal((n, d)).astype(np.float32)
  h = rng.standard_normal(n).astype(np.float32)
  h[::7] = kernels.MASKED_HEIGHT  # masked cells must rank below every live one
  vals, idx = jax.jit(lambda x: kernels.top_k(x, jnp.asarray(y), jnp.asarray(h), k, tile_size=tile_size,
                                              row_chunk=128))(jnp.asarray(x))
  vals, idx = np.asarray(vals), np.asarray(idx)
  s = x.astype(np.float64) @ y.T.astype(np.float64) + h.astype(np.float64)
  kk = min(k, n)
  want = np.argsort(-s, axis=1, kind="stable")[:, :kk]
  np.testing.assert_allclose(vals[:, :kk], np.take_along_axis(s, want, axis=1), rtol=1e-5, atol=1e-4)
  # Indices agree wherever the float32 scores are not within rounding of each other.
  gaps = np.diff(np.take_along_axis(s, np.argsort(-s, axis=1)[:, :kk + 1], axis=1), axis=1)
  clear = np.all(np.abs(gaps[:, :kk]) > 1e-3, axis=1)
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(idx[clear, :kk], want[clear])
  if k > n:
    assert np.all(np.isneginf(vals[:, n:]))
