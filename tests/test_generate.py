"""Tests for lsot_jax.generate: exact, extended (AE-OT) and soft maps against independent references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial
import scipy.special

from lsot_jax import generate as gen

# The library leaves jitting to the caller; eager lax.map / scan would retrace on every call.
_exact = jax.jit(gen.exact, static_argnames=("chunk_size", "tile_size"))
_extended = jax.jit(gen.extended, static_argnames=("top_k", "chunk_size", "tile_size"))
_soft = jax.jit(gen.soft, static_argnames=("chunk_size", "tile_size"))
_top_k_cells = jax.jit(gen.top_k_cells, static_argnames=("k", "chunk_size", "tile_size"))
_default_angle_threshold = jax.jit(
    gen.default_angle_threshold,
    static_argnames=("num_neighbors", "quantile", "factor", "num_probe", "tile_size"))
_default_blend_radius = jax.jit(gen.default_blend_radius, static_argnames=("chunk_size", "tile_size"))


def _np_scores(z, y, h):
  return np.asarray(z, np.float64) @ np.asarray(y, np.float64).T + np.asarray(h, np.float64)[None, :]


def _top2_gap(z, y, h):
  s = np.sort(_np_scores(z, y, h), axis=1)
  return s[:, -1] - s[:, -2]


def _np_normals(y):
  ext = np.concatenate([y, -np.ones((len(y), 1))], axis=1).astype(np.float64)
  return ext / np.linalg.norm(ext, axis=1, keepdims=True)


def _np_angle(a, b):
  """Angle between facet normals, via arctan2 of sine and cosine (an independent formula)."""
  na, nb = _np_normals(a), _np_normals(b)
  cos = np.sum(na * nb, axis=-1)
  sin = np.linalg.norm(na[:, :, None] * nb[:, None, :] - nb[:, :, None] * na[:, None, :], axis=(1, 2))
  return np.arctan2(sin / np.sqrt(2.0), cos)


def _np_extended(z, y, h, threshold, radius, top_k):
  """Per-sample float64 reference of the documented AE-OT extension (dense scores, explicit loops)."""
  z, y, h = (np.asarray(a, np.float64) for a in (z, y, h))
  out = np.zeros_like(z)
  for m in range(len(z)):
    s = y @ z[m] + h
    cand = np.argsort(-s, kind="stable")[:top_k]
    i = cand[0]
    adm = [j for j in cand if j == i or _np_angle(y[i:i + 1], y[j:j + 1])[0] < threshold]
    weights = []
    for j in adm:
      t = max([(s[l] - s[j]) / np.linalg.norm(y[l] - y[j]) for l in adm if l != j], default=-np.inf)
      weights.append(1.0 if t <= 0 else float(np.clip(1.0 - t / radius, 0.0, 1.0)))
    weights = np.asarray(weights)
    out[m] = weights @ y[adm] / weights.sum()
  return out


def _random_problem(np_rng, n=37, d=3, m=200):
  y = np_rng.normal(size=(n, d)).astype(np.float32)
  h = (np_rng.normal(size=(n,)) - 0.5 * np.sum(y**2, axis=1)).astype(np.float32)
  z = np_rng.normal(size=(m, d)).astype(np.float32)
  return z, y, h


@functools.partial(jax.jit, static_argnames=("num_steps", "batch"))
def _fit_heights(key, y, num_steps=200, batch=4096):
  """Minimises E(h) = E_mu[max_i <x, y_i> + h_i] - mean(h) for mu = N(0, I) by Monte-Carlo Adam.

  An independent little solver (the gradient is cell masses - nu), so the tests do not depend on
  lsot_jax.solver.
  """
  n, d = y.shape
  nu = jnp.full((n,), 1.0 / n)

  def step(carry, it):
    h, m, v = carry
    x = jax.random.normal(jax.random.fold_in(key, it), (batch, d))
    idx = jnp.argmax(x @ y.T + h[None, :], axis=1)
    grad = jnp.zeros((n,)).at[idx].add(1.0 / batch) - nu
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad**2
    t = it.astype(jnp.float32) + 1.0
    lr = 0.05 * 0.99**it
    h = h - lr * (m / (1 - 0.9**t)) / jnp.sqrt(v / (1 - 0.999**t) + 1e-12)
    return (h - jnp.mean(h), m, v), None

  h0 = -0.5 * jnp.sum(y**2, axis=1)
  zeros = jnp.zeros((n,))
  (h, _, _), _ = jax.lax.scan(step, (h0 - jnp.mean(h0), zeros, zeros), jnp.arange(num_steps))
  return h


@pytest.fixture(scope="module")
def two_clusters():
  """Codes from two tight blobs far apart, with heights fitted for a standard Gaussian source."""
  rng = np.random.default_rng(1)
  n_c = 40
  y = np.concatenate([
      rng.normal([-3.0, 0.0], 0.4, (n_c, 2)),
      rng.normal([3.0, 0.0], 0.4, (n_c, 2)),
  ]).astype(np.float32)
  h = np.asarray(_fit_heights(jax.random.key(3), jnp.asarray(y)))
  x = rng.normal(size=(50_000, 2))
  masses = np.bincount(np.argmax(_np_scores(x, y, h), axis=1), minlength=len(y)) / len(x)
  # Sanity check of the test's own solver: every cell carries roughly its 1/80 of the mass.
  assert np.max(np.abs(masses * len(y) - 1.0)) < 0.35
  return y, h, n_c


# ----------------------------------------------------------------------------------------- exact


@pytest.mark.parametrize("chunk_size,tile_size", [(1024, 4096), (7, 5), (64, 1), (13, 37)])
def test_exact_matches_dense_argmax(np_rng, chunk_size, tile_size):
  z, y, h = _random_problem(np_rng)
  out = np.asarray(_exact(jnp.asarray(z), jnp.asarray(y), jnp.asarray(h),
                             chunk_size=chunk_size, tile_size=tile_size))
  assert out.shape == z.shape
  ref = y[np.argmax(_np_scores(z, y, h), axis=1)]
  clear = _top2_gap(z, y, h) > 1e-4  # float32 vs float64 may flip near-ties only
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(out[clear], ref[clear])
  # Every output, tie or not, is a training code.
  dist = np.min(np.linalg.norm(out[:, None, :] - y[None, :, :], axis=-1), axis=1)
  assert np.all(dist == 0.0)


def test_exact_is_the_1d_quantile_map(np_rng):
  """Uniform source on [0, 1] to sorted points: the Brenier map is the quantile function."""
  n = 9
  y = np.sort(np_rng.normal(size=n)) * 3.0
  nu = np_rng.uniform(0.5, 1.5, size=n)
  nu /= nu.sum()
  c = np.cumsum(nu)
  # Facet between cells i and i+1 sits at x = c_i: c_i y_i + h_i = c_i y_{i+1} + h_{i+1}.
  h = np.zeros(n)
  for i in range(n - 1):
    h[i + 1] = h[i] - c[i] * (y[i + 1] - y[i])
  u = np.linspace(0.0005, 0.9995, 2001)
  u = u[np.min(np.abs(u[:, None] - c[None, :-1]), axis=1) > 1e-4]
  out = _exact(jnp.asarray(u[:, None], jnp.float32), jnp.asarray(y[:, None], jnp.float32),
                  jnp.asarray(h, jnp.float32), chunk_size=128, tile_size=4)
  quantile = y[np.searchsorted(c, u, side="right")]
  np.testing.assert_array_equal(np.asarray(out)[:, 0], quantile.astype(np.float32))


def test_top_k_cells_matches_argsort(np_rng):
  z, y, h = _random_problem(np_rng, n=50, m=64)
  vals, idx = _top_k_cells(jnp.asarray(z), jnp.asarray(y), jnp.asarray(h), k=6, chunk_size=10,
                              tile_size=7)
  s = _np_scores(z, y, h)
  ref_idx = np.argsort(-s, axis=1)[:, :6]
  np.testing.assert_allclose(np.asarray(vals), np.take_along_axis(s, ref_idx, axis=1), rtol=1e-5,
                             atol=1e-5)
  gaps = -np.diff(np.sort(s, axis=1)[:, ::-1][:, :7], axis=1)
  clear = np.all(gaps > 1e-4, axis=1)
  np.testing.assert_array_equal(np.asarray(idx)[clear], ref_idx[clear])


# -------------------------------------------------------------------------------------- extended


def test_default_angle_threshold_matches_brute_force(np_rng):
  y = np_rng.normal(size=(60, 4)).astype(np.float32)
  k, q = 5, 0.7
  thr = float(_default_angle_threshold(jnp.asarray(y), num_neighbors=k, quantile=q, tile_size=16))
  na = _np_normals(y)
  chord = np.linalg.norm(na[:, None, :] - na[None, :, :], axis=-1)
  angles = 2 * np.arcsin(np.clip(chord / 2, 0, 1))
  np.fill_diagonal(angles, np.inf)
  kth = np.sort(angles, axis=1)[:, k - 1]
  np.testing.assert_allclose(thr, 2.0 * np.quantile(kth, q), rtol=1e-4)
  thr_1 = float(_default_angle_threshold(jnp.asarray(y), num_neighbors=k, quantile=q, factor=1.0))
  np.testing.assert_allclose(thr_1, np.quantile(kth, q), rtol=1e-4)
  # The angle is scale-dependent, and the rule follows the rescaling.
  thr10 = float(_default_angle_threshold(jnp.asarray(10 * y), num_neighbors=k, quantile=q))
  assert abs(thr10 - thr) > 1e-3


def test_normal_angles_against_arctan2_formula(np_rng):
  a = np_rng.normal(size=(20, 3)) * np.array([[0.1], [1], [10], [100]] * 5)
  b = a + np_rng.normal(size=(20, 3)) * 1e-3
  b[:5] = np_rng.normal(size=(5, 3))
  got = np.asarray(gen.normal_angles(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
  ref = np.array([_np_angle(a[i:i + 1], b[i:i + 1])[0] for i in range(20)])
  np.testing.assert_allclose(got, ref, rtol=2e-3, atol=1e-6)


def test_extended_closed_form_1d():
  """Voronoi cells of 0, 1, 2, 3: facet at 1/2 gives 1/2; between, y = 1 / (3 - 2z); cores map to codes."""
  y = jnp.asarray([[0.0], [1.0], [2.0], [3.0]])
  h = -0.5 * jnp.sum(y**2, axis=1)
  z = jnp.asarray([[0.5], [0.6], [0.75], [0.9], [1.0], [1.1], [2.5], [3.4]])
  out = np.asarray(_extended(z, y, h, angle_threshold=np.pi, radius=0.5))[:, 0]
  zz = np.asarray(z)[:4, 0]
  np.testing.assert_allclose(out[:4], 1.0 / (3.0 - 2.0 * zz), rtol=1e-5)
  np.testing.assert_allclose(out[4], 1.0, rtol=1e-6)  # cell centre: exactly its code
  np.testing.assert_allclose(out[5], 2.0 - 1.0 / (3.0 - 2.0 * (2.0 - 1.1)), rtol=1e-5)  # mirror image
  np.testing.assert_allclose(out[6], 2.5, rtol=1e-6)
  np.testing.assert_allclose(out[7], 3.0, rtol=1e-6)  # beyond the last code: no neighbour on that side


@pytest.mark.parametrize("chunk_size,tile_size,top_k", [(1024, 4096, 5), (9, 4, 5), (16, 3, 8)])
def test_extended_matches_reference(np_rng, chunk_size, tile_size, top_k):
  z, y, h = _random_problem(np_rng, n=30, d=2, m=60)
  thr, radius = 0.8, 0.8
  out = _extended(jnp.asarray(z), jnp.asarray(y), jnp.asarray(h), angle_threshold=thr,
                     radius=radius, top_k=top_k, chunk_size=chunk_size, tile_size=tile_size)
  ref = _np_extended(z, y, h, thr, radius, top_k)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-4)
  # The reference does blend: the test compares more than the exact map.
  assert np.mean(np.min(np.linalg.norm(ref[:, None] - y[None], axis=-1), axis=1) > 1e-3) > 0.3


def test_extended_zero_threshold_or_radius_equals_exact(np_rng):
  z, y, h = _random_problem(np_rng, n=40, d=3, m=300)
  args = (jnp.asarray(z), jnp.asarray(y), jnp.asarray(h))
  clear = _top2_gap(z, y, h) > 1e-4
  ref = y[np.argmax(_np_scores(z, y, h), axis=1)]
  for kw in ({"angle_threshold": 0.0, "radius": 1.0}, {"angle_threshold": np.pi, "radius": 0.0}):
    out = np.asarray(_extended(*args, top_k=6, chunk_size=64, **kw))
    np.testing.assert_array_equal(out[clear], ref[clear])
  blended = np.asarray(_extended(*args, angle_threshold=np.pi, radius=1.0))
  assert np.mean(np.any(blended != ref, axis=1)) > 0.5


def test_extended_two_clusters_no_gap_but_novel(two_clusters):
  y, h, n_c = two_clusters
  z = np.asarray(jax.random.normal(jax.random.key(7), (2000, 2)))
  args = (jnp.asarray(z), jnp.asarray(y), jnp.asarray(h))
  thr = _default_angle_threshold(jnp.asarray(y))
  cross = np.asarray(gen.normal_angles(jnp.asarray(y[:n_c, None]), jnp.asarray(y[None, n_c:])))
  assert float(thr) < cross.min()
  out = np.asarray(_extended(*args, angle_threshold=thr, radius=None))
  # Never in the gap: each code lies in the convex hull of the cluster of its sample's cell.
  cell = np.argmax(_np_scores(z, y, h), axis=1)
  left = cell < n_c
  assert np.all(scipy.spatial.Delaunay(y[:n_c]).find_simplex(out[left], tol=1e-5) >= 0)
  assert np.all(scipy.spatial.Delaunay(y[n_c:]).find_simplex(out[~left], tol=1e-5) >= 0)
  assert np.all(np.abs(out[:, 0]) > 1.5)
  # Novelty: most generated codes are not training codes.
  dist = np.min(np.linalg.norm(out[:, None, :] - y[None, :, :], axis=-1), axis=1)
  assert np.mean(dist > 1e-3) > 0.5
  # Control: with no threshold, the same construction does put codes in the gap.
  unguarded = np.asarray(_extended(*args, angle_threshold=jnp.float32(np.pi), radius=None))
  assert np.any(np.abs(unguarded[:, 0]) < 1.0)


def test_extended_is_continuous_inside_a_mode(two_clusters):
  y, h, _ = two_clusters
  s = np.linspace(0.0, 1.0, 3001)[:, None]
  path = (1 - s) * np.array([[-2.5, -1.2]]) + s * np.array([[-0.3, 1.4]])  # inside the left half-plane
  args = (jnp.asarray(path, jnp.float32), jnp.asarray(y), jnp.asarray(h))
  exact_steps = np.linalg.norm(np.diff(np.asarray(_exact(*args)), axis=0), axis=1)
  radius = _default_blend_radius(jnp.asarray(np.random.default_rng(0).normal(size=(2048, 2)),
                                                jnp.float32), jnp.asarray(y), jnp.asarray(h))
  ext = np.asarray(_extended(*args, angle_threshold=np.pi / 2, radius=radius))
  ext_steps = np.linalg.norm(np.diff(ext, axis=0), axis=1)
  assert np.sum(exact_steps > 0) >= 5  # the path crosses several cells, where the exact map jumps
  assert exact_steps.max() > 0.1
  assert ext_steps.max() < 0.1 * exact_steps.max()


# ------------------------------------------------------------------------------------------ soft


def _np_soft(z, y, h, temperature, weights=None):
  logits = _np_scores(z, y, h) / temperature
  if weights is not None:
    logits = logits + np.log(weights)[None, :]
  return scipy.special.softmax(logits, axis=1) @ np.asarray(y, np.float64)


@pytest.mark.parametrize("chunk_size,tile_size", [(1024, 4096), (7, 5), (50, 1)])
@pytest.mark.parametrize("temperature", [0.01, 1.0, 30.0])
def test_soft_matches_dense_softmax(np_rng, chunk_size, tile_size, temperature):
  z, y, h = _random_problem(np_rng, n=23, d=3, m=70)
  nu = np_rng.uniform(0.1, 1.0, size=23)
  nu /= nu.sum()
  out = _soft(jnp.asarray(z), jnp.asarray(y), jnp.asarray(h), temperature=temperature,
                 weights=jnp.asarray(nu, jnp.float32), chunk_size=chunk_size, tile_size=tile_size)
  np.testing.assert_allclose(np.asarray(out), _np_soft(z, y, h, temperature, nu), atol=5e-4, rtol=1e-4)


def test_soft_limits(np_rng):
  z, y, h = _random_problem(np_rng, n=30, d=2, m=400)
  args = (jnp.asarray(z), jnp.asarray(y), jnp.asarray(h))
  cold = np.asarray(_soft(*args, temperature=1e-4))
  ref = y[np.argmax(_np_scores(z, y, h), axis=1)]
  clear = _top2_gap(z, y, h) > 1e-2
  assert clear.mean() > 0.8
  np.testing.assert_allclose(cold[clear], ref[clear], atol=1e-5)
  nu = np_rng.uniform(0.1, 1.0, size=30)
  nu /= nu.sum()
  hot = np.asarray(_soft(*args, temperature=1e6, weights=jnp.asarray(nu, jnp.float32)))
  np.testing.assert_allclose(hot, np.broadcast_to(nu @ y, hot.shape), atol=1e-3)
  assert np.abs(nu @ y - y.mean(axis=0)).max() > 1e-2  # the weights matter in this check


# ------------------------------------------------------------------------ dispatcher, jit, vmap


class _Gaussian:

  def __init__(self, dim):
    self.dim = dim

  def sample(self, key, num):
    return jax.random.normal(key, (num, self.dim))


def test_generate_unknown_mode_lists_modes(rng):
  y = jnp.zeros((3, 2))
  with pytest.raises(ValueError, match="exact, extended, soft"):
    gen.generate("wgan", rng, _Gaussian(2), y, jnp.zeros((3,)), 4)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="h must have shape"):
    gen.exact(jnp.zeros((4, 2)), jnp.zeros((3, 2)), jnp.zeros((2,)))
  with pytest.raises(ValueError, match="z must have shape"):
    gen.exact(jnp.zeros((4, 3)), jnp.zeros((3, 2)), jnp.zeros((3,)))
  with pytest.raises(ValueError, match="temperature"):
    gen.soft(jnp.zeros((4, 2)), jnp.zeros((3, 2)), jnp.zeros((3,)), temperature=0.0)
  with pytest.raises(ValueError, match="factor must be > 0"):
    gen.default_angle_threshold(jnp.ones((5, 2)), factor=0.0)


@pytest.mark.parametrize("mode,kwargs", [
    ("exact", {}),
    ("extended", {}),
    ("soft", {"temperature": 0.5}),
])
def test_generate_jit_and_vmap_over_keys(two_clusters, mode, kwargs):
  y, h, n_c = two_clusters
  y, h = jnp.asarray(y), jnp.asarray(h)
  sampler = _Gaussian(2)

  @jax.jit
  def one(key):
    return gen.generate(mode, key, sampler, y, h, 50, **kwargs)

  keys = jax.random.split(jax.random.key(11), 3)
  batched = np.asarray(jax.jit(jax.vmap(one))(keys))
  assert batched.shape == (3, 50, 2)
  for b in range(3):
    np.testing.assert_allclose(batched[b], np.asarray(one(keys[b])), atol=1e-5)
  assert not np.allclose(batched[0], batched[1])
  if mode == "extended":
    assert np.all(np.abs(batched[..., 0]) > 1.5)
  if mode == "exact":
    assert np.all(np.min(np.linalg.norm(batched.reshape(-1, 1, 2) - np.asarray(y)[None], axis=-1),
                         axis=1) == 0.0)
    # A plain callable sampler works too and gives the same draws.
    plain = jax.jit(lambda key: gen.generate(mode, key, sampler.sample, y, h, 50))(keys[0])
    np.testing.assert_allclose(np.asarray(plain), batched[0], atol=1e-5)


def test_generate_blend_scale_sets_the_default_radius(two_clusters):
  """``blend_scale`` is the ``scale`` of the probe's default_blend_radius; a smaller one blends less."""
  y, h, _ = two_clusters
  y, h = jnp.asarray(y), jnp.asarray(h)
  sampler, key = _Gaussian(2), jax.random.key(5)
  z = sampler.sample(key, 400)
  probe = sampler.sample(jax.random.fold_in(key, gen._RADIUS_PROBE_SALT), 2048)  # pylint: disable=protected-access
  thr = gen.default_angle_threshold(y)
  outs = {}
  for scale in (1.0, 2.0):
    radius = gen.default_blend_radius(probe, y, h, scale=scale)
    expected = np.asarray(gen.extended(z, y, h, angle_threshold=thr, radius=radius))
    outs[scale] = np.asarray(gen.generate("extended", key, sampler, y, h, 400, blend_scale=scale))
    np.testing.assert_allclose(outs[scale], expected, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gen.generate("extended", key, sampler, y, h, 400)), outs[2.0], atol=1e-6)
  codes = np.asarray(y)
  def novel(out):
    return np.mean(np.min(np.linalg.norm(out[:, None] - codes[None], axis=-1), axis=1) > 1e-4)
  assert novel(outs[1.0]) < novel(outs[2.0])
