"""The built wheel, installed into a clean virtualenv: console script ``lsot-jax``, shipped configs, py.typed.

Slow (``make test-slow``): building the wheel fetches the build backend (setuptools) from the package index
as ``pip install .`` does, and the tiny run takes about 20 s on the 2-core CPU.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_NAMES = ("celeba", "digits", "eight_gaussians", "fashion_mnist", "grid25", "mnist")

pytestmark = pytest.mark.slow


def _run(cmd, cwd, timeout=600, env=None):
  result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
  assert result.returncode == 0, f"{cmd}:\n{result.stdout}\n{result.stderr}"
  return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """Builds the wheel from a copy of the sources and installs it (``--no-deps``) into a fresh venv.

  The copy keeps the build's ``build/`` and ``*.egg-info`` out of the working tree. The venv sees this
  interpreter's packages (jax, ...) through a ``.pth`` line naming their folder; a plain path line does not
  run the ``.pth`` files in it, so the editable install of the checkout stays invisible and ``lsot_jax``
  comes from the wheel alone.
  """
  root = tmp_path_factory.mktemp("packaging")
  src = root / "src"
  src.mkdir()
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy2(REPO / name, src / name)
  for name in ("lsot_jax", "configs"):
    shutil.copytree(REPO / name, src / name, ignore=ignore)
  dist = root / "dist"
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, src], cwd=root)
  (wheel,) = dist.glob("lsot_jax-*.whl")
  venv = root / "venv"
  _run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=root)
  python = venv / "bin" / "python"
  purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
  (pathlib.Path(purelib.stdout.strip()) / "lsot_jax_test_deps.pth").write_text(
      sysconfig.get_paths()["purelib"] + "\n")
  _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel], cwd=root)
  return dict(root=root, wheel=wheel, venv=venv, python=python)


def test_wheel_contents(installed):
  with zipfile.ZipFile(installed["wheel"]) as whl:
    names = set(whl.namelist())
    entry_points = next(whl.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
  assert "lsot_jax/py.typed" in names and "lsot_jax/cli.py" in names and "lsot_jax/config_files.py" in names
  assert {f"lsot_jax/configs/{c}.py" for c in CONFIG_NAMES} <= names
  assert not any(n.startswith(("configs/", "tests/", "benchmarks/")) for n in names)
  assert "[console_scripts]" in entry_points and "lsot-jax = lsot_jax.cli:main" in entry_points


def test_installed_package_is_the_wheel_and_finds_its_configs(installed):
  probe = ("import lsot_jax, lsot_jax.config_files as c; print(lsot_jax.__file__); "
           "print(c.resolve('mnist:smoke')); print(','.join(c.config_names()))")
  out = _run([installed["python"], "-c", probe], cwd=installed["root"]).stdout.splitlines()
  site = str(installed["venv"])
  assert out[0].startswith(site), out
  assert out[1].startswith(site) and out[1].endswith("lsot_jax/configs/mnist.py:smoke"), out
  assert out[2] == ",".join(CONFIG_NAMES)


def test_console_script_help(installed):
  script = installed["venv"] / "bin" / "lsot-jax"
  assert script.is_file()
  result = _run([script, "--help"], cwd=installed["root"])
  assert result.stdout.startswith("USAGE: lsot-jax --config NAME[:ARG] --workdir DIR")
  assert "--workdir:" in result.stdout and "--scan:" in result.stdout


def test_console_script_runs_a_shipped_config_by_name(installed):
  """Outside the checkout, ``--config eight_gaussians:smoke`` is the wheel's copy of the config."""
  workdir = installed["root"] / "ring"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  result = _run([installed["venv"] / "bin" / "lsot-jax", "--config", "eight_gaussians:smoke",
                 "--workdir", workdir, "--config.ot.num_iterations=20", "--config.sample.methods=('exact',)"],
                cwd=installed["root"], env=env)
  assert f"report: {workdir}/report.md" in result.stdout
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert list(metrics["methods"]) == ["exact"] and metrics["methods"]["exact"]["modes"] == 8
