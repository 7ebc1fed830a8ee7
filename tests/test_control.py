"""Tests for lsot_jax.control: one test per step-control rule on hand-made inputs whose answer is stated, and
the whole Adam solver against a plain host-loop re-implementation of the rules (float64 NumPy decisions).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsot_jax import control
from lsot_jax import kernels
from lsot_jax import solver as solver_lib
from lsot_jax import sources

F = functools.partial(jnp.asarray, dtype=jnp.float32)


def test_window_update_and_error():
  """Two steps whose histograms (0.6, 0.4) and (0.4, 0.6) average to nu = (0.5, 0.5): window error 0, while
  each step's batch error is 0.2 (so the accumulated batch error is 0.4)."""
  nu = F([0.5, 0.5])
  hist, err = F([0.0, 0.0]), F(0.0)
  for w in ([0.6, 0.4], [0.4, 0.6]):
    w = F(w)
    hist, err = control.window_update(hist, err, w, jnp.sum(jnp.abs(w - nu)))
  np.testing.assert_allclose(np.asarray(hist), [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(float(err), 0.4, rtol=1e-6)
  assert float(control.window_error(hist, nu, 2)) == pytest.approx(0.0, abs=1e-7)
  # One-sided window: (0.7, 0.3) twice -> L1 error 0.4 (the sum is divided by the window, not the steps).
  assert float(control.window_error(F([1.4, 0.6]), nu, 2)) == pytest.approx(0.4, rel=1e-6)


@pytest.mark.parametrize(
    "window_error,mean_batch,floor,expected",
    [
        (0.04, 0.10, 0.09, True),    # sqrt(0.05^2 + 0.09^2) = 0.1030 >= 0.10
        (0.04, 0.11, 0.09, False),   # an oscillation: averaged histogram fine, iterates too far
        (0.05, 0.05, 0.09, False),   # the window test is strict
        (0.06, 0.01, 0.0, False),
        (0.01, 0.05, 0.0, True),     # exact batch (floor 0): the iterates' own error must be <= tol
        (0.01, 0.0501, 0.0, False),
    ],
)
def test_is_converged(window_error, mean_batch, floor, expected):
  got = control.is_converged(F(window_error), F(mean_batch), 0.05, F(floor))
  assert bool(got) is expected


def test_direction_consistency_and_drift():
  """|m| = sqrt(v) in every coordinate (every gradient of one sign): consistency 1; m = 0 (signs cancel): 0;
  v = 0 (no step yet): 0, not NaN. Drift is consistency >= threshold (0.5 exactly counts)."""
  assert float(control.direction_consistency(F([0.5, -0.5]), F([0.25, 0.25]))) == pytest.approx(1.0)
  assert float(control.direction_consistency(F([0.0, 0.0]), F([0.25, 0.25]))) == 0.0
  assert float(control.direction_consistency(F([0.0, 0.0]), F([0.0, 0.0]))) == 0.0
  # Only one of two equal coordinates moving: consistency 0.5.
  c = control.direction_consistency(F([0.5, 0.0]), F([0.25, 0.25]))
  assert float(c) == pytest.approx(0.5)
  assert bool(control.is_drifting(F(0.5), 0.5)) and not bool(control.is_drifting(F(0.49), 0.5))


@pytest.mark.parametrize(
    "window_error,best,floor,drifting,stall_ratio,expected",
    [
        (0.19, 0.20, 0.0, False, 1.0, False),   # improved
        (0.20, 0.20, 0.0, False, 1.0, True),    # not below the best: stalled
        (0.25, 0.20, 0.0, True, 1.0, False),    # worse, but drifting: never a stall
        (0.19, 0.20, 0.0, False, 0.9, True),    # improved by less than stall_ratio demands
        (0.17, 0.20, 0.0, False, 0.9, False),
        (0.50, np.inf, 0.0, False, 1.0, False),  # first window of a stage
        (0.10, np.inf, 0.07, True, 1.0, True),  # below 1.5 x floor = 0.105: stalled, drift or not
        (0.11, np.inf, 0.07, False, 1.0, False),
    ],
)
def test_is_stalled(window_error, best, floor, drifting, stall_ratio, expected):
  got = control.is_stalled(F(window_error), F(best), F(floor), stall_ratio=stall_ratio, floor_factor=1.5,
                           drifting=jnp.asarray(drifting))
  assert bool(got) is expected


def test_next_stage_and_best_error():
  t, f = jnp.asarray(True), jnp.asarray(False)
  assert bool(control.next_stage(t, t, last_stage=False))
  assert not bool(control.next_stage(f, t, last_stage=False))  # only at the end of a window
  assert not bool(control.next_stage(t, f, last_stage=False))
  assert not bool(control.next_stage(t, t, last_stage=True))  # the last stage never ends
  best = F(0.2)
  assert float(control.best_window_error_update(best, F(0.1), f, f)) == pytest.approx(0.2)  # mid-window
  assert float(control.best_window_error_update(best, F(0.1), t, f)) == pytest.approx(0.1)
  assert float(control.best_window_error_update(best, F(0.3), t, f)) == pytest.approx(0.2)
  assert float(control.best_window_error_update(best, F(0.1), t, t)) == np.inf  # new stage: restart


@pytest.mark.parametrize("error,stalled,stage_it,damped,empty,expected", [
    (0.10, False, 3, False, False, True),    # at its floor (0.1 x stage_tol 1)
    (0.20, False, 3, False, False, False),   # above it, under the cap
    (0.20, True, 3, False, False, True),     # no step accepted
    (0.20, False, 8, False, False, True),    # at max_steps
    (0.20, False, 8, True, False, False),    # damped: goes on past max_steps ...
    (0.20, False, 32, True, False, True),    # ... up to max_first_steps
    (0.10, False, 3, True, False, True),     # damped at its floor: ends
    (0.05, False, 3, False, True, False),    # an empty cell: the floor does not end it
    (0.05, False, 8, False, True, False),    # nor max_steps
    (0.05, True, 5, False, True, True),      # a stall does
    (0.05, False, 32, False, True, True),    # and max_first_steps
])
def test_newton_stage_ends(error, stalled, stage_it, damped, empty, expected):
  ends = control.newton_stage_ends(F(error), F(0.1), jnp.asarray(stalled), jnp.asarray(stage_it), stage_tol=1.0,
                                   max_steps=8, damped=jnp.asarray(damped), empty=jnp.asarray(empty),
                                   max_first_steps=32)
  assert bool(ends) is expected


def test_lr_boost_update_and_cap():
  t, f = jnp.asarray(True), jnp.asarray(False)

  def boost(b, end=t, drifting=t, advanced=f):
    return float(control.lr_boost_update(F(b), end, drifting, advanced, 0.5, 1024.0))

  assert boost(4.0) == 8.0
  assert boost(768.0) == 1024.0  # 1536 capped
  assert boost(1024.0) == 1024.0
  assert boost(4.0, end=f) == 4.0
  assert boost(4.0, drifting=f) == 4.0
  assert boost(4.0, advanced=t) == 4.0  # a stage change keeps the boost, it does not grow it
  assert float(control.lr_boost_update(F(1.0), t, t, f, 0.25, 1e6)) == 4.0  # 1 / lr_decay


def test_stage_learning_rate():
  lr = control.stage_learning_rate(0.3, 0.5, 3, F(4.0), F(0.01))
  assert float(lr) == pytest.approx(0.3 * 0.125 * 4.0 * 0.01, rel=1e-6)
  assert float(control.stage_learning_rate(1.0, 0.5, 0, F(1.0), F(2.0))) == 2.0


def test_exact_batch_floor_is_zero():
  points = jnp.zeros((40, 2))
  discrete = sources.DiscreteSource(points=points)
  nu = jnp.full((40,), 1 / 40)
  assert control.is_exact_batch(discrete, 40) is True
  assert control.is_exact_batch(discrete, 39) is False  # a sub-batch is sampled: it has noise
  assert control.is_exact_batch(sources.Gaussian(dim=2), 40) is False
  assert solver_lib.sampling_floor(nu, 40, True) == 0.0
  expected = np.sqrt(2 / np.pi) * 40 * np.sqrt((1 / 40) * (39 / 40) / 40)
  assert float(solver_lib.sampling_floor(nu, 40, False)) == pytest.approx(expected, rel=1e-5)


def test_rules_vmap():
  """Batched inputs give the element-wise answers (the solver's rules must not break jax.vmap)."""
  stalled = jax.vmap(functools.partial(control.is_stalled, stall_ratio=1.0, floor_factor=1.5))(
      F([0.19, 0.2, 0.25]), F([0.2, 0.2, 0.2]), F([0.0, 0.0, 0.0]), drifting=jnp.asarray([False, False, True])
  )
  np.testing.assert_array_equal(np.asarray(stalled), [False, True, False])
  c = jax.vmap(control.direction_consistency)(F([[0.5, -0.5], [0.0, 0.0]]), F([[0.25, 0.25], [0.25, 0.25]]))
  np.testing.assert_allclose(np.asarray(c), [1.0, 0.0], atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# The whole solver against a straightforward re-implementation: the device computes one Adam step (the same
# kernel, sample keys and optax update), the host takes every control decision in float64 NumPy.
# ------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("batch", "b1", "b2"))
def _physics(rng, problem, h, opt_state, it, lr, *, batch, b1, b2):
  nu = problem.weights
  x = problem.source.sample(jax.random.fold_in(rng, it), batch)
  idx, best = kernels.assign(x, problem.y, jnp.where(nu > 0, h, kernels.MASKED_HEIGHT), method="fused")
  w = kernels.cell_histogram(idx, nu.shape[0])
  loss = jnp.mean(best) - jnp.sum(jnp.where(nu > 0, nu * h, 0.0))
  updates, opt_state = optax.scale_by_adam(b1=b1, b2=b2).update(w - nu, opt_state)
  h_new = h - lr * updates
  active = nu > 0
  h_new = jnp.where(active, h_new - jnp.sum(jnp.where(active, h_new, 0.0)) / jnp.sum(active), 0.0)
  return h_new, opt_state, w, loss


_init = jax.jit(lambda solver, problem: solver.init(problem))  # eager init rounds differently (~1e-6)


def _reference(solver, rng, problem, num_steps):
  """Runs ``num_steps`` steps with the rules written out; returns (h, stage, it, converged, lr_boost)."""
  nu64 = np.asarray(problem.weights, np.float64)
  schedule = solver.batch_schedule
  h = _init(solver, problem).h
  opt_state = optax.scale_by_adam(b1=solver.b1, b2=solver.b2).init(h)
  stage, boost, best, hist, batch_errors, converged = 0, 1.0, np.inf, np.zeros_like(nu64), 0.0, False
  it = 0
  while it < num_steps and not converged:
    batch = schedule[stage]
    lr = np.float32(np.float32(solver.learning_rate * solver.lr_decay**stage) * np.float32(boost)
                    ) * problem.scale
    h, opt_state, w, _ = _physics(rng, problem, h, opt_state, it, lr, batch=batch, b1=solver.b1, b2=solver.b2)
    w = np.asarray(w, np.float64)
    it += 1
    hist += w
    batch_errors += np.abs(w - nu64).sum()
    if it % solver.window:
      continue
    exact = isinstance(problem.source, sources.DiscreteSource) and batch == problem.source.num_points
    floor1 = 0.0 if exact else np.sqrt(2 / np.pi) * np.sqrt(nu64 * (1 - nu64) / batch).sum()
    floor_w = floor1 / np.sqrt(solver.window)  # the floor of window * batch samples
    err = np.abs(hist / solver.window - nu64).sum()
    converged = err < solver.tol and batch_errors / solver.window <= np.hypot(solver.tol, floor1)
    mu, v = np.asarray(opt_state.mu, np.float64), np.asarray(opt_state.nu, np.float64)
    drifting = np.abs(mu).sum() / max(np.sqrt(v).sum(), 1e-30) >= solver.drift_threshold
    stalled = (err >= solver.stall_ratio * best and not drifting) or err < solver.floor_factor * floor_w
    advance = stalled and stage < len(schedule) - 1
    if drifting and not advance:
      boost = min(boost / solver.lr_decay, solver.max_boost)
    best = np.inf if advance else min(best, err)
    stage += int(advance)
    hist, batch_errors = np.zeros_like(nu64), 0.0
  return np.asarray(h), stage, it, converged, boost


def _clustered(seed=0, n=60, d=16, k=6):
  r = np.random.default_rng(seed)
  centres = 3.0 * r.normal(size=(k, d))
  y = centres[r.integers(0, k, n)] + 0.05 * r.normal(size=(n, d))
  return solver_lib.make_problem(y, source=sources.Gaussian(dim=d))


def _discrete(seed=2, n=30):
  r = np.random.default_rng(seed)
  x = r.normal(size=(n, 2)).astype(np.float32)
  y = (r.normal(size=(n, 2)) * [2.0, 0.5] + [1.0, 0.0]).astype(np.float32)
  return solver_lib.make_problem(y, source=sources.DiscreteSource(points=jnp.asarray(x)))


def _one_d(seed=1, n=8):
  r = np.random.default_rng(seed)
  y, w = np.sort(r.uniform(-1, 2, n)), r.dirichlet(np.full(n, 3.0))
  return solver_lib.make_problem(y[:, None], w, sources.UniformCube(dim=1, low=0.0, high=1.0))


_solve = jax.jit(lambda solver, rng, problem: solver(rng, problem)[1])


@pytest.mark.parametrize(
    "name,make,cfg",
    [
        # Stage changes by stall, drift boosts up to the cap (the clustered start is far from the optimum).
        ("clustered16", _clustered, dict(num_iterations=100, batch_size=512, max_batch_size=2048, tol=0.0,
                                         extra_decays=1, max_boost=4.0)),
        # Exact full batch (floor 0): extra decays, then convergence at tol = 1e-6.
        ("discrete", _discrete, dict(num_iterations=1000, batch_size=30, max_batch_size=30, tol=1e-6,
                                     extra_decays=8)),
        # Noise-floor stalls at growing batch sizes, stall_ratio < 1 and a low drift threshold.
        ("one_d", _one_d, dict(num_iterations=120, batch_size=512, max_batch_size=4096, tol=0.0,
                               stall_ratio=0.95, drift_threshold=0.3, extra_decays=1)),
    ],
)
def test_solver_matches_reference_rules(name, make, cfg):
  problem = make()
  solver = solver_lib.BrenierSolver(**cfg)
  rng = jax.random.key(0)
  state = _solve(solver, rng, problem)
  h, stage, it, converged, boost = _reference(solver, rng, problem, solver.num_iterations)
  assert (int(state.it), int(state.stage), bool(state.converged), float(state.lr_boost)) == (
      it, stage, converged, boost), name
  np.testing.assert_array_equal(np.asarray(state.h), h, err_msg=name)
  assert stage >= 2, name  # the run really exercised the stage rule
  if name == "discrete":
    assert converged
  if name == "clustered16":
    assert boost == 4.0  # reached the cap (16 without it)
