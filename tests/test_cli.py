"""lsot_jax.cli (the ``lsot-jax`` command, also behind launch.py) in-process, and config lookup by name."""
import pathlib

import pytest

import launch
from lsot_jax import cli
from lsot_jax import config_files

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_NAMES = ("celeba", "digits", "eight_gaussians", "fashion_mnist", "grid25", "mnist")


def test_help_prints_usage_and_flags_and_exits_0(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["lsot-jax", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("USAGE: lsot-jax --config NAME[:ARG] --workdir DIR")
  for flag in ("--config:", "--workdir:", "--stage:", "--scan:", "--[no]overwrite:", "--coordinator_address:",
               "--num_processes:", "--process_id:", "--[no]distributed:"):
    assert flag in out, flag
  assert "mnist:smoke" in out and "--helpfull" in out
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["launch.py", "--workdir", "w", "-h"])
  assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("USAGE: launch.py")


def test_launch_py_is_a_thin_entry_to_the_cli():
  assert launch.main is cli.run and launch.distributed_settings is cli.distributed_settings
  assert len((REPO / "launch.py").read_text().splitlines()) < 30


def test_config_names_resolve_to_the_shipped_files():
  assert config_files.config_names() == sorted(CONFIG_NAMES)
  assert (REPO / "configs") in config_files.config_dirs()
  mnist = REPO / "configs" / "mnist.py"
  assert config_files.resolve("mnist") == str(mnist)
  assert config_files.resolve("mnist:smoke") == f"{mnist}:smoke"
  assert config_files.resolve("mnist.py:smoke") == f"{mnist}:smoke"
  assert config_files.resolve(f"{mnist}:smoke") == f"{mnist}:smoke"  # an existing path is kept
  for bad in ("nosuch", "nosuch:smoke", "configs/nosuch.py", ""):
    with pytest.raises(ValueError, match="shipped configs: celeba, digits, eight_gaussians"):
      config_files.resolve(bad)


def test_load_by_name_equals_loading_the_file():
  smoke = config_files.load("eight_gaussians:smoke")
  assert smoke.to_dict() == config_files.load(str(REPO / "configs" / "eight_gaussians.py:smoke")).to_dict()
  full = config_files.load("eight_gaussians")
  assert smoke.ot.num_iterations < full.ot.num_iterations


def test_run_by_config_name_in_process(tmp_path, capsys):
  """A shipped name through the real flag parsing; the run stops at once (report before the other stages)."""
  workdir = tmp_path / "w"
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["lsot-jax", "--config", "eight_gaussians:smoke", "--workdir", str(workdir), "--stage", "report",
              "--config.seed=3"])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert "lsot-jax: error: Stage 'report' needs the earlier stage(s)" in err, err
  assert '"seed": 3' in (workdir / "config.json").read_text()
