"""Tests for lsot_jax.sharding.

The multi-device checks need ``--xla_force_host_platform_device_count=4`` before JAX starts, and pytest's
process already runs JAX on one CPU device, so they run in two subprocesses (this file executed as a script,
one per group of ``_CHILD_GROUPS``), which report each check's outcome as JSON; each test below asserts one.
References are independent: a float64 NumPy argmax / bincount, and the single-device solver and optax step.
"""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import multidevice
import pytest

from lsot_jax import kernels
from lsot_jax import sharding
from lsot_jax import solver as solver_lib
from lsot_jax import sources

_NUM_DEVICES = 4


# ---------------------------------------------------------------------------------------------------------
# Checks run in the 4-device child process.


def _reference_argmax(x, y, h):
  """float64 argmax (lowest index on ties) and the gap between the two best scores."""
  s = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T + np.asarray(h, np.float64)[None, :]
  top2 = np.sort(s, axis=1)[:, -2:]
  return np.argmax(s, axis=1), s.max(axis=1), top2[:, 1] - top2[:, 0]


def check_assign_matches_reference():
  mesh = sharding.make_mesh(_NUM_DEVICES)
  assert mesh.size == _NUM_DEVICES, jax.devices()
  fn = jax.jit(functools.partial(sharding.sharded_assign, mesh, tile_size=16, row_chunk=256))
  for n in (203, 256, 3):  # uneven, even, fewer targets than devices
    x = jax.random.normal(jax.random.key(0), (1000, 8))
    y = jax.random.normal(jax.random.key(1), (n, 8))
    h = jax.random.normal(jax.random.key(2), (n,))
    idx, best = fn(x, y, h)
    ref_idx, ref_best, gap = _reference_argmax(x, y, h)
    clear = gap > 1e-4
    assert clear.mean() > 0.99, n
    np.testing.assert_array_equal(np.asarray(idx)[clear], ref_idx[clear], err_msg=f"n={n}")
    np.testing.assert_allclose(np.asarray(best), ref_best, rtol=1e-5, atol=1e-5, err_msg=f"n={n}")
    assert idx.shape == (1000,) and idx.dtype == jnp.int32


def check_ties_lowest_global_index():
  # Integer data: every score is exact in float32, so copies of a target tie exactly.
  mesh = sharding.make_mesh(_NUM_DEVICES)
  rng = np.random.default_rng(0)
  n = 50  # 13 targets per device after padding to 52
  y = rng.integers(-3, 4, size=(n, 4)).astype(np.float32)
  h = rng.integers(-5, 6, size=(n,)).astype(np.float32)
  h[2] = h[14] = 12.0  # large heights so that the duplicated cells are not empty
  y[40], h[40] = y[2], h[2]  # a copy on device 3 of a target on device 0
  y[27], h[27] = y[14], h[14]  # a copy on device 2 of a target on device 1
  x = rng.integers(-4, 5, size=(4000, 4)).astype(np.float32)
  idx, _ = jax.jit(functools.partial(sharding.sharded_assign, mesh))(x, y, h)
  idx = np.asarray(idx)
  s = x.astype(np.float64) @ y.T.astype(np.float64) + h[None, :]
  np.testing.assert_array_equal(idx, np.argmax(s, axis=1))  # np.argmax: first index on ties
  assert not np.isin(idx, [40, 27]).any()
  assert (idx == 2).any() and (idx == 14).any()


def check_cell_masses_sharded_like_h():
  mesh = sharding.make_mesh(_NUM_DEVICES)
  n, m = 204, 3000
  x = jax.random.normal(jax.random.key(3), (m, 6))
  y = jax.random.normal(jax.random.key(4), (n, 6))
  h = jax.random.normal(jax.random.key(5), (n,))
  w, best = jax.jit(functools.partial(sharding.sharded_cell_masses, mesh))(x, y, h)
  ref_idx, ref_best, gap = _reference_argmax(x, y, h)
  assert gap.min() > 1e-6
  np.testing.assert_allclose(np.asarray(w), np.bincount(ref_idx, minlength=n) / m, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(best), ref_best, rtol=1e-5, atol=1e-5)
  assert w.sharding.spec == jax.sharding.PartitionSpec(mesh.axis_names[0]), w.sharding
  assert len(w.addressable_shards) == _NUM_DEVICES and w.addressable_shards[0].data.shape == (n // 4,)


def check_assign_equals_single_device_any_tiling():
  # The tie rule is global, so the sharded kernel equals the single-device one with the DEFAULT tile size
  # (and other tilings) bit for bit, for both reductions and uneven n. (XLA:CPU rounds differently shaped
  # matmuls differently -- here the per-device tile of 51 targets vs the single device's 203 -- by ~1e-6.)
  mesh = sharding.make_mesh(_NUM_DEVICES)
  single = jax.jit(kernels.assign, static_argnames=("tile_size", "row_chunk", "method"))

  @functools.lru_cache(maxsize=None)
  def sharded(method, tile_size):
    return jax.jit(functools.partial(
        sharding.sharded_assign, mesh, tile_size=tile_size, row_chunk=512, method=method))

  x = jax.random.normal(jax.random.key(0), (2000, 8))
  for n in (203, 3):
    y = jax.random.normal(jax.random.key(1), (n, 8))
    h = jax.random.normal(jax.random.key(2), (n,))
    for method in ("fused", "argmax"):
      ref_idx, ref_best = single(x, y, h, method=method)
      for tile_size in (8192, 16):
        idx, best = sharded(method, tile_size)(x, y, h)
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx), err_msg=f"{n} {method}")
        np.testing.assert_allclose(np.asarray(best), np.asarray(ref_best), rtol=1e-6, atol=1e-5)
  # Rounding-level near-ties split over the devices: copies of target 5 on devices 2 and 3 whose heights
  # are 1 and 3 ulps higher. The fused rule (lowest index within the band of the global max) picks 5 for
  # every tiling; an exact argmax would depend on how each tiling rounds. (Before the band became global,
  # sharding picked 151 or 163 here: the band was relative to each tile's own max.)
  n = 203
  y = jax.random.normal(jax.random.key(1), (n, 8))
  h = jax.random.normal(jax.random.key(2), (n,))
  y = y.at[151].set(y[5]).at[163].set(y[5])
  h = h.at[5].set(2.0).at[151].set(2.0 + 2.4e-7).at[163].set(2.0 + 7.2e-7)
  ref_idx, _ = single(x, y, h, method="fused")
  ref_idx = np.asarray(ref_idx)
  won = np.isin(ref_idx, [5, 151, 163])
  assert won.sum() >= 5 and (ref_idx[won] == 5).all(), np.unique(ref_idx[won])
  for tile_size in (8192, 16, 5):
    idx, _ = sharded("fused", tile_size)(x, y, h)
    np.testing.assert_array_equal(np.asarray(idx), ref_idx, err_msg=f"near ties, tile {tile_size}")
    tiled, _ = single(x, y, h, method="fused", tile_size=tile_size)
    np.testing.assert_array_equal(np.asarray(tiled), ref_idx, err_msg=f"near ties, tile {tile_size}")


def check_solve_equals_single_device():
  mesh = sharding.make_mesh(_NUM_DEVICES)
  for n in (203, 256):
    y = 2.0 * jax.random.normal(jax.random.key(1), (n, 8))
    problem = solver_lib.make_problem(y, source=sources.Gaussian(dim=8))
    solver = solver_lib.BrenierSolver(num_iterations=40, batch_size=1024, max_batch_size=4096, window=5)
    pot0, st0 = jax.jit(solver)(jax.random.key(3), problem)  # default tile size
    pot1, st1 = sharding.solve_sharded(jax.random.key(3), problem, solver, mesh)
    assert pot1.h.shape == (n,) and st1.h.shape == (n,) and int(st1.it) == int(st0.it) == 40
    assert int(st1.stage) == int(st0.stage)  # the stage schedule is followed identically
    np.testing.assert_allclose(np.asarray(pot1.h), np.asarray(pot0.h), atol=1e-4, err_msg=f"n={n}")
    np.testing.assert_allclose(np.asarray(st1.losses), np.asarray(st0.losses), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(st1.errors), np.asarray(st0.errors), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(st1.batch_sizes), np.asarray(st0.batch_sizes))
    for a, b in zip(jax.tree.leaves(st1.opt_state), jax.tree.leaves(st0.opt_state)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def check_solve_with_callback_equals_single_device():
  # The sharded Adam solver's progress callback: same reports and heights as one device (n = 203, padded).
  mesh = sharding.make_mesh(_NUM_DEVICES)
  y = 2.0 * jax.random.normal(jax.random.key(1), (203, 8))
  problem = solver_lib.make_problem(y, source=sources.Gaussian(dim=8))
  calls = {0: [], 1: []}
  runs = []
  for i in (0, 1):
    solver = solver_lib.BrenierSolver(num_iterations=40, batch_size=1024, max_batch_size=4096, window=5,
                                      callback=calls[i].append, callback_every=5)
    runs.append(jax.jit(solver)(jax.random.key(3), problem) if i == 0
                else sharding.solve_sharded(jax.random.key(3), problem, solver, mesh))
  jax.effects_barrier()
  (pot0, st0), (pot1, st1) = runs
  np.testing.assert_allclose(np.asarray(pot1.h), np.asarray(pot0.h), atol=1e-4)
  one, sharded = (sorted(calls[i], key=lambda c: c["step"]) for i in (0, 1))
  assert [c["step"] for c in one] == [c["step"] for c in sharded] == list(range(5, 41, 5)), sharded
  for a, b in zip(one, sharded):
    assert a["num_samples"] == b["num_samples"] and a["stage"] == b["stage"], (a, b)
    np.testing.assert_allclose([b["l1"], b["energy"], b["lr"]], [a["l1"], a["energy"], a["lr"]],
                               rtol=1e-5, atol=1e-5)
    assert b["l1"] == float(st1.errors[b["step"] - 1])


def check_solve_with_weights_and_h_init():
  # Non-uniform weights with a zero, duplicates merged, an initial h: the masked cells stay empty.
  mesh = sharding.make_mesh(_NUM_DEVICES)
  rng = np.random.default_rng(1)
  y = rng.normal(size=(30, 3)).astype(np.float32)
  y[7] = y[3]
  weights = rng.uniform(0.5, 1.5, size=30)
  weights[11] = 0.0
  weights /= weights.sum()
  problem = solver_lib.make_problem(y, weights, sources.UniformCube(dim=3))
  solver = solver_lib.BrenierSolver(num_iterations=30, batch_size=2048, max_batch_size=2048)
  h_init = jnp.asarray(rng.normal(size=30).astype(np.float32))
  pot0, _ = jax.jit(solver)(jax.random.key(5), problem, h_init)
  pot1, _ = sharding.solve_sharded(jax.random.key(5), problem, solver, mesh, h_init)
  np.testing.assert_allclose(np.asarray(pot1.h), np.asarray(pot0.h), atol=1e-4)
  assert float(pot1.h[7]) == float(pot1.h[11]) == float(np.float32(-1e30))


def check_top_k_matches_reference():
  mesh = sharding.make_mesh(_NUM_DEVICES)
  fn = jax.jit(functools.partial(sharding.sharded_top_k, mesh, k=4, tile_size=16, row_chunk=128))
  n = 204  # 51 targets per device
  x = jax.random.normal(jax.random.key(6), (700, 5))
  y = jax.random.normal(jax.random.key(7), (n, 5))
  h = jax.random.normal(jax.random.key(8), (n,))
  vals, idx = fn(x, y, h)
  s = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T + np.asarray(h, np.float64)[None, :]
  order = np.argsort(-s, axis=1)[:, :4]
  np.testing.assert_array_equal(np.asarray(idx), order)
  np.testing.assert_allclose(np.asarray(vals), np.take_along_axis(s, order, axis=1), rtol=1e-5, atol=1e-5)


def check_newton_solve_equals_single_device():
  # Uneven n (203 -> 204 padded), clustered codes, Dirichlet weights. Every step of the sharded solver, from
  # the single-device solver's state, gives that solver's next state to float tolerance. Whole runs are not
  # compared value for value: the partitioned sums (conjugate gradient, centring) round differently, and the
  # heights' ~1e-7 differences move a sample across a facet within a few steps (at step 3 of 7 on an AMD
  # EPYC), after which the two runs are different draws of the same algorithm.
  from lsot_jax import newton  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(_NUM_DEVICES)
  rng = np.random.default_rng(2)
  centres = 3.0 * rng.normal(size=(4, 6))
  y = centres[rng.integers(0, 4, size=203)] + rng.normal(size=(203, 6))
  problem = solver_lib.make_problem(y, rng.dirichlet(np.full(203, 4.0)))
  solver = newton.NewtonSolver(num_iterations=10, min_samples=1 << 13, max_samples=1 << 15, batch_size=4096,
                               initialisation="gaussian")
  multi = dataclasses.replace(solver, initialisation="multiscale", coarsest=16)
  h_plain = jax.jit(multi.init_heights)(problem)
  h_padded = jax.jit(multi.init_heights)(sharding.pad_problem(problem, _NUM_DEVICES))[:203]
  np.testing.assert_allclose(np.asarray(h_padded), np.asarray(h_plain), atol=1e-4)

  sharded = sharding.make_sharded_solver(solver, mesh)
  assert isinstance(sharded, sharding.ShardedNewtonSolver)
  padded = sharding.shard_problem(problem, mesh)
  key = jax.random.key(3)
  step0 = jax.jit(lambda s: solver.run(key, problem, s, 1))
  step1 = jax.jit(lambda s: sharded.run(key, padded, s, 1))
  state = jax.jit(solver.init)(problem)
  kinds = set()
  while not bool(solver.finished(problem, state)):
    it, m = int(state.it), int(solver.schedule(203)[int(state.stage)])
    s0 = step0(state)
    s1 = sharding.unpad_state(step1(sharding.place_state(sharding.pad_state(state, padded.num_targets), mesh)), 203)
    kinds.add("evaluation" if np.isnan(float(s0.alphas[it])) else "newton")
    assert int(s1.it) == int(s0.it) == it + 1 and int(s1.stage) == int(s0.stage), it
    np.testing.assert_allclose(np.asarray(s1.h), np.asarray(s0.h), atol=1e-4, err_msg=f"step {it}")
    # A sample within rounding of a facet may flip: at most two, each moving one count between two cells.
    assert np.abs(np.asarray(s1.counts) - np.asarray(s0.counts)).sum() <= 4, it
    np.testing.assert_allclose(float(s1.errors[it]), float(s0.errors[it]), atol=4.0 / m, err_msg=f"step {it}")
    np.testing.assert_array_equal(np.isnan(np.asarray(s1.alphas)), np.isnan(np.asarray(s0.alphas)))
    state = s0
  assert kinds == {"evaluation", "newton"} and int(state.it) >= 5, (kinds, int(state.it))

  pot1, st1 = sharding.solve_sharded(key, problem, solver, mesh)
  assert pot1.h.shape == (203,) and bool(solver.finished(problem, st1))
  # The whole sharded run reaches the single-device run's accuracy (a draw of the same algorithm).
  assert float(st1.error_bound) < 1.5 * float(state.error_bound), (float(st1.error_bound), float(state.error_bound))


def check_data_parallel_step():
  import optax  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(_NUM_DEVICES)
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  params = {"w1": 0.3 * jax.random.normal(k1, (5, 32)), "b1": jnp.zeros((32,)),
            "w2": 0.3 * jax.random.normal(k2, (32, 5)), "b2": jnp.zeros((5,))}
  batch = {"x": jax.random.normal(k3, (64, 5)), "t": jax.random.normal(k4, (64, 5))}
  opt = optax.adam(1e-2)

  def loss_fn(p, b):
    hid = jnp.tanh(b["x"] @ p["w1"] + p["b1"][None, :])
    return jnp.mean((hid @ p["w2"] + p["b2"][None, :] - b["t"]) ** 2)

  @jax.jit
  def step(p, s, b):
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  p0, s0 = params, opt.init(params)
  p1, s1 = sharding.replicate(mesh, params), sharding.replicate(mesh, opt.init(params))
  sb = sharding.shard_batch(mesh, batch)
  assert sb["x"].addressable_shards[0].data.shape == (16, 5)
  assert p1["w1"].sharding.is_fully_replicated
  for _ in range(3):
    p0, s0, l0 = step(p0, s0, batch)
    p1, s1, l1 = step(p1, s1, sb)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert p1["w1"].sharding.is_fully_replicated
  try:
    sharding.shard_batch(mesh, {"x": np.zeros((10, 5))})
  except ValueError as e:
    assert "divisible by 4" in str(e)
  else:
    raise AssertionError("an uneven batch must raise")


# Two children (one 4-device process each), so that parallel test workers can run them at the same time.
_CHILD_GROUPS = {
    "kernels": (check_assign_matches_reference, check_ties_lowest_global_index, check_cell_masses_sharded_like_h,
                check_assign_equals_single_device_any_tiling, check_top_k_matches_reference,
                check_newton_solve_equals_single_device),
    "solvers": (check_solve_equals_single_device, check_solve_with_callback_equals_single_device,
                check_solve_with_weights_and_h_init, check_data_parallel_step),
}
_CHILD_RESULTS = {}


def _child_results(group):
  if group not in _CHILD_RESULTS:
    _CHILD_RESULTS[group] = multidevice.run_child(__file__, _NUM_DEVICES, group)
  return _CHILD_RESULTS[group]


# The "solvers" child (Adam solves on 4 devices, ~2 minutes of the 2-core CPU) is a slow test: the default
# suite keeps the "kernels" child (assignment, top-k and the sharded Newton solve) and test_pipeline's sharded
# OT stage, which compares a sharded Adam fit with one device.
_SLOW_GROUPS = ("solvers",)


@pytest.mark.parametrize("group,name", [
    pytest.param(group, check.__name__, id=check.__name__,
                 marks=[pytest.mark.xdist_group(f"sharding-{group}")] + ([pytest.mark.slow] if group in _SLOW_GROUPS
                                                                         else []))
    for group, checks in _CHILD_GROUPS.items() for check in checks])
def test_on_four_devices(group, name):
  assert _child_results(group)[name] == "ok", _child_results(group)[name]


# ---------------------------------------------------------------------------------------------------------
# Single-device tests (pytest's own process).


def test_padded_size():
  assert [sharding.padded_size(n, 4) for n in (1, 4, 5, 203)] == [4, 4, 8, 204]
  with pytest.raises(ValueError):
    sharding.padded_size(0, 4)


def test_pad_problem_keeps_the_solution():
  # Independent of any sharding: the padded problem (weight-0 targets) is solved to the same heights.
  y = 2.0 * jax.random.normal(jax.random.key(1), (21, 3))
  problem = solver_lib.make_problem(y)
  padded = sharding.pad_problem(problem, 8)
  assert padded.num_targets == 24 and float(jnp.sum(padded.weights[21:])) == 0.0
  np.testing.assert_array_equal(np.asarray(padded.representative[21:]), [21, 22, 23])
  solver = solver_lib.BrenierSolver(num_iterations=30, batch_size=1024, max_batch_size=1024)
  pot0, _ = jax.jit(solver)(jax.random.key(0), problem)
  pot1, state1 = jax.jit(solver)(jax.random.key(0), padded)
  np.testing.assert_allclose(np.asarray(pot1.h[:21]), np.asarray(pot0.h), atol=1e-4)
  assert np.all(np.asarray(pot1.h[21:]) == -1e30)
  cut = sharding.unpad_state(state1, 21)
  assert cut.h.shape == cut.window_hist.shape == (21,)
  assert all(a.shape in ((), (21,)) for a in jax.tree.leaves(cut.opt_state))
  back = sharding.pad_state(cut, 24)
  np.testing.assert_array_equal(np.asarray(back.h[:21]), np.asarray(state1.h[:21]))
  assert back.h.shape == (24,)


def test_one_device_mesh_matches_kernel():
  mesh = sharding.make_mesh(1)
  x = jax.random.normal(jax.random.key(0), (300, 4))
  y = jax.random.normal(jax.random.key(1), (37, 4))
  h = jax.random.normal(jax.random.key(2), (37,))
  idx, best = jax.jit(functools.partial(sharding.sharded_assign, mesh))(x, y, h)
  ref_idx, ref_best, _ = _reference_argmax(x, y, h)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_allclose(np.asarray(best), ref_best, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(jax.jit(kernels.assign)(x, y, h)[0]))


def test_bad_inputs():
  mesh = sharding.make_mesh(1)
  with pytest.raises(ValueError, match="num_devices"):
    sharding.make_mesh(len(jax.devices()) + 1)
  with pytest.raises(ValueError, match="not in the mesh axes"):
    sharding.sharded_assign(mesh, jnp.zeros((2, 3)), jnp.zeros((4, 3)), jnp.zeros(4), axis_name="x")
  with pytest.raises(ValueError, match="Shape mismatch"):
    sharding.sharded_assign(mesh, jnp.zeros((2, 3)), jnp.zeros((4, 2)), jnp.zeros(4))
  with pytest.raises(ValueError, match="mesh="):
    sharding.ShardedBrenierSolver(mesh=None)
  with pytest.raises(ValueError, match="process_id"):
    sharding.initialize_distributed("localhost:1234", num_processes=2, process_id=2)
  assert sharding.initialize_distributed(num_processes=1) is False


if __name__ == "__main__":
  jax.config.update("jax_numpy_rank_promotion", "raise")
  multidevice.child_main(_CHILD_GROUPS[os.environ[multidevice.GROUP_ENV]])
