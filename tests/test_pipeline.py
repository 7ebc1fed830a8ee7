"""The pipeline in-process: stages, skipping, config fingerprint, bad input, OT divergence, report helpers,
scans; and the sharded OT stage on 4 forced CPU devices (one subprocess, see ``_sharded_child``)."""
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import warnings

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from lsot_jax import config as config_lib
from lsot_jax import data as data_lib
from lsot_jax import models
from lsot_jax import newton as newton_lib
from lsot_jax import pipeline
from lsot_jax import report
from lsot_jax import scans
from lsot_jax import solver as solver_lib
from lsot_jax import tracking
from lsot_jax import train


def _tiny_config(**overrides):
  """A ring config that runs every stage in a few seconds (with the Adam solver, whose step counts the tests
  below check; the Newton OT stage has tests of its own). Without progress: a progress callback is a new
  solver to compile in each run, so the tests that want it turn it on."""
  c = pipeline.default_config()
  c.log.progress = False
  c.ot.solver = "adam"
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


def _as_legacy_marker(path):
  """Rewrites a stage's DONE.json as versions before stage keys wrote it (no key, fields or inputs)."""
  done = json.loads(path.read_text())
  for name in ("key", "fields", "inputs"):
    del done[name]
  path.write_text(json.dumps(done))


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
    ("ae__lr_schedule", "linear", r"ae.lr_schedule.*'constant', 'cosine'"),
    ("sample__wgan_learning_rate", 0.0, r"sample.wgan_learning_rate.*positive"),
    ("sample__blend_scale", 0.0, r"sample.blend_scale.*positive"),
    ("ot__max_batch_size", 1024, r"ot.max_batch_size"),
    ("log__progress_every", -1, r"log.progress_every=-1: must be an integer >= 0"),
    ("log__progress_seconds", -1.0, r"log.progress_seconds=-1.0: must be >= 0"),
])
def test_bad_config_values_are_refused_before_work(tmp_path, field, value, match):
  config = _tiny_config(**{field: value})
  with pytest.raises(pipeline.PipelineError, match=match):
    pipeline.run(config, tmp_path / "w", log=_quiet([]))
  assert not (tmp_path / "w").exists()


def test_log_fields_enter_no_stage_key():
  config = _tiny_config()
  changed = _tiny_config(log__tensorboard=False, log__progress=False, log__progress_every=3,
                         log__progress_seconds=0.0)
  assert config_lib.stage_keys(changed) == config_lib.stage_keys(config)
  assert set(config_lib.LOG_FIELDS) == {k for k in config_lib.flatten(config_lib.as_plain(config))
                                        if k.startswith("log.")}
  for stage in config_lib.STAGES:
    assert not any(k.startswith("log.") for k in config_lib.stage_fields(config, stage)), stage


def test_too_few_samples_for_knn_metric_is_refused(tmp_path):
  config = _tiny_config(eval__metrics=("mode_coverage", "prdc"), sample__num_samples=5, eval__k=5)
  with pytest.raises(pipeline.PipelineError, match="needs at least 6 samples"):
    pipeline.run(config, tmp_path / "w", log=_quiet([]))


def test_end_to_end_then_rerun_skips_every_stage(tmp_path, finished):
  workdir = tmp_path / "run"
  lines = []
  config = _tiny_config(sample__methods=("exact", "gaussian", "ott_semidiscrete"), log__progress=True,
                        log__progress_seconds=0.0)
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

  assert "ot: not converged" in " ".join(lines) and "did not converge" in md  # 40 steps are not enough
  # The progress callback's lines (every solver.callback_every = 10 steps) and the same fit as without it.
  matches = (re.match(r"ot: step (\d+)/40 energy=\S+ l1=\S+ lr=", line) for line in lines)
  shown = [int(m.group(1)) for m in matches if m]
  assert shown == [10, 20, 30, 40]
  assert history == json.loads((finished[1] / "ot/history.json").read_text())
  # TensorBoard: the solver's per-step histories, the final errors and metrics, a grid per method.
  scalars = tracking.read_scalars(workdir / "tensorboard")
  assert [step for step, _ in scalars["ot/l1"]] == list(range(1, 41))
  np.testing.assert_allclose([v for _, v in scalars["ot/l1"]], history["errors"], rtol=1e-6)
  np.testing.assert_allclose([v for _, v in scalars["ot/energy"]], history["losses"], rtol=1e-6)
  assert scalars["ot/final/l1"] == [(40, pytest.approx(history["marginal_l1"], rel=1e-6))]
  assert scalars["final/methods/exact/modes"] == [(0, 8.0)]
  assert sorted(tracking.read_images(workdir / "tensorboard")) == [
      "samples/exact", "samples/gaussian", "samples/ott_semidiscrete"]
  # The figure at a glance, linked after the metrics table.
  assert (workdir / "samples/methods_panel.png").is_file()
  assert md.index("## Metrics") < md.index("## At a glance") < md.index("](samples/methods_panel.png)")
  assert "samples/methods_panel.png" in (workdir / "report.html").read_text()

  lines.clear()
  markers = {s: (workdir / s / "DONE.json").read_bytes() for s in ("ae", "encode", "ot", "sample", "eval")}
  panel = (workdir / "samples/methods_panel.png").stat().st_mtime_ns
  # Other log.* settings rerun nothing.
  config = _tiny_config(sample__methods=("exact", "gaussian", "ott_semidiscrete"), log__tensorboard=False,
                        log__progress_every=3, log__progress_seconds=5.0)
  pipeline.run(config, workdir, log=lines.append)
  assert (workdir / "samples/methods_panel.png").stat().st_mtime_ns == panel
  for stage in ("ae", "encode", "ot", "sample", "eval"):
    assert f"{stage}: already done, skipping" in lines
    assert (workdir / stage / "DONE.json").read_bytes() == markers[stage], stage
  assert not any(line.endswith(": starting") for line in lines)


def _files(workdir, *stages):
  """Every file under the given stage folders, with its bytes."""
  return {str(p.relative_to(workdir)): p.read_bytes() for s in stages for p in (workdir / s).rglob("*")
          if p.is_file()}


def _started(lines):
  return [line.split(":")[0] for line in lines if line.endswith(": starting")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished tiny run: ``(config, workdir)``; tests copy the workdir before changing it."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  config = _tiny_config()
  pipeline.run(config, workdir, log=_quiet([]))
  return config, workdir


def _copy(finished, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  config, workdir = finished
  target = tmp_path / "run"
  shutil.copytree(workdir, target)
  return config, target


def test_a_sample_field_change_reruns_sample_eval_and_report_only(finished, tmp_path):
  config, workdir = _copy(finished, tmp_path)
  before = _files(workdir, "ae", "encode", "ot")
  old_keys = {s: json.loads((workdir / s / "DONE.json").read_text())["key"] for s in ("sample", "eval")}
  old_metrics = (workdir / "metrics.json").read_bytes()
  changed = _tiny_config(sample__num_samples=300)
  lines = []
  metrics = pipeline.run(changed, workdir, log=lines.append)
  assert _started(lines) == ["sample", "eval"]
  for stage in ("ae", "encode", "ot"):
    assert f"{stage}: already done, skipping" in lines
  assert _files(workdir, "ae", "encode", "ot") == before  # byte for byte, markers included
  new_keys = {s: json.loads((workdir / s / "DONE.json").read_text())["key"] for s in ("sample", "eval")}
  assert all(new_keys[s] != old_keys[s] for s in new_keys)
  assert metrics["num_samples"] == 300 and metrics["setting"]["keys"]["sample"] == new_keys["sample"]
  # The superseded setting's results are kept, named by their key.
  kept = workdir / "superseded"
  assert (kept / f"sample-{old_keys['sample']}" / "sample" / "DONE.json").is_file()
  assert (kept / f"sample-{old_keys['sample']}" / "samples" / "exact.png").is_file()
  assert (kept / f"eval-{old_keys['eval']}" / "metrics.json").read_bytes() == old_metrics
  md = (workdir / "report.md").read_text()
  assert f"sample key {new_keys['sample']}" in md and "sample.num_samples=300" in md
  assert f"superseded/sample-{old_keys['sample']}" in md
  # The rerun of the new setting skips everything.
  lines.clear()
  pipeline.run(changed, workdir, log=lines.append)
  assert _started(lines) == []


def test_more_methods_draw_only_the_new_ones_and_fewer_reevaluate_only(finished, tmp_path):
  """sample.methods is in no stage key: added methods are drawn and evaluated alone, the others reused byte
  for byte; a shorter list reruns only the eval stage (from its per-method results), and metrics.json lists
  exactly the configured methods each time."""
  config, workdir = _copy(finished, tmp_path)
  upstream = _files(workdir, "ae", "encode", "ot")
  drawn = {k: v for k, v in _files(workdir, "sample/exact", "sample/gaussian", "samples").items()
           if "methods_panel" not in k}
  original = json.loads((workdir / "metrics.json").read_text())["methods"]
  panel_shows = lambda: json.loads((workdir / "samples/methods_panel.json").read_text())["methods"]
  assert panel_shows() == list(config.sample.methods)
  lines = []
  grown = pipeline.run(_tiny_config(sample__methods=("exact", "gaussian", "gmm")), workdir, log=lines.append)
  assert _started(lines) == ["sample", "eval"]
  assert f"sample: exact already drawn, reusing {workdir / 'sample' / 'exact'}" in lines
  assert not any(line.startswith("sample: exact done") for line in lines)
  assert any(line.startswith("sample: gmm done") for line in lines)
  assert _files(workdir, "ae", "encode", "ot") == upstream
  assert {k: v for k, v in _files(workdir, "sample/exact", "sample/gaussian", "samples").items() if k in drawn} == drawn
  assert list(grown["methods"]) == ["exact", "gaussian", "gmm"]
  assert {m: grown["methods"][m] for m in original} == original
  assert not (workdir / "superseded").exists()
  assert json.loads((workdir / "sample" / "DONE.json").read_text())["methods"] == ["exact", "gaussian", "gmm"]
  assert panel_shows() == ["exact", "gaussian", "gmm"]  # the figure at a glance is redrawn with the new method
  lines.clear()
  fewer = pipeline.run(_tiny_config(sample__methods=("exact",)), workdir, log=lines.append)
  assert _started(lines) == ["eval"] and "sample: already done, skipping" in lines
  assert list(fewer["methods"]) == ["exact"] and fewer["methods"]["exact"] == original["exact"]
  assert panel_shows() == ["exact"]
  lines.clear()
  back = pipeline.run(config, workdir, log=lines.append)
  assert _started(lines) == ["eval"]
  assert back["methods"] == original
  lines.clear()
  pipeline.run(config, workdir, log=lines.append)
  assert _started(lines) == []


def test_an_interrupted_sample_stage_reuses_its_committed_draws(finished, tmp_path, monkeypatch):
  """A sample stage stopped after saving its first method's draws leaves no marker; the rerun keeps those
  draws, draws the rest and ends with the draws of an uninterrupted run (launch.py's kill -9 version of this
  is a slow test of test_launch.py)."""
  config, reference = finished
  workdir = tmp_path / "run"
  workdir.mkdir()
  shutil.copy(reference / "config.json", workdir)
  for stage in ("ae", "encode", "ot"):
    shutil.copytree(reference / stage, workdir / stage)
  from lsot_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  original = workdir_lib.Workdir.save_samples

  class Stop(Exception):
    pass

  def save_then_stop(self, samples):
    original(self, samples)
    raise Stop()

  monkeypatch.setattr(workdir_lib.Workdir, "save_samples", save_then_stop)
  with pytest.raises(Stop):
    pipeline.run(config, workdir, log=_quiet([]))
  monkeypatch.setattr(workdir_lib.Workdir, "save_samples", original)
  first = config.sample.methods[0]
  assert not (workdir / "sample" / "DONE.json").exists()
  kept = _files(workdir, f"sample/{first}")
  lines = []
  pipeline.run(config, workdir, log=lines.append)
  assert _started(lines) == ["sample", "eval"]
  assert f"sample: {first} already drawn, reusing {workdir / 'sample' / first}" in lines
  assert _files(workdir, f"sample/{first}") == kept
  ours, theirs = workdir_lib.Workdir(workdir), workdir_lib.Workdir(reference)
  for method in config.sample.methods:
    a, b = ours.load_samples(method).codes, theirs.load_samples(method).codes
    assert a.shape == b.shape and a.tobytes() == b.tobytes(), method
  assert (json.loads((workdir / "metrics.json").read_text())["methods"]
          == json.loads((reference / "metrics.json").read_text())["methods"])


def test_an_eval_field_change_reruns_eval_and_report_only(finished, tmp_path):
  config, workdir = _copy(finished, tmp_path)
  before = _files(workdir, "ae", "encode", "ot", "sample", "samples")
  lines = []
  metrics = pipeline.run(_tiny_config(eval__metrics=("mode_coverage", "sliced_wasserstein")), workdir,
                         log=lines.append)
  assert _started(lines) == ["eval"]
  assert _files(workdir, "ae", "encode", "ot", "sample", "samples") == before
  assert "sliced_wasserstein" in metrics["methods"]["exact"]
  assert len(list((workdir / "superseded").iterdir())) == 1


def test_data_stream_enters_no_stage_key_and_reruns_nothing(finished, tmp_path):
  config, workdir = _copy(finished, tmp_path)
  streamed = _tiny_config(data__stream=True)
  assert config_lib.stage_keys(streamed) == config_lib.stage_keys(config)
  before = _files(workdir, "ae", "encode", "ot", "sample", "eval")
  lines = []
  pipeline.run(streamed, workdir, log=lines.append)
  assert _started(lines) == [] and _files(workdir, "ae", "encode", "ot", "sample", "eval") == before
  # A fresh streamed run of the toy (codes are the points) gives the finished run's codes and metrics.
  metrics = pipeline.run(streamed, tmp_path / "streamed", log=_quiet([]))
  np.testing.assert_array_equal(pipeline.load_encoded_codes(tmp_path / "streamed"),
                                pipeline.load_encoded_codes(workdir))
  assert metrics["methods"] == json.loads((workdir / "metrics.json").read_text())["methods"]


def test_an_upstream_change_of_a_finished_run_refuses_naming_the_field(finished, tmp_path):
  config, workdir = _copy(finished, tmp_path)
  before = _files(workdir, "ae", "encode", "ot", "sample", "eval")
  with pytest.raises(pipeline.ConfigMismatchError, match=r"data.num_train: 200 -> 150.*--overwrite") as info:
    pipeline.run(_tiny_config(data__num_train=150), workdir, log=_quiet([]))
  assert info.value.fields == ("data.num_train",)
  with pytest.raises(pipeline.ConfigMismatchError, match=r"ot.learning_rate: 1.0 -> 0.5"):
    pipeline.run(_tiny_config(ot__learning_rate=0.5), workdir, log=_quiet([]))
  assert _files(workdir, "ae", "encode", "ot", "sample", "eval") == before
  assert not (workdir / "superseded").exists()
  assert json.loads((workdir / "config.json").read_text()) == json.loads(json.dumps(config.to_dict()))


def test_a_workdir_of_the_layout_before_stage_keys_resumes(finished, tmp_path):
  """Markers without keys, spec.json files, the nearest-neighbour grids next to the sample grids: the layout
  written before stage keys. A rerun skips every stage; a sample change reruns only the later stages."""
  config, workdir = _copy(finished, tmp_path)
  for stage in ("ae", "encode", "ot", "sample", "eval"):
    _as_legacy_marker(workdir / stage / "DONE.json")
  (workdir / "ot" / "spec.json").write_text(json.dumps({"dataset": "ring", "solver": "adam"}))
  before = _files(workdir, "ae", "encode", "ot")
  lines = []
  pipeline.run(config, workdir, log=lines.append)
  assert _started(lines) == [] and _files(workdir, "ae", "encode", "ot") == before
  lines.clear()
  pipeline.run(_tiny_config(sample__num_seeds=3), workdir, log=lines.append)
  assert _started(lines) == ["sample", "eval"] and _files(workdir, "ae", "encode", "ot") == before
  assert json.loads((workdir / "metrics.json").read_text())["methods"]["exact"]["num_seeds"] == 3


def test_only_process_0_writes(tmp_path, monkeypatch):
  from lsot_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(workdir_lib.jax, "process_index", lambda: 1)
  wd = workdir_lib.Workdir(tmp_path / "w")
  wd.prepare(_tiny_config(), overwrite=False, log=_quiet([]))
  workdir_lib.write_json(tmp_path / "x.json", {"a": 1})
  wd.mark_done("ae", _tiny_config(), 1.0)
  assert not (tmp_path / "w").exists() and not (tmp_path / "x.json").exists()
  monkeypatch.setattr(workdir_lib.jax, "process_index", lambda: 0)
  wd.prepare(_tiny_config(), overwrite=False, log=_quiet([]))
  wd.mark_done("ae", _tiny_config(), 1.0)
  assert wd.done("ae")["key"] == config_lib.stage_keys(_tiny_config())["ae"]
  monkeypatch.setattr(workdir_lib.jax, "process_index", lambda: 1)
  assert wd.is_done("ae")  # every process reads


def test_a_useless_ot_fit_stops_the_run_with_one_line(tmp_path, capsys):
  workdir = tmp_path / "w"
  config = _tiny_config(ot__learning_rate=1e30)
  with pytest.raises(pipeline.OTFitUseless) as info:
    pipeline.run(config, workdir, log=_quiet([]))
  message = str(info.value)
  assert message.startswith("Stage 'ot': the fit is useless: L1 marginal error") and "\n" not in message
  assert "--config.ot.learning_rate (now 1e+30)" in message and info.value.l1 > 1.5
  assert (workdir / "ae" / "DONE.json").is_file() and (workdir / "encode" / "DONE.json").is_file()
  assert not (workdir / "ot" / "DONE.json").exists() and not (workdir / "sample").exists()
  # From the command line: one line on stderr, exit status 1, no traceback.
  from absl import flags  # pylint: disable=import-outside-toplevel
  from lsot_jax import cli  # pylint: disable=import-outside-toplevel
  flags.FLAGS.unparse_flags()
  try:
    with pytest.raises(SystemExit) as exit_info:
      cli.main(["lsot-jax", "--config", "eight_gaussians:smoke", "--workdir", str(tmp_path / "cli"),
                "--config.ot.learning_rate=1e30", "--config.ot.num_iterations=40",
                "--config.ot.marginal_samples=8192", "--config.data.num_train=200"])
  finally:
    flags.FLAGS.unparse_flags()
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Stage 'ot': the fit is useless" in err and "Traceback" not in err
  # A rerun with a sensible step supersedes the useless fit (kept) and finishes.
  lines = []
  pipeline.run(_tiny_config(), workdir, log=lines.append)
  assert _started(lines) == ["ot", "sample", "eval"]
  assert [p.name.split("-")[0] for p in (workdir / "superseded").iterdir()] == ["ot"]


def test_workdir_with_other_config_is_refused_naming_fields(tmp_path):
  workdir = tmp_path / "run"
  pipeline.run(_tiny_config(), workdir, stage="ae", log=_quiet([]))
  stored = (workdir / "config.json").read_text()
  other = _tiny_config(ot__tol=0.5)
  other.seed = 3
  with pytest.raises(pipeline.ConfigMismatchError) as info:
    pipeline.run(other, workdir, log=_quiet([]))
  # Only the finished ae stage's fields are named: ot.tol belongs to a stage that has not run.
  assert info.value.fields == ("seed",)
  assert "'ae'" in str(info.value) and "seed: 0 -> 3" in str(info.value) and "ot.tol" not in str(info.value)
  assert (workdir / "config.json").read_text() == stored

  lines = []
  pipeline.run(other, workdir, stage="ae", overwrite=True, log=lines.append)
  aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(aside) == 1 and (aside[0] / "config.json").read_text() == stored
  assert (aside[0] / "ae" / "DONE.json").exists()
  assert json.loads((workdir / "config.json").read_text())["seed"] == 3
  assert any(str(aside[0]) in line for line in lines)


def test_a_field_added_after_the_run_matches_only_at_its_default(tmp_path):
  # A workdir written before ae.lr_schedule existed: its config.json lacks the field. The default keeps the
  # old behaviour, so the run continues; a non-default value is a different run.
  workdir = tmp_path / "run"
  pipeline.run(_tiny_config(), workdir, stage="ae", log=_quiet([]))
  stored = json.loads((workdir / "config.json").read_text())
  del stored["ae"]["lr_schedule"]
  (workdir / "config.json").write_text(json.dumps(stored))
  _as_legacy_marker(workdir / "ae" / "DONE.json")
  lines = []
  pipeline.run(_tiny_config(), workdir, stage="ae", log=lines.append)
  assert "ae: already done, skipping" in lines
  assert json.loads((workdir / "config.json").read_text())["ae"]["lr_schedule"] == "constant"  # now recorded
  with pytest.raises(pipeline.ConfigMismatchError, match=r"ae.lr_schedule: 'constant' -> 'cosine'"):
    pipeline.run(_tiny_config(ae__lr_schedule="cosine"), workdir, log=_quiet([]))


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
  with pytest.raises(pipeline.ConfigMismatchError, match=r"ae.latent_dim: 2 -> 3"):
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


def _newton_config(**overrides):
  c = _tiny_config(ot__solver="newton", **overrides)
  c.ot.newton.min_samples = 1 << 13
  c.ot.newton.max_samples = 1 << 15
  return c


def test_newton_ot_stage_reports_unbiased_error_and_resumes_identically(tmp_path, monkeypatch):
  """The Newton OT stage: history and metrics carry the unbiased chi^2 and its L1 bound; a run interrupted
  after its first checkpointed step resumes to the same heights as an uninterrupted one."""
  config = _newton_config()
  metrics = pipeline.run(config, tmp_path / "a", log=_quiet([]))
  ot = metrics["ot"]
  assert ot["solver"] == "newton"
  assert ot["marginal_l1"] <= ot["marginal_l1_bound"] + 3 * ot["marginal_noise_floor"]
  assert ot["marginal_l1"] < 2.5 * ot["marginal_noise_floor"], ot
  history = json.loads((tmp_path / "a" / "ot" / "history.json").read_text())
  assert history["solver"] == "newton" and len(history["chi2"]) == ot["iterations"]
  assert np.isfinite(history["error_bound"]) and np.nanmax(history["alphas"]) >= 0.5  # Newton steps were taken
  # The default averaging stage ran: its iterates on 2^13-point samples total max_samples.
  assert history["num_averaged"] == 4 and history["effective_sample_size"] == 1 << 15, history
  assert json.loads((tmp_path / "a" / "ot" / "DONE.json").read_text())["fields"]["ot.solver"] == "newton"

  from lsot_jax import checkpoint  # pylint: disable=import-outside-toplevel
  original = checkpoint.StageCheckpointer.save

  class Stop(Exception):
    pass

  def save_then_stop(self, step, *args, **kwargs):
    original(self, step, *args, **kwargs)
    if "ot" in str(self.directory) and step >= 3:
      raise Stop()

  monkeypatch.setattr(checkpoint.StageCheckpointer, "save", save_then_stop)
  with pytest.raises(Stop):
    pipeline.run(config, tmp_path / "b", log=_quiet([]))
  monkeypatch.setattr(checkpoint.StageCheckpointer, "save", original)
  lines = []
  resumed = pipeline.run(config, tmp_path / "b", log=lines.append)
  assert "ot: resuming from solver step 3" in lines
  np.testing.assert_array_equal(np.asarray(pipeline.load_potential(config, tmp_path / "b").h),
                                np.asarray(pipeline.load_potential(config, tmp_path / "a").h))
  assert resumed["ot"]["iterations"] == ot["iterations"]


def _saved_state(workdir):
  """The raw tree (nested dicts, read by Orbax without a target) of the newest ot checkpoint, and its step."""
  folder = workdir / "ot" / "ckpt"
  step = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # no sharding given: Orbax reads it from the checkpoint
    return ocp.PyTreeCheckpointer().restore(folder / str(step) / "state"), step


def test_ot_checkpoints_hold_the_adam_state_under_field_names(finished):
  """One key per field of the state, the optimiser moments under their names (Newton's: the test below)."""
  config, workdir = finished
  raw, step = _saved_state(workdir)
  assert set(raw) == {f.name for f in dataclasses.fields(solver_lib.SolverState)}
  assert set(raw["opt_state"]) == {"count", "mu", "nu"}
  assert int(raw["it"]) == step == json.loads((workdir / "metrics.json").read_text())["ot"]["iterations"]
  np.testing.assert_array_equal(raw["h"], np.asarray(pipeline.load_potential(config, workdir).h))


# Workdirs written by commit 6bc4c27 (ot checkpoints without named keys: the Adam state by leaf position
# ``leaf_000`` ..., the Newton state by field name), each stopped inside its ot stage: the tiny ring run on
# 64 codes, with Adam after its step-10 checkpoint, and with Newton (Hessian buffers shrunk to keep the file
# small: hessian_samples_per_cell 2, top_k 2, batch_size 256) after step 1; ``expected_h.npz`` holds the
# heights that version fitted to each config uninterrupted.
OLD_WORKDIRS = pathlib.Path(__file__).resolve().parent / "data" / "ot_workdirs_6bc4c27.tar.gz"


@pytest.fixture(scope="module")
def old_workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("old_workdirs")
  with tarfile.open(OLD_WORKDIRS) as tar:
    tar.extractall(root, filter="data")
  return root


@pytest.mark.parametrize("name,step,state_class", [("adam_ot_step10", 10, solver_lib.SolverState),
                                                    ("newton_ot_step1", 1, newton_lib.NewtonState)])
def test_a_workdir_written_before_named_checkpoint_keys_resumes(old_workdirs, tmp_path, name, step, state_class):
  """The interrupted ot stage resumes from the old checkpoint to the heights that version fitted uninterrupted,
  and saves its own steps under the state's field names."""
  workdir = tmp_path / "old"
  shutil.copytree(old_workdirs / name, workdir)
  config = config_lib.config_from_dict(json.loads((workdir / "config.json").read_text()))
  lines = []
  pipeline.run(config, workdir, stage="ot", log=lines.append)
  assert f"ot: resuming from solver step {step}" in lines
  expected = np.load(old_workdirs / "expected_h.npz")[name.split("_")[0]]
  # Equal on the machine that wrote the file; the tolerance admits another CPU's float rounding.
  np.testing.assert_allclose(np.asarray(pipeline.load_potential(config, workdir).h), expected, rtol=0, atol=1e-4)
  raw, _ = _saved_state(workdir)
  assert set(raw) == {f.name for f in dataclasses.fields(state_class)}


def test_ot_stage_without_solver_in_its_spec_was_fitted_by_adam(tmp_path):
  """A workdir whose OT stage predates ``ot.solver`` keeps its Adam potential; asking for Newton there is
  refused naming the field."""
  config = _tiny_config()
  pipeline.run(config, tmp_path / "w", stage="ae", log=_quiet([]))
  pipeline.run(config, tmp_path / "w", stage="encode", log=_quiet([]))
  pipeline.run(config, tmp_path / "w", stage="ot", log=_quiet([]))
  for stage in ("ae", "encode", "ot"):
    _as_legacy_marker(tmp_path / "w" / stage / "DONE.json")
  stored_path = tmp_path / "w" / "config.json"
  stored = json.loads(stored_path.read_text())
  del stored["ot"]["solver"], stored["ot"]["newton"]  # as written before the fields existed
  stored_path.write_text(json.dumps(stored))
  h = np.asarray(pipeline.load_potential(config, tmp_path / "w").h)
  assert np.isfinite(h).all()
  with pytest.raises(pipeline.ConfigMismatchError, match=r"ot.solver: 'adam' -> 'newton'"):
    pipeline.run(_tiny_config(ot__solver="newton"), tmp_path / "w", stage="ot", log=_quiet([]))


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


@pytest.mark.parametrize("field", ["ot__num_devices", "ae__num_devices"])
def test_more_devices_than_available_are_refused_before_work(tmp_path, field):
  config = _tiny_config(ae__kind="mlp", ae__widths=(8,), **{field: 2})
  with pytest.raises(pipeline.PipelineError, match=field.replace("__", ".")):
    pipeline.run(config, tmp_path / "w", log=_quiet([]))
  assert not (tmp_path / "w").exists()
  with pytest.raises(pipeline.PipelineError, match=r"num_devices=-1.*>= 0"):
    pipeline.run(_tiny_config(**{field: -1}), tmp_path / "w", log=_quiet([]))


# ---------------------------------------------------------------------------------------------------------
# Scans.


@pytest.mark.parametrize("spec,match", [
    ("ae.latent_dim=2,4", r"Cannot scan 'ae.latent_dim'.*ot.learning_rate"),
    ("ae.bogus=1", r"Cannot scan 'ae.bogus'.*ae.learning_rate, ae.weight_decay, ae.code_penalty, ae.epochs"),
    ("ae.learning_rate=1e-3,3e-3", r"Cannot scan ae.learning_rate with ae.kind='identity'.*ae.kind=mlp"),
    ("ot.num_codes=10,20", r"Cannot scan 'ot.num_codes'"),
    ("ot.bogus=1,2", r"Cannot scan 'ot.bogus'"),
    ("ot.learning_rate", r"Bad --scan.*field=v1"),
    ("seed=1,1", r"Bad --scan.*repeats"),
    ("ot.batch_size=1e3", r"--scan ot.batch_size: value 1000.0 has the wrong type"),
    ("ot.max_batch_size=1024,4096", r"--scan setting \{'ot.max_batch_size': 1024\}.*ot.max_batch_size=1024: Need 1 <= batch_size <= max_batch_size"),
])
def test_bad_scan_specs_are_refused_before_work(tmp_path, spec, match):
  with pytest.raises(pipeline.PipelineError, match=match):
    pipeline.run_scan(_tiny_config(), tmp_path / "w", [spec], log=_quiet([]))
  assert not (tmp_path / "w").exists()


@pytest.mark.slow  # 29 s; test_scan.py checks the engine, test_ae_scan_static_groups_and_a_diverged_setting run_scan
def test_scan_reproduces_the_ot_stage_and_leaves_the_run_alone(tmp_path):
  workdir = tmp_path / "run"
  config = _tiny_config(sample__num_seeds=1)
  lr = float(config.ot.learning_rate)  # The config's own setting comes first.
  lines = []
  res = pipeline.run_scan(config, workdir, [f"ot.learning_rate={lr},{lr / 6}", "seed=0,4"], log=lines.append)
  assert res.num_calls == 1 and [(r["ot.learning_rate"], r["seed"]) for r in res.rows] == [
      (lr, 0), (lr, 4), (lr / 6, 0), (lr / 6, 4)]
  for name in ("csv", "md", "png"):
    assert res.files[name] == str(workdir / "scan" / f"scan.{name}") and (workdir / "scan" / f"scan.{name}").is_file()
  # The scan ran ae/encode as stages, not ot: a normal run afterwards continues from them.
  assert (workdir / "encode" / "DONE.json").exists() and not (workdir / "ot").exists()
  stored = (workdir / "config.json").read_text()
  lines.clear()
  metrics = pipeline.run(config, workdir, log=lines.append)
  assert "ae: already done, skipping" in lines and "encode: already done, skipping" in lines
  assert "ot: starting" in lines and (workdir / "config.json").read_text() == stored
  # The config's own setting (its learning rate, seed 0), fitted in one vmapped call, equals the ot stage's chunked,
  # checkpointed fit; its marginal error and exact-sample quality equal the ot and eval stages' (one seed).
  # Tolerances: vmapped and plain matmuls may round differently, and the ring's thin cells (std 0.01) turn
  # that into a few near-tied samples assigned the other way, which the Monte-Carlo solve carries on
  # (measured: heights within 4e-5 to 3e-4 depending on the solver version, 5-15 % of the distance to the
  # fit with another seed; final L1 within 0.014 of 8192 samples).
  own = res.rows[0]
  h_ot = np.asarray(pipeline.load_potential(config, workdir).h)
  own_gap, other_seed_gap = np.abs(res.h[0] - h_ot).max(), np.abs(res.h[1] - h_ot).max()
  assert own_gap < 1e-3 and own_gap < 0.3 * other_seed_gap, (own_gap, other_seed_gap)
  assert own["l1"] == pytest.approx(metrics["ot"]["marginal_l1"], abs=0.02)
  assert own["noise_floor"] == pytest.approx(metrics["ot"]["marginal_noise_floor"], rel=1e-5)
  exact = metrics["methods"]["exact"]
  assert own["modes"] == exact["modes"] == 8
  assert own["high_quality"] == pytest.approx(exact["high_quality"], abs=0.011)  # 2 of 200 samples
  assert own["reverse_kl"] == pytest.approx(exact["reverse_kl"], abs=0.005)
  assert not np.allclose(res.h[0], res.h[2], atol=1e-2)  # the learning rates do differ
  assert all(row["latent_sw2"] > 0 for row in res.rows)


def _ae_scan_config(**overrides):
  """The tiny ring config with an mlp autoencoder that learns the ring in 40 epochs of 4 steps."""
  return _tiny_config(**{"ae__kind": "mlp", "ae__widths": (32,), "ae__epochs": 40, "ae__batch_size": 50,
                         "ae__learning_rate": 1e-2, "ae__checkpoint_every": 1000, "sample__num_seeds": 1,
                         **overrides})


@pytest.mark.parametrize("spec,match", [
    ("ae.latent_dim=2,4", r"Cannot scan 'ae.latent_dim'.*ae.learning_rate.*architecture"),
    ("ae.epochs=1.5", r"--scan ae.epochs: value 1.5 has the wrong type"),
    ("ae.learning_rate=0,1e-3", r"--scan setting \{'ae.learning_rate': 0, 'seed': 0\}.*learning_rate must be positive"),
    ("ae.weight_decay=-1", r"--scan setting \{'ae.weight_decay': -1, 'seed': 0\}.*weight_decay.*must be >= 0"),
    ("ae.lr_schedule=constant,linear", r"--scan setting \{'ae.lr_schedule': 'linear', 'seed': 0\}.*ae.lr_schedule='linear': lr_schedule must be one of \('constant', 'cosine'\)"),
])
def test_bad_ae_scan_specs_are_refused_before_work(tmp_path, spec, match):
  with pytest.raises(pipeline.PipelineError, match=match):
    pipeline.run_scan(_ae_scan_config(), tmp_path / "w", [spec, "seed=0,1"], log=_quiet([]))
  assert not (tmp_path / "w").exists()


def test_ae_scan_too_large_for_the_memory_is_refused_before_training(tmp_path, monkeypatch):
  monkeypatch.setattr(scans, "memory_bytes", lambda: 1000)
  with pytest.raises(pipeline.PipelineError, match=r"4 autoencoders of \d+ parameters would train at once"):
    pipeline.run_scan(_ae_scan_config(), tmp_path / "w", ["ae.learning_rate=1e-2,3e-3", "seed=0,1"],
                      log=_quiet([]))
  assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["config.json"]


@pytest.mark.slow  # 67 s; test_ae_scan_static_groups_and_a_diverged_setting runs an AE scan in the default suite
def test_ae_scan_rows_equal_per_setting_runs_and_leave_the_stages_alone(tmp_path):
  """ae.learning_rate x seed x ot.learning_rate: 4 autoencoders in one vmapped training, 8 potentials fitted
  to their own codes in one vmapped call. The config's own autoencoder comes LAST in the scan, so its rows
  only match the OT-only scan of a workdir whose ae stage trained it (ae summary, heights, OT statistics,
  decoded-sample quality) if every setting is fitted on its own codes; the first autoencoder's loss must
  match train_autoencoder with its seed and learning rate."""
  config = _ae_scan_config()
  lr, olr = float(config.ae.learning_rate), float(config.ot.learning_rate)
  ot_spec = f"ot.learning_rate={olr},{olr / 6}"
  workdir = tmp_path / "run"
  ref = pipeline.run_scan(config, workdir, [ot_spec], log=_quiet([]))  # runs the ae and encode stages
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and "scan" not in p.parts}
  res = pipeline.run_scan(config, workdir, [f"ae.learning_rate={lr / 3},{lr}", "seed=1,0", ot_spec],
                          log=_quiet([]))
  assert res.num_ae_calls == 1 and res.num_calls == 1 and len(res.rows) == 8
  assert [(r["ae.learning_rate"], r["seed"], r["ot.learning_rate"]) for r in res.rows][-3:] == [
      (lr, 1, olr / 6), (lr, 0, olr), (lr, 0, olr / 6)]
  # The scan trained in memory: the workdir's stages (ae checkpoint included) are untouched.
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and "scan" not in p.parts} == before
  assert not (workdir / "ot").exists()
  md = (workdir / "scan" / "scan.md").read_text().splitlines()
  assert md[0].startswith("| ae.learning_rate | seed | ot.learning_rate | ae_loss | ae_test_mse") and len(md) == 10
  assert (workdir / "scan" / "scan.png").is_file() and (workdir / "scan" / "scan.csv").is_file()
  assert all(r["ae_diverged"] is False and r["iterations"] == 40 for r in res.rows)
  summary = json.loads((workdir / "ae" / "DONE.json").read_text())["summary"]
  # The ae stage's training losses went to TensorBoard: every step's loss, each epoch's mean.
  scalars = tracking.read_scalars(workdir / "tensorboard")
  assert [step for step, _ in scalars["autoencoder/loss"]] == list(range(1, 161))  # 40 epochs of 4 steps
  assert scalars["autoencoder/epoch_loss"][-1] == (160, pytest.approx(summary["final_train_loss"], rel=1e-6))
  for i, j in ((6, 0), (7, 1)):
    row, ref_row = res.rows[i], ref.rows[j]
    assert row["ot.learning_rate"] == ref_row["ot.learning_rate"]
    assert row["ae_loss"] == pytest.approx(summary["final_train_loss"], rel=1e-5)
    assert row["ae_test_mse"] == pytest.approx(summary["test_mse"], rel=1e-4)
    # The vmapped and the one-setting trainings and fits round differently: heights within 5e-4 here
    # (measured; other settings' heights are 0.09 to 0.18 away). The 40-step fit is far from converged
    # and the ring's codes make thin cells, so its L1 moves by up to 0.05 with such height changes
    # (measured; an OT-only scan of the same codes reproduces it exactly); the heights are the sharp check.
    assert np.abs(res.h[i] - ref.h[j]).max() < 2e-3
    assert row["l1"] == pytest.approx(ref_row["l1"], abs=0.1)
    assert row["noise_floor"] == pytest.approx(ref_row["noise_floor"], rel=1e-5)
    assert row["modes"] == ref_row["modes"] == 8
    assert row["high_quality"] == pytest.approx(ref_row["high_quality"], abs=0.011)  # 2 of 200 samples
    assert row["reverse_kl"] == pytest.approx(ref_row["reverse_kl"], abs=0.005)
  assert min(np.abs(res.h[i] - res.h[6]).max() for i in (0, 2, 4)) > 0.05  # other codes, other heights
  x = data_lib.load_dataset("ring", "train", num_examples=200, seed=0).x
  model_cfg = models.AutoencoderConfig(kind="mlp", latent_dim=2, input_shape=(2,), widths=(32,))
  _, _, history = train.train_autoencoder(x, model_cfg, str(tmp_path / "first"), seed=1, epochs=40,
                                          batch_size=50, learning_rate=lr / 3, progress=False)
  assert res.rows[0]["ae_loss"] == pytest.approx(history[-1]["loss"], rel=1e-5)
  assert res.rows[0]["ae_loss"] != pytest.approx(res.rows[6]["ae_loss"], rel=1e-2)


@pytest.mark.slow
def test_ae_scan_static_groups_and_a_diverged_setting(tmp_path):
  """ae.epochs is static (one training per value); a diverging learning rate marks its rows only."""
  config = _ae_scan_config(ae__epochs=2)
  res = pipeline.run_scan(config, tmp_path / "w", ["ae.epochs=1,2", "ae.learning_rate=1e-2,1e30"],
                          log=_quiet([]))
  assert res.num_ae_calls == 2 and res.num_calls == 1 and len(res.rows) == 4
  for row, h in zip(res.rows, res.h):
    diverged = row["ae.learning_rate"] == 1e30
    assert row["ae_diverged"] is diverged
    assert np.isnan([row["l1"], row["modes"], row["ae_loss"]]).all() == diverged
    assert np.isnan(h).all() == diverged
  assert res.rows[0]["ae_loss"] > res.rows[2]["ae_loss"]  # two epochs train further than one
  assert "ae_diverged" in (tmp_path / "w" / "scan" / "scan.csv").read_text().splitlines()[0]


# ---------------------------------------------------------------------------------------------------------
# Sharded OT stage on 4 devices (a subprocess: the device count is fixed when JAX starts).

_SHARDED_CHILD = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    import numpy as np
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from lsot_jax import checkpoint, pipeline

    root = sys.argv[1]
    assert len(jax.devices()) == 4, jax.devices()

    def config(num_devices):
      c = pipeline.default_config()
      c.ot.solver = "adam"
      c.data.num_train = 203  # uneven: padded to 204 = 4 x 51
      c.data.num_test = 200
      c.ot.num_iterations = 30
      c.ot.window = 5
      c.ot.batch_size = 2048
      c.ot.max_batch_size = 4096
      c.ot.checkpoint_every = 10
      c.ot.marginal_samples = 8192
      c.ot.num_devices = num_devices
      return c

    def fit(name, num_devices, log):
      for stage in ("ae", "encode", "ot"):
        pipeline.run(config(num_devices), os.path.join(root, name), stage=stage, log=log)
      summary = json.load(open(os.path.join(root, name, "ot", "DONE.json")))["summary"]
      return np.asarray(pipeline.load_potential(config(num_devices), os.path.join(root, name)).h), summary

    out = {}
    lines = []
    out["h1"], out["s1"] = fit("one", 1, lines.append)
    out["h4"], out["s4"] = fit("four", 4, lines.append)
    out["log4"] = [l for l in lines if "sharded" in l]

    # Interrupt a 4-device run after its first checkpoint, resume it on 1 device (then 0 = all 4 devices).
    original = checkpoint.StageCheckpointer.save
    class Stop(Exception):
      pass
    def save_then_stop(self, step, *args, **kwargs):
      original(self, step, *args, **kwargs)
      if "ot" in str(self.directory) and step >= 10:
        raise Stop()
    checkpoint.StageCheckpointer.save = save_then_stop
    try:
      fit("resumed", 4, lines.append)
      raise AssertionError("not interrupted")
    except Stop:
      pass
    checkpoint.StageCheckpointer.save = original
    lines.clear()
    pipeline.run(config(1), os.path.join(root, "resumed"), stage="ot", log=lines.append)
    out["resume_log"] = lines[:3]
    out["h_resumed"], out["s_resumed"] = fit("resumed", 0, lines.append)

    # Data-parallel autoencoder training (ae.num_devices).
    def ae_config(num_devices, batch_size=64):
      c = config(1)
      c.data.num_train = 256
      c.ae.kind, c.ae.widths, c.ae.epochs, c.ae.batch_size = "mlp", (16,), 2, batch_size
      c.ae.num_devices = num_devices
      return c
    out["ae"] = {}
    for num_devices in (1, 4):
      lines.clear()
      pipeline.run(ae_config(num_devices), os.path.join(root, f"ae{num_devices}"), stage="ae", log=lines.append)
      out["ae"][num_devices] = json.load(open(os.path.join(root, f"ae{num_devices}", "ae", "DONE.json")))["summary"]
      out["ae"][f"log{num_devices}"] = [l for l in lines if "parallel" in l]
    try:
      pipeline.run(ae_config(4, batch_size=66), os.path.join(root, "ae_bad"), stage="ae", log=lines.append)
    except pipeline.PipelineError as e:
      out["ae"]["bad_batch"] = [str(e), os.path.exists(os.path.join(root, "ae_bad"))]
    print("RESULTS " + json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()}))
""")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  root = tmp_path_factory.mktemp("sharded")
  script = root / "child.py"
  script.write_text(_SHARDED_CHILD)
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=600,
                        env=env, cwd=pathlib.Path(__file__).resolve().parents[1], check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
  assert proc.returncode == 0 and lines, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return {k: (np.asarray(v) if k.startswith("h") else v) for k, v in json.loads(lines[-1][8:]).items()}


# Tolerances. The runs use the default kernel tiling (one tile on one device, one per shard on four). The
# kernel's tie rule is global (lowest index within the band of the global max, lsot_jax.kernels), so both runs
# assign alike up to the summation order of the collectives. The bounds date from when ties broke per tile
# and a few near-tied samples per step flipped (measured then: heights within 7e-5, their spread ~0.05, one
# Adam step moves them by up to ~0.3, so a lost or misplaced state shows at 1e-2 or more; final L1 errors
# within 0.004, noise floor 0.125); they are a few times those.
_H_ATOL, _L1_ATOL = 5e-4, 0.02


def test_sharded_ot_stage_equals_one_device_with_uneven_n(sharded):
  assert sharded["log4"] == ["ot: 203 codes sharded over 4 devices (51 per device)"]
  assert sharded["h4"].shape == sharded["h1"].shape == (203,)
  np.testing.assert_allclose(sharded["h4"], sharded["h1"], atol=_H_ATOL)
  assert sharded["s4"]["iterations"] == sharded["s1"]["iterations"] == 30
  assert sharded["s4"]["marginal_l1"] == pytest.approx(sharded["s1"]["marginal_l1"], abs=_L1_ATOL)
  assert np.ptp(sharded["h1"]) > 20 * _H_ATOL  # the comparison is not trivially within tolerance


def test_sharded_ot_checkpoint_resumes_on_another_device_count(sharded):
  assert "ot: resuming from solver step 10" in sharded["resume_log"]
  np.testing.assert_allclose(sharded["h_resumed"], sharded["h1"], atol=_H_ATOL)
  assert sharded["s_resumed"]["marginal_l1"] == pytest.approx(sharded["s1"]["marginal_l1"], abs=_L1_ATOL)


def test_data_parallel_autoencoder_equals_one_device(sharded):
  ae = sharded["ae"]
  assert ae["log4"] == ["ae: training data-parallel on 4 devices"] and ae["log1"] == []
  for name in ("test_mse", "final_train_loss"):
    assert ae["4"][name] == pytest.approx(ae["1"][name], rel=1e-5), name
  message, created = ae["bad_batch"]
  assert "ae.batch_size=66 must be a multiple of the 4 devices" in message and not created
