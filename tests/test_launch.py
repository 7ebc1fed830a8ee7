"""launch.py end to end, as a user runs it (subprocesses): toy and image runs, kill -9 and resume, bad input,
scans, and the multi-host flags (checked without starting a distributed runtime).

All runs share one persistent JAX compilation cache (per test session) so that only the first run of each
program pays for XLA compilation.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from absl import app

from lsot_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
RING = ["--config", "configs/eight_gaussians.py:smoke", "--config.ot.num_iterations=300",
        "--config.ot.checkpoint_every=10"]
FASHION = ["--config", "configs/fashion_mnist.py:smoke", "--config.ae.epochs=20",
           "--config.sample.methods=('exact','extended','gaussian','vae')"]

# Runs launch.py inside tfds.testing.mock_data: random images with the real dataset's features and splits.
_MOCK_LAUNCHER = textwrap.dedent("""
    import functools, sys
    sys.path.insert(0, {repo!r})
    import tensorflow_datasets as tfds
    from absl import app

    class _BoundGetitems(tfds.testing.PickableDataSourceMock):
      # tfds 4.9.10 installs __getitems__ as an unbound partial; bind it to the mock.
      def __setattr__(self, name, value):
        if name == "__getitems__" and isinstance(value, functools.partial):
          value = functools.partial(value, self)
        super().__setattr__(name, value)

    import launch
    with tfds.testing.mock_data(num_examples=256, policy=tfds.testing.MockPolicy.USE_CODE,
                                mock_array_record_data_source=_BoundGetitems()):
      sys.argv = ["launch.py"] + sys.argv[1:]
      app.run(launch.main)
""")


@pytest.fixture(scope="module")
def env():
  """The children's environment: the suite's compilation cache (tests/conftest.py), quiet TensorFlow logs."""
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def mock_launcher(tmp_path_factory):
  path = tmp_path_factory.mktemp("mock") / "mock_launch.py"
  path.write_text(_MOCK_LAUNCHER.format(repo=str(REPO)))
  return str(path)


def _cmd(args, launcher=None):
  return [sys.executable, launcher or str(REPO / "launch.py")] + list(args)


def _launch(args, env, launcher=None, timeout=300):
  return subprocess.run(_cmd(args, launcher), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _metrics(workdir):
  return json.loads((pathlib.Path(workdir) / "metrics.json").read_text())


def _kill_after_first_checkpoint(args, env, ckpt_dir, done_marker, log_path, launcher=None):
  """Starts a run, SIGKILLs it once ``ckpt_dir`` holds a committed step, and checks the stage was unfinished."""
  with open(log_path, "w") as log:
    proc = subprocess.Popen(_cmd(args, launcher), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 240
  try:
    while not (ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
      assert proc.poll() is None, f"run ended before its first checkpoint:\n{log_path.read_text()}"
      assert time.monotonic() < deadline, "no checkpoint appeared"
      time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not done_marker.exists(), "the stage finished before the kill; the test did not interrupt it"


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp("ring") / "run"
  result = _launch(RING + ["--workdir", str(workdir)], env)
  assert result.returncode == 0, result.stdout + result.stderr
  return workdir, result


def test_toy_end_to_end(ring_run):
  workdir, result = ring_run
  metrics = _metrics(workdir)
  assert list(metrics["methods"]) == ["exact", "extended", "soft", "gaussian"]
  # Exact samples are training points of the 8-mode ring; one Gaussian fitted to a ring misses the modes.
  assert metrics["methods"]["exact"]["modes"] == 8
  assert metrics["methods"]["gaussian"]["high_quality"] < 0.2
  for rel in ("report.md", "report.html", "ot/convergence.png", "samples/exact.png", "samples/extended.png"):
    assert (workdir / rel).is_file(), rel
  assert "Traceback" not in result.stderr
  assert f"report: {workdir}/report.md" in result.stdout


def test_toy_rerun_skips_finished_stages(ring_run, env):
  workdir, _ = ring_run
  stages = ("ae", "encode", "ot", "sample", "eval")
  markers = {stage: (workdir / stage / "DONE.json").read_bytes() for stage in stages}
  result = _launch(RING + ["--workdir", str(workdir)], env)
  assert result.returncode == 0, result.stderr
  for stage in stages:
    assert f"{stage}: already done, skipping" in result.stdout
    assert f"{stage}: starting" not in result.stdout
    assert (workdir / stage / "DONE.json").read_bytes() == markers[stage], stage


@pytest.mark.slow  # 70 s on the 2-core Xeon; test_pipeline's interrupted OT and sample stages are the fast ones
def test_kill_during_ot_then_resume_gives_the_same_metrics(ring_run, env, tmp_path):
  reference, _ = ring_run
  workdir = tmp_path / "run"
  args = RING + ["--workdir", str(workdir)]
  _kill_after_first_checkpoint(args, env, workdir / "ot" / "ckpt", workdir / "ot" / "DONE.json",
                               tmp_path / "killed.log")
  result = _launch(args, env)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "ot: resuming from solver step" in result.stdout
  assert _metrics(workdir)["methods"] == _metrics(reference)["methods"]
  assert _metrics(workdir)["ot"]["iterations"] == _metrics(reference)["ot"]["iterations"]


def _sample_files(workdir, method):
  """The bytes of every file of a method's saved draws and of its grid."""
  files = {str(p.relative_to(workdir)): p.read_bytes() for p in (workdir / "sample" / method).rglob("*")
           if p.is_file()}
  return dict(files, grid=(workdir / "samples" / f"{method}.png").read_bytes())


@pytest.mark.slow  # 38 s of CPU on the 2-core Xeon; test_pipeline's interrupted sample stage is the fast one
def test_kill_during_sample_then_resume_gives_identical_samples(ring_run, env, tmp_path):
  """The sample stage commits each method's draws (Orbax, atomically) when the method is done. A run killed
  once the first method's draws are committed leaves no sample marker; the rerun runs no earlier stage, keeps
  those draws untouched, ignores the uncommitted folder a kill inside a save leaves, draws the other methods
  and ends with the uninterrupted run's draws (the same arrays), grids (the same bytes) and metrics."""
  reference, _ = ring_run
  workdir = tmp_path / "run"
  workdir.mkdir()
  shutil.copy(reference / workdir_lib.CONFIG, workdir)
  for stage in ("ae", "encode", "ot"):
    shutil.copytree(reference / stage, workdir / stage)
  args = RING + ["--workdir", str(workdir)]
  _kill_after_first_checkpoint(args, env, workdir / "sample" / "exact", workdir / "sample" / "DONE.json",
                               tmp_path / "killed.log")
  assert "sample: starting" in (tmp_path / "killed.log").read_text()
  kept = _sample_files(workdir, "exact")
  # What a kill inside Orbax's save of the next method leaves: its step folder under a temporary name, with
  # no commit record and a truncated data file.
  partial = workdir / "sample" / "extended" / "0.orbax-checkpoint-tmp-1764547200"
  shutil.rmtree(workdir / "sample" / "extended", ignore_errors=True)
  shutil.copytree(reference / "sample" / "extended" / "0", partial)
  for path in partial.rglob("*"):
    if path.name == "commit_success.txt":
      path.unlink()
    elif path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[:8])
  result = _launch(args, env)
  assert result.returncode == 0, result.stdout + result.stderr
  for stage in ("ae", "encode", "ot"):
    assert f"{stage}: already done, skipping" in result.stdout
  assert "sample: starting" in result.stdout
  assert "sample: exact already drawn, reusing" in result.stdout and "sample: exact done in" not in result.stdout
  for method in ("extended", "soft", "gaussian"):
    assert f"sample: {method} done in" in result.stdout, method
  assert _sample_files(workdir, "exact") == kept
  ours, theirs = workdir_lib.Workdir(workdir), workdir_lib.Workdir(reference)
  for method in _metrics(reference)["methods"]:
    a, b = ours.load_samples(method).codes, theirs.load_samples(method).codes
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), method
    assert (workdir / "samples" / f"{method}.png").read_bytes() == (reference / "samples" /
                                                                    f"{method}.png").read_bytes(), method
  assert _metrics(workdir)["methods"] == _metrics(reference)["methods"]


def test_workdir_with_other_config_is_refused(ring_run, env):
  workdir, _ = ring_run
  result = _launch(RING + ["--workdir", str(workdir), "--config.seed=1", "--config.sample.num_seeds=3"], env)
  assert result.returncode == 1
  assert "different config" in result.stderr and "seed: 0 -> 1" in result.stderr
  # Only the fields of the finished models are named: a sample change alone would be recomputed.
  assert "sample.num_seeds" not in result.stderr and "--overwrite" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, env, mock_launcher):
  workdir = tmp_path_factory.mktemp("fashion") / "run"
  result = _launch(FASHION + ["--workdir", str(workdir)], env, launcher=mock_launcher)
  assert result.returncode == 0, result.stdout + result.stderr
  return workdir


@pytest.mark.slow  # 107 s; TFDS reading is in test_data / test_streaming, the image pipeline in test_runs (digits)
def test_image_end_to_end_on_mock_tfds(image_run):
  metrics = _metrics(image_run)
  assert metrics["dataset"] == "fashion_mnist" and metrics["kind"] == "image"
  assert set(metrics["methods"]) == {"exact", "extended", "gaussian", "vae"}
  assert 0.0 <= metrics["classifier_test_accuracy"] <= 1.0
  for row in metrics["methods"].values():
    for name in ("frechet", "precision", "recall", "density", "coverage", "sinkhorn", "memorisation_rate"):
      assert name in row
  for rel in ("ae/recon.png", "samples/exact.png", "samples/vae.png", "eval/exact_nn.png", "report.html"):
    assert (image_run / rel).is_file(), rel


@pytest.mark.slow
def test_kill_during_autoencoder_training_then_resume_gives_the_same_metrics(image_run, env, mock_launcher,
                                                                            tmp_path):
  workdir = tmp_path / "run"
  args = FASHION + ["--workdir", str(workdir)]
  _kill_after_first_checkpoint(args, env, workdir / "ae" / "ckpt", workdir / "ae" / "DONE.json",
                               tmp_path / "killed.log", launcher=mock_launcher)
  result = _launch(args, env, launcher=mock_launcher)
  assert result.returncode == 0, result.stdout + result.stderr
  assert _metrics(workdir)["methods"] == _metrics(image_run)["methods"]
  assert _metrics(workdir)["ae"]["test_mse"] == _metrics(image_run)["ae"]["test_mse"]


@pytest.mark.parametrize("override,needle", [
    ("--config.ot.bogus=1", "bogus"),
    ("--config.ot.num_iterations=many", "num_iterations"),
])
def test_unknown_or_mistyped_config_field_fails_before_work(env, tmp_path, override, needle):
  start = time.monotonic()
  result = _launch(RING + ["--workdir", str(tmp_path / "w"), override], env)
  assert result.returncode == 1
  assert needle in result.stderr and "error:" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w").exists()
  assert time.monotonic() - start < 60


@pytest.mark.parametrize("config,command", [
    ("configs/fashion_mnist.py:smoke", "tfds build fashion_mnist --file_format=array_record --data_dir=DIR"),
    ("configs/mnist.py:smoke", "--config.data.data_dir=DIR"),
])
def test_missing_data_fails_fast_with_the_prepare_command(env, tmp_path, config, command):
  empty = tmp_path / "no_data"
  empty.mkdir()
  start = time.monotonic()
  result = _launch(["--config", config, "--workdir", str(tmp_path / "w"),
                    f"--config.data.data_dir={empty}"], env)
  assert result.returncode == 1
  assert "launch.py: error:" in result.stderr and command in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w").exists()
  assert time.monotonic() - start < 60


# ---------------------------------------------------------------------------------------------------------
# Scans.


@pytest.mark.slow
def test_scan_from_the_command_line(env, tmp_path):
  workdir = tmp_path / "scan_run"
  result = _launch(["--config", "configs/eight_gaussians.py:smoke", "--workdir", str(workdir),
                    "--config.ot.num_iterations=20", "--config.ot.marginal_samples=16384",
                    "--scan", "ot.learning_rate=0.1,0.3", "--scan", "seed=0,1", "--num_processes=1"], env)
  assert result.returncode == 0, result.stdout + result.stderr
  table = [l for l in result.stdout.splitlines() if l.startswith("|")]
  assert table[0].startswith("| ot.learning_rate | seed | l1 |") and "| modes |" in table[0]
  assert [l.split(" | ")[:2] for l in table[2:]] == [["| 0.1", "0"], ["| 0.1", "1"], ["| 0.3", "0"],
                                                      ["| 0.3", "1"]]
  for name in ("scan.csv", "scan.md", "scan.png"):
    assert (workdir / "scan" / name).is_file(), name
  assert (workdir / "encode" / "DONE.json").exists() and not (workdir / "ot").exists()


@pytest.mark.parametrize("args,needle", [
    (["--scan", "ae.latent_dim=2,4"], "launch.py: error: Cannot scan 'ae.latent_dim'"),
    (["--scan", "seed=0,1", "--stage", "ot"], "drop --stage"),
    (["--num_processes=2", "--process_id=2", "--coordinator_address=localhost:1"], "--process_id must be in [0, 2)"),
])
def test_bad_scan_or_multi_host_flags_fail_before_work(env, tmp_path, args, needle):
  result = _launch(RING + ["--workdir", str(tmp_path / "w")] + args, env)
  assert result.returncode == 1
  assert needle in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------------------
# Multi-host flags.

# Replaces jax.distributed.initialize by a probe that reports its arguments and whether any JAX backend was
# already started (it must not be), then fails as an unreachable coordinator would.
_DISTRIBUTED_PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    import jax
    from jax._src import xla_bridge
    from absl import app

    def probe(**kwargs):
      print("INIT " + json.dumps(dict(kwargs, backends_started=xla_bridge.backends_are_initialized())))
      raise RuntimeError("coordinator unreachable")

    jax.distributed.initialize = probe
    import launch
    sys.argv = ["launch.py"] + sys.argv[1:]
    app.run(launch.main)
""")


def test_multi_host_flags_initialize_jax_distributed_before_any_jax_call(env, tmp_path):
  probe = tmp_path / "probe_launch.py"
  probe.write_text(_DISTRIBUTED_PROBE.format(repo=str(REPO)))
  result = _launch(RING + ["--workdir", str(tmp_path / "w"), "--coordinator_address=10.0.0.1:1234",
                           "--num_processes=4", "--process_id=3"], env, launcher=str(probe))
  inits = [json.loads(l[5:]) for l in result.stdout.splitlines() if l.startswith("INIT ")]
  assert inits == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                        local_device_ids=None, backends_started=False)], result.stdout + result.stderr
  assert result.returncode == 1
  assert "jax.distributed.initialize failed" in result.stderr and "coordinator unreachable" in result.stderr
  assert not (tmp_path / "w").exists()


def test_distributed_settings():
  import launch  # pylint: disable=g-import-not-at-top
  settings = launch.distributed_settings
  assert settings(None, None, None) is None
  assert settings(None, 1, 0) is None
  assert settings("h:1", 2, 1) == dict(coordinator_address="h:1", num_processes=2, process_id=1)
  assert settings(None, None, None, auto=True) == dict(coordinator_address=None, num_processes=None,
                                                       process_id=None)
  for args, needle in ((("h:1", 2, 2), r"process_id must be in \[0, 2\)"),
                       (("h:1", 0, None), "num_processes must be >= 1"),
                       ((None, None, -1), "process_id must be >= 0"),
                       (("h:1", 1, 0), "coordinator_address is for several processes"),
                       ((None, 2, 1), "needs all of"),
                       (("h:1", None, None), "needs all of")):
    with pytest.raises(app.UsageError, match=needle):
      settings(*args)
