"""The pipeline in-process: stages, skipping, config fingerprint, bad input, OT divergence, report helpers."""
import dataclasses
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lsot_jax import pipeline
from lsot_jax import report
from lsot_jax import solver as solver_lib


def _tiny_config(**overrides):
  """A ring config that runs every stage in a few seconds."""
  c = pipeline.default_config()
  c.data.num_train = 200
  c.data.num_test = 200
  c.ot.num_iterations = 40
  c.ot.batch_size = 2048
  c.ot.max_batch_size = 2048
  c.ot.checkpoint_every = 10
  c.ot.marginal_samples = 8192
  c.sample.methods = ("exact", "gaussian")
  c.sample.num_samples = 200
  c.sample.num_seeds = 2
  c.sample.grid_size = 16
  c.eval.metrics = ("mode_coverage",)
  for dotted, value in overrides.items():
    section, field = dotted.split("__")
    c[section][field] = value
  return c


def _quiet(lines):
  return lines.append


def test_config_diff_names_every_changed_field():
  old = {"seed": 0, "ot": {"tol": 0.05, "window": 10}, "sample": {"methods": ["exact"]}}
  new = {"seed": 1, "ot": {"tol": 0.05, "window": 20}, "sample": {"methods": ("exact", "soft")}}
  assert pipeline.config_diff(old, new) == [
      ("ot.window", 10, 20), ("sample.methods", ["exact"], ["exact", "soft"]), ("seed", 0, 1)]
  assert pipeline.config_diff(old, old) == []


@pytest.mark.parametrize("field,value,match", [
    ("sample__methods", ("exact", "bogus"), r"sample.methods.*bogus.*valid: exact, extended"),
    ("eval__metrics", ("mode_coverage", "fid"), r"eval.metrics.*fid"),
    ("data__name", "imagenet", r"data.name"),
    ("ae__latent_dim", 3, r"ae.latent_dim.*use 2"),
    ("eval__feature_space", "classifier", r"eval.feature_space"),
    ("ot__source", "laplace", r"ot.source"),
    ("ot__max_batch_size", 1024, r"ot.max_batch_size"),
])
def test_bad_config_values_are_refused_before_work(tmp_path, field, value, match):
  config = _tiny_config(**{field: value})
  with pytest.raises(pipeline.PipelineError, match=match):
    pipeline.run(config, tmp_path / "w", log=_quiet([]))
  assert not (tmp_path / "w").exists()


def test_too_few_samples_for_knn_metric_is_refused(tmp_path):
  config = _tiny_config(eval__metrics=("mode_coverage", "prdc"), sample__num_samples=5, eval__k=5)
  with pytest.raises(pipeline.PipelineError, match="needs at least 6 samples"):
    pipeline.run(config, tmp_path / "w", log=_quiet([]))


def test_end_to_end_then_rerun_skips_every_stage(tmp_path):
  workdir = tmp_path / "run"
  lines = []
  config = _tiny_config(sample__methods=("exact", "gaussian", "ott_semidiscrete"))
  metrics = pipeline.run(config, workdir, log=lines.append)
  # Exact samples are training points: all 8 modes, and (as for the data) nearly all within 3 std; the same
  # holds for the ott-jax-fitted potential. A single Gaussian fitted to a ring of radius 1 with std 0.01 puts
  # almost nothing within 0.03 of a mode.
  for method in ("exact", "ott_semidiscrete"):
    assert metrics["methods"][method]["modes"] == 8
    assert metrics["methods"][method]["high_quality"] > 0.9
  assert metrics["methods"]["gaussian"]["high_quality"] < 0.2
  assert metrics["methods"]["exact"]["num_seeds"] == 2 and "modes_se" in metrics["methods"]["exact"]
  for rel in ("config.json", "metrics.json", "report.md", "report.html", "ot/history.json",
              "ot/convergence.png", "samples/exact.png", "samples/gaussian.png"):
    assert (workdir / rel).is_file(), rel
  history = json.loads((workdir / "ot/history.json").read_text())
  assert len(history["errors"]) == history["iterations"] == 40
  md = (workdir / "report.md").read_text()
  assert "| LSOT exact | 8 ± 0 |" in md and "ot/convergence.png" in md

  lines.clear()
  again = pipeline.run(config, workdir, log=lines.append)
  assert again["methods"] == metrics["methods"]
  for stage in ("ae", "encode", "ot", "sample", "eval"):
    assert f"{stage}: already done, skipping" in lines


def test_workdir_with_other_config_is_refused_naming_fields(tmp_path):
  workdir = tmp_path / "run"
  pipeline.run(_tiny_config(), workdir, stage="ae", log=_quiet([]))
  stored = (workdir / "config.json").read_text()
  other = _tiny_config(ot__tol=0.5)
  other.seed = 3
  with pytest.raises(pipeline.ConfigMismatchError) as info:
    pipeline.run(other, workdir, log=_quiet([]))
  assert info.value.fields == ("ot.tol", "seed")
  assert "ot.tol: 0.05 -> 0.5" in str(info.value) and "seed: 0 -> 3" in str(info.value)
  assert (workdir / "config.json").read_text() == stored

  lines = []
  pipeline.run(other, workdir, stage="ae", overwrite=True, log=lines.append)
  aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(aside) == 1 and (aside[0] / "config.json").read_text() == stored
  assert (aside[0] / "ae" / "DONE.json").exists()
  assert json.loads((workdir / "config.json").read_text())["seed"] == 3
  assert any(str(aside[0]) in line for line in lines)


def test_single_stage_needs_the_earlier_stages(tmp_path):
  with pytest.raises(pipeline.PipelineError, match=r"'ot' needs the earlier stage\(s\) \['ae', 'encode'\]"):
    pipeline.run(_tiny_config(), tmp_path / "w", stage="ot", log=_quiet([]))


def test_latent_dim_of_restored_autoencoder_is_checked_before_work(tmp_path):
  workdir = tmp_path / "run"
  config = _tiny_config(ae__kind="mlp", ae__widths=(16,), ae__epochs=1, ae__batch_size=100)
  pipeline.run(config, workdir, stage="ae", log=_quiet([]))
  steps_before = sorted(p.name for p in (workdir / "ae" / "ckpt").iterdir())
  changed = _tiny_config(ae__kind="mlp", ae__widths=(16,), ae__epochs=1, ae__batch_size=100,
                         ae__latent_dim=3)
  # A config.json edited by hand (or an ae/ folder copied from another run) must not slip through.
  (workdir / "config.json").write_text(json.dumps(changed.to_dict()))
  with pytest.raises(pipeline.ConfigMismatchError, match="latent_dim: checkpoint has 2, config asks for 3"):
    pipeline.run(changed, workdir, log=_quiet([]))
  assert sorted(p.name for p in (workdir / "ae" / "ckpt").iterdir()) == steps_before


def test_nan_heights_stop_naming_stage_and_step_and_keep_last_checkpoint(tmp_path, monkeypatch):
  original = solver_lib.BrenierSolver.run

  def poisoned(self, rng, problem, state, num_steps=None):
    new = original(self, rng, problem, state, num_steps)
    return dataclasses.replace(new, h=jnp.where(new.it > 20, jnp.nan, new.h))

  monkeypatch.setattr(solver_lib.BrenierSolver, "run", poisoned)
  workdir = tmp_path / "run"
  with pytest.raises(pipeline.OTDiverged) as info:
    pipeline.run(_tiny_config(), workdir, log=_quiet([]))
  assert info.value.step == 29 and info.value.last_good_step == 20
  assert "Stage 'ot'" in str(info.value) and "step 29" in str(info.value) and "(step 20)" in str(info.value)
  steps = sorted(int(p.name) for p in (workdir / "ot" / "ckpt").iterdir() if p.name.isdigit())
  assert steps[-1] == 20
  assert not (workdir / "ot" / "DONE.json").exists()

  monkeypatch.setattr(solver_lib.BrenierSolver, "run", original)
  lines = []
  metrics = pipeline.run(_tiny_config(), workdir, log=lines.append)
  assert "ot: resuming from solver step 20" in lines
  assert metrics["ot"]["iterations"] == 40


def test_infinite_step_size_diverges_at_the_first_step(tmp_path):
  with pytest.raises(pipeline.OTDiverged, match="step 0; no checkpoint was written"):
    pipeline.run(_tiny_config(ot__learning_rate=float("inf")), tmp_path / "w", log=_quiet([]))


def test_metrics_table_formats_mean_and_standard_error():
  header, rows = report.metrics_table(
      {"exact": {"modes": 8.0, "modes_se": 0.0, "frechet": 12.3456, "num_seeds": 10},
       "vae": {"frechet": 0.00012}}, {"exact": "LSOT exact"})
  assert header == ["method", "modes ↑", "frechet ↓"]
  assert rows == [["LSOT exact", "8 ± 0", "12.35"], ["vae", "-", "0.00012"]]


def test_image_grid_places_tiles_row_major(tmp_path):
  images = np.zeros((3, 2, 2, 1), np.float32)
  images[1] = 1.0
  images[2, 0, 0, 0] = 0.5
  path = report.save_image_grid(tmp_path / "g.png", images, ncols=2, pad=1, scale=1)
  grid = np.asarray(Image.open(path))
  assert grid.shape == (2 * 3 + 1, 2 * 3 + 1)
  np.testing.assert_array_equal(grid[1:3, 1:3], 0)       # tile 0
  np.testing.assert_array_equal(grid[1:3, 4:6], 255)     # tile 1
  assert grid[4, 1] == 128 and grid[4, 2] == 0           # tile 2, second row
  np.testing.assert_array_equal(grid[4:6, 4:6], 255)     # empty slot stays white
  assert grid[0].min() == 255 and grid[:, 3].min() == 255


def test_write_report_without_metrics_says_what_to_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="run the eval stage first"):
    report.write_report(tmp_path)
