"""Every config file: loads, matches the schema of config.default_config, validates, has a smoke variant."""
import importlib.util
import pathlib
import re

import ml_collections
import pytest

from lsot_jax import config as config_lib
from lsot_jax import newton as newton_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_NAMES = ("eight_gaussians", "grid25", "mnist", "fashion_mnist", "digits", "celeba")


def _load(name):
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _keys(config, prefix=""):
  out = {}
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_keys(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def test_config_files_are_all_listed():
  assert sorted(p.stem for p in CONFIG_DIR.glob("*.py")) == sorted(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_config_matches_schema_and_validates(name, arg):
  config = _load(name).get_config(arg)
  assert set(_keys(config)) == set(_keys(config_lib.default_config())), "a config added or lost a field"
  for section in ("data", "ae", "ot", "sample", "eval"):
    assert isinstance(config[section], ml_collections.ConfigDict)
  assert isinstance(config.seed, int)
  config_lib.validate_config(config)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_files_import_only_the_config_module(name):
  source = (CONFIG_DIR / f"{name}.py").read_text()
  imports = re.findall(r"^\s*(?:from lsot_jax\S* import .*|import lsot_jax.*)$", source, re.M)
  assert all(line.strip() == "from lsot_jax import config as config_lib" for line in imports), imports


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_smoke_variant_is_smaller(name):
  module = _load(name)
  full, smoke = _keys(module.get_config()), _keys(module.get_config("smoke"))
  for field in ("ot.num_iterations", "sample.num_samples"):
    assert smoke[field] <= full[field], field
  assert smoke["ot.num_iterations"] < full["ot.num_iterations"]
  assert len(smoke["sample.methods"]) < len(full["sample.methods"])


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_docstring_gives_command_runtime_and_metrics(name):
  doc = _load(name).__doc__
  assert f"python launch.py --config configs/{name}.py" in doc
  assert f"configs/{name}.py:smoke" in doc
  assert re.search(r"Expected runtime", doc) and re.search(r"Expected metrics", doc)


def unmeasured_without_reason(doc):
  """The "not measured" phrases of a docstring that are not directly followed by a parenthesised reason of at
  least three words, e.g. "not measured yet (no CelebA copy on the build machine)"."""
  text = " ".join(doc.split())
  bad = []
  for match in re.finditer(r"not measured", text, re.I):
    reason = re.match(r"(?: yet)? \(([^()]+)\)", text[match.end():])
    if reason is None or len(reason.group(1).split()) < 3:
      bad.append(text[max(match.start() - 20, 0):match.end() + 40])
  return bad


def test_unmeasured_check_wants_a_reason():
  assert unmeasured_without_reason("Expected metrics: not measured yet.")
  assert unmeasured_without_reason("Expected runtime: not measured here (soon).")
  assert unmeasured_without_reason("Not measured (no data here); Expected metrics: not measured yet (later).")
  assert not unmeasured_without_reason("Expected metrics: not measured yet (no copy on the\n  build machine).")


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_unmeasured_figures_say_why(name):
  assert unmeasured_without_reason(_load(name).__doc__) == []


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_unknown_argument_is_refused(name):
  with pytest.raises(ValueError, match="Unknown config argument"):
    _load(name).get_config("bogus")


def test_mnist_is_the_embedded_default():
  makefile = (CONFIG_DIR.parent / "Makefile").read_text()
  assert "CONFIG ?= configs/mnist.py" in makefile
  config = _load("mnist").get_config()
  assert config.data.name == "mnist" and config.ae.kind == "conv28"
  assert config.eval.feature_space == "classifier"


def test_mnist_full_grows_the_default_run_by_the_trained_baselines_only():
  """``make baselines`` (configs/mnist.py:full) differs from ``make run`` in sample.methods alone, which is in
  no stage key: on a finished default run it trains, draws and evaluates only the added methods."""
  makefile = (CONFIG_DIR.parent / "Makefile").read_text()
  assert "--config $(CONFIG):full --workdir $(WORKDIR)" in makefile
  module = _load("mnist")
  default, full = module.get_config(), module.get_config("full")
  added = [m for m in full.sample.methods if m not in default.sample.methods]
  assert added == list(module.TRAINED_BASELINES) == ["wgan_gp", "vae"]
  assert list(full.sample.methods[:len(default.sample.methods)]) == list(default.sample.methods)
  flat_default, flat_full = config_lib.flatten(config_lib.as_plain(default)), config_lib.flatten(
      config_lib.as_plain(full))
  assert [k for k in flat_full if flat_full[k] != flat_default.get(k)] == ["sample.methods"]
  assert config_lib.stage_keys(full) == config_lib.stage_keys(default)


def test_grid25_fits_newton_with_per_cell_bands():
  """The grid's OT stage is Newton with per-cell gap bands (its measured winner), in the full and smoke
  variants; the solver the stage builds carries every ot.newton.* field."""
  for arg in (None, "smoke"):
    config = _load("grid25").get_config(arg)
    solver = config_lib.ot_solver(config)
    assert isinstance(solver, newton_lib.NewtonSolver) and solver.per_cell_band
    for name in config_lib.NEWTON_FIELDS:
      assert getattr(solver, name) == config.ot.newton[name], name
