"""Tests for lsot_jax.scan: parsing, vmapped scans against one-by-one runs, static groups, outputs."""
import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lsot_jax import scan
from lsot_jax import solver as solver_lib
from lsot_jax import sources

# extra_decays=0: fewer while-loop stages to compile (the equalities tested do not depend on the schedule).
_BASE = dict(num_iterations=40, batch_size=512, max_batch_size=1024, window=5, tol=0.0, extra_decays=0)


@pytest.fixture(scope="module")
def problem():
  """n = 40 codes in R^3; the source is a fixed point cloud, so the evaluation sample is known exactly."""
  rng = np.random.default_rng(0)
  y = 1.5 * rng.normal(size=(40, 3)).astype(np.float32)
  points = rng.normal(size=(4000, 3)).astype(np.float32)
  return solver_lib.make_problem(y, source=sources.DiscreteSource(jnp.asarray(points)))


def _one_by_one(problem, settings, **base):
  """Each setting solved on its own (one compiled function, learning rate as an argument)."""

  @jax.jit
  def solve(lr, key, prob):
    return solver_lib.BrenierSolver(learning_rate=lr, **base)(key, prob)[0].h

  return np.stack([np.asarray(solve(jnp.float32(lr), jax.random.key(seed), problem))
                   for lr, seed in settings])


def test_parse_scan_specs():
  specs = scan.parse_scan_specs(["ot.learning_rate=1e-3,3e-3,1e-2", "seed=0,1,2", "ot.initialisation=zero"])
  assert specs == [("ot.learning_rate", [1e-3, 3e-3, 1e-2]), ("seed", [0, 1, 2]),
                   ("ot.initialisation", ["zero"])]
  assert isinstance(specs[1][1][0], int) and isinstance(specs[0][1][0], float)
  for bad, match in (("seed", "field=v1"), ("=1,2", "field=v1"), ("seed=", "empty"), ("seed=1,,2", "empty"),
                     ("seed=1,1", "repeats")):
    with pytest.raises(ValueError, match=match):
      scan.parse_scan_specs([bad])
  with pytest.raises(ValueError, match="twice"):
    scan.parse_scan_specs(["seed=1", "seed=2"])


def test_vmapped_scan_equals_one_by_one_and_exact_eval(problem, tmp_path):
  res = scan.run_ot_scan(problem, _BASE, ["ot.learning_rate=0.1,0.5", "seed=0,3"],
                         num_eval_samples=4000, out_dir=str(tmp_path),
                         quality_fn=lambda pot, setting: float(jnp.max(pot.h)))
  assert res.num_calls == 1
  settings = [(r["ot.learning_rate"], r["seed"]) for r in res.rows]
  assert settings == [(0.1, 0), (0.1, 3), (0.5, 0), (0.5, 3)]
  expected = _one_by_one(problem, settings, **_BASE)
  np.testing.assert_allclose(res.h, expected, atol=1e-4)
  assert not np.allclose(expected[0], expected[2], atol=1e-2)  # the settings do differ
  # Final marginal error: the evaluation sample is the whole point cloud, so this is exact (float64 NumPy)
  # up to the samples whose two best scores are within float32 rounding (the kernel may break those ties
  # either way; each such sample can move the L1 error by 2 / 4000).
  points = np.asarray(problem.source.points, np.float64)
  y = np.asarray(problem.y, np.float64)
  for row, h in zip(res.rows, res.h):
    s = points @ y.T + h.astype(np.float64)[None, :]
    top2 = np.sort(s, axis=1)[:, -2:]
    near_ties = int(np.sum(top2[:, 1] - top2[:, 0] < 1e-4))
    assert near_ties <= 4
    l1 = np.abs(np.bincount(np.argmax(s, axis=1), minlength=40) / 4000 - np.asarray(problem.weights)).sum()
    assert row["l1"] == pytest.approx(l1, abs=2 * near_ties / 4000 + 1e-5)
    assert row["quality"] == pytest.approx(float(h.max()), rel=1e-6)
    assert row["iterations"] == 40 and row["converged"] is False and row["diverged"] is False
  # Outputs: CSV round trip, markdown table, a readable PNG.
  with open(res.files["csv"]) as f:
    table = list(csv.DictReader(f))
  assert [float(t["l1"]) for t in table] == pytest.approx([r["l1"] for r in res.rows])
  assert list(table[0])[:3] == ["ot.learning_rate", "seed", "l1"] and "quality" in table[0]
  md = open(res.files["md"]).read().splitlines()
  assert md[0].startswith("| ot.learning_rate | seed | l1") and len(md) == 2 + 4
  with Image.open(res.files["png"]) as im:
    assert im.size[0] > 100 and im.size[1] > 100


def test_static_fields_are_grouped(problem):
  base = dict(_BASE, num_iterations=20)
  del base["batch_size"]
  res = scan.run_ot_scan(problem, base, [("ot.batch_size", [256, 512]), ("seed", [1, 2])],
                         num_eval_samples=4000)
  assert res.num_calls == 2 and len(res.rows) == 4
  for batch in (256, 512):
    rows = [i for i, r in enumerate(res.rows) if r["ot.batch_size"] == batch]
    default_lr = solver_lib.BrenierSolver().learning_rate  # not scanned and not in base: the default
    expected = _one_by_one(problem, [(default_lr, res.rows[i]["seed"]) for i in rows], batch_size=batch,
                           **base)
    np.testing.assert_allclose(res.h[rows], expected, atol=1e-4)


def test_bad_fields(problem):
  with pytest.raises(ValueError, match="'ae.latent_dim'"):
    scan.run_ot_scan(problem, _BASE, ["ae.latent_dim=2,4"])
  with pytest.raises(ValueError, match="'num_iterations' is both scanned"):
    scan.run_ot_scan(problem, _BASE, ["ot.num_iterations=5,10"])
  base = dict(_BASE)
  del base["max_batch_size"]
  with pytest.raises(ValueError, match="batch_size <= max_batch_size"):
    scan.run_ot_scan(problem, base, ["ot.max_batch_size=256,1024"])


def test_per_setting_problems_equal_one_by_one(problem):
  """Settings on their own problems (stacked and vmapped with them) equal each problem solved alone."""
  rng = np.random.default_rng(1)
  y2 = 0.7 * rng.normal(size=(40, 3)).astype(np.float32) + 0.5
  other = solver_lib.make_problem(y2, source=problem.source)
  problems = [problem, other]
  settings = [(0.1, 0, 1), (0.5, 3, 0), (0.1, 3, 1)]  # (learning rate, seed, problem)
  h, stats, num_calls = scan.fit_ot_settings(
      problems, [dict(_BASE, learning_rate=lr) for lr, _, _ in settings],
      [jax.random.key(seed) for _, seed, _ in settings], problem_index=[p for _, _, p in settings],
      num_eval_samples=4000)
  assert num_calls == 1 and h.shape == (3, 40) and len(stats) == 3
  for p in (0, 1):
    mine = [i for i, s in enumerate(settings) if s[2] == p]
    expected = _one_by_one(problems[p], [settings[i][:2] for i in mine], **_BASE)
    np.testing.assert_allclose(h[mine], expected, atol=1e-4)
  shared_h, _, _ = scan.fit_ot_settings(problem, [dict(_BASE, learning_rate=0.1)], [jax.random.key(3)],
                                        num_eval_samples=4000)
  assert not np.allclose(shared_h[0], h[2], atol=1e-2)  # the problem does matter
  with pytest.raises(ValueError, match="problem_index exactly"):
    scan.fit_ot_settings(problem, [_BASE], [jax.random.key(0)], problem_index=[0])
  with pytest.raises(ValueError, match=r"problem_index must lie in \[0, 2\)"):
    scan.fit_ot_settings(problems, [_BASE], [jax.random.key(0)], problem_index=[2])
