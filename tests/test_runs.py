"""lsot_jax.load_run (a finished run as a generative model) and ``--stage generate`` of the CLI, on tiny runs:
a ring (identity autoencoder, Adam OT fit) and scikit-learn's digits (MLP autoencoder, Newton OT fit)."""
import pathlib
import re

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

import lsot_jax
from lsot_jax import cli
from lsot_jax import config_files
from lsot_jax import pipeline
from lsot_jax import runs
from lsot_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config():
  """The ring run of tests/test_pipeline.py's ``_tiny_config``: every stage in a few seconds."""
  c = pipeline.default_config()
  c.ot.solver = "adam"
  c.data.num_train = 200
  c.data.num_test = 200
  c.ot.num_iterations = 40
  c.ot.batch_size = 2048
  c.ot.max_batch_size = 2048
  c.ot.checkpoint_every = 10
  c.ot.marginal_samples = 8192
  c.sample.methods = ("exact", "extended")
  c.sample.num_samples = 200
  c.sample.num_seeds = 2
  c.sample.grid_size = 16
  c.eval.metrics = ("mode_coverage",)
  return c


def _snapshot(workdir: pathlib.Path):
  """Every file of the workdir (outside generated/) with its size and modification time."""
  return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob("*")
          if runs.GENERATED_DIR not in p.relative_to(workdir).parts}


def _cli(args):
  """``lsot-jax ARGS`` in-process: the exit status. The flags are reset before and after (absl keeps them
  between in-process calls, e.g. from tests/test_cli.py)."""
  flags.FLAGS.unparse_flags()
  try:
    with pytest.raises(SystemExit) as exit_info:
      cli.main(["lsot-jax"] + [str(a) for a in args])
  finally:
    flags.FLAGS.unparse_flags()
  return exit_info.value.code


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
  """A finished tiny ring run: ``(config, workdir)``."""
  workdir = tmp_path_factory.mktemp("ring") / "runs" / "ring"
  config = _tiny_config()
  pipeline.run(config, workdir, log=lambda line: None)
  return config, workdir


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """The digits smoke run with its ae, encode and ot stages finished: ``(config, workdir)``."""
  workdir = tmp_path_factory.mktemp("digits") / "w"
  config = config_files.load("digits:smoke")
  for stage in ("ae", "encode", "ot"):
    pipeline.run(config, workdir, stage=stage, log=lambda line: None)
  return config, workdir


def test_load_run_restores_config_potential_and_the_sample_stage_draws(ring_run):
  config, workdir = ring_run
  before = _snapshot(workdir)
  run = lsot_jax.load_run(workdir)
  assert pipeline.config_diff(run.config.to_dict(), config.to_dict()) == []
  expected = pipeline.load_potential(config, workdir)
  np.testing.assert_array_equal(np.asarray(run.potential.y), np.asarray(expected.y))
  np.testing.assert_array_equal(np.asarray(run.potential.h), np.asarray(expected.h))

  for method in pipeline.LSOT_METHODS:
    x = run.sample(jax.random.key(0), 50, method=method)
    assert x.shape == (50, 2) and x.dtype == np.float32 and np.isfinite(x).all(), method
  assert run.sample(jax.random.key(0), 7).shape == (7, 2)  # extended by default
  # Exact samples are training codes (the identity autoencoder: codes are the data points).
  y = np.asarray(run.potential.y)
  exact = run.sample(jax.random.key(1), 100, method="exact")
  assert (np.abs(exact[:, None, :] - y[None]).max(axis=-1).min(axis=1) == 0).all()
  np.testing.assert_array_equal(run.decode(y[:5]), y[:5])
  np.testing.assert_array_equal(run.encode(y[:5]), y[:5])
  # The sample stage's seed-1 draws, for the methods it ran, with its keys and settings.
  for method in ("exact", "extended"):
    draws = workdir_lib.Workdir(workdir).load_samples(method).codes
    codes = run.sample_codes(pipeline.sample_key(config, method, 1), config.sample.num_samples, method)
    np.testing.assert_allclose(codes, draws[1], atol=1e-6)
  assert _snapshot(workdir) == before


def test_load_run_names_the_missing_stage_and_generate_refuses(tmp_path, capsys):
  workdir = tmp_path / "w"
  for stage in ("ae", "encode"):
    pipeline.run(_tiny_config(), workdir, stage=stage, log=lambda line: None)
  before = _snapshot(workdir)
  run = lsot_jax.load_run(workdir)
  assert run.decode(np.ones((3, 2))).shape == (3, 2)
  with pytest.raises(pipeline.PipelineError, match=r"no finished 'ot' stage.*--stage ot"):
    run.sample(jax.random.key(0), 4)
  with pytest.raises(pipeline.PipelineError, match="no config.json"):
    lsot_jax.load_run(tmp_path / "nothing")
  assert _cli(["--workdir", workdir, "--stage", "generate", "--num_samples", 4]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("lsot-jax: error: ") and "'ot'" in err, err
  assert _snapshot(workdir) == before and not (workdir / runs.GENERATED_DIR).exists()


def test_a_different_config_is_refused(ring_run):
  config, workdir = ring_run
  other = _tiny_config()
  other.seed = 5
  with pytest.raises(pipeline.ConfigMismatchError, match="seed: 0 -> 5"):
    lsot_jax.load_run(workdir, config=other)


def test_digits_run_decodes_images_and_generate_writes_pngs(digits_run, capsys):
  config, workdir = digits_run
  before = _snapshot(workdir)
  run = lsot_jax.load_run(workdir)
  assert run.is_image
  z = np.zeros((5, config.ae.latent_dim), np.float32)
  images = run.decode(z)
  assert images.shape == (5, 8, 8, 1) and images.min() >= 0.0 and images.max() <= 1.0
  assert run.encode(images).shape == (5, config.ae.latent_dim)
  assert run.sample(jax.random.key(0), 6, method="soft").shape == (6, 8, 8, 1)

  assert _cli(["--workdir", workdir, "--stage", "generate", "--method", "extended", "--num_samples", 12,
               "--sample_seed", 3]) == 0
  out = workdir / "generated" / "extended_seed3_n12"
  assert str(out) in capsys.readouterr().out
  samples = np.load(out / "samples.npz")["samples"]
  assert samples.shape == (12, 8, 8, 1) and samples.dtype == np.float32
  pngs = sorted((out / "png").glob("*.png"))
  assert len(pngs) == 12
  first = np.asarray(Image.open(pngs[0]))
  assert first.shape == (8, 8) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, (np.clip(samples[0, ..., 0], 0, 1) * 255 + 0.5).astype(np.uint8))
  # With the run's --config too (it must match); the same seed gives the same samples.
  assert _cli(["--config", "digits:smoke", "--workdir", workdir, "--stage", "generate", "--method",
               "extended", "--num_samples", 12, "--sample_seed", 3]) == 0
  np.testing.assert_array_equal(np.load(out / "samples.npz")["samples"], samples)
  assert _snapshot(workdir) == before
  # A later pipeline run in the workdir is not disturbed by generated/.
  assert pipeline.run(config, workdir, stage="ot", log=lambda line: None) is None


def test_readme_load_run_example_runs_as_written(ring_run, monkeypatch, capsys):
  _, workdir = ring_run
  readme = (REPO / "README.md").read_text()
  blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "# load_run example" in b]
  assert len(blocks) == 1
  assert blocks[0].count("\n") <= 6
  monkeypatch.chdir(workdir.parent.parent)  # the example opens runs/ring
  exec(compile(blocks[0], "README.md", "exec"), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out.strip() == "(16, 2) (16, 2) (200,)"
