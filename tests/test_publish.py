"""lsot_jax.publish and benchmarks/publish_run.py: published result files, and the README / config quotes of
their tables (checked against every committed docs/results/*/metrics.json)."""
import ast
import importlib.util
import json
import math
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lsot_jax import config_files
from lsot_jax import pipeline
from lsot_jax import publish
from lsot_jax import report

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "publish_run.py"

# The ring run of tests/test_pipeline.py's ``_tiny_config`` (every stage in a few seconds) as a config file.
TINY_CONFIG = '''r"""A tiny ring run.

Expected metrics (docs/results/toy/table.md):

  | method | stale |
  |---|---|
  | LSOT exact | 0 |

The end.
"""
from lsot_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.default_config()
  c.log.progress = False
  c.ot.solver = "adam"
  c.data.num_train = 200
  c.data.num_test = 200
  c.ot.num_iterations = 40
  c.ot.batch_size = 2048
  c.ot.max_batch_size = 2048
  c.ot.checkpoint_every = 10
  c.ot.marginal_samples = 8192
  c.sample.methods = ("exact", "extended")
  c.sample.num_samples = 100
  c.sample.num_seeds = 2
  c.sample.grid_size = 16
  c.eval.metrics = ("mode_coverage",)
  return c
'''
README = """# A project

The toy table (docs/results/toy/table.md), quoted:
| method | stale |
|---|---|
| old | 1 |

## Next section
"""


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """A finished tiny ring run of TINY_CONFIG with ``sample.num_samples`` overridden to 150:
  ``(config file, workdir)``."""
  root = tmp_path_factory.mktemp("toy")
  config_file = root / "tiny.py"
  config_file.write_text(TINY_CONFIG)
  config = config_files.load(str(config_file))
  config.sample.num_samples = 150
  pipeline.run(config, root / "run", log=lambda line: None)
  return config_file, root / "run"


def _script():
  spec = importlib.util.spec_from_file_location("publish_run", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _cells(table):
  """The rows of a Markdown table as lists of cells (header first, the separator left out)."""
  lines = table.strip("\n").split("\n")
  return [[c.strip() for c in line.strip("|").split("|")] for i, line in enumerate(lines) if i != 1]


@pytest.mark.slow  # builds and finishes a toy run (~1 minute on the 2-core CPU)
def test_publish_command_writes_a_finished_runs_files_and_updates_the_quotes(toy_run, tmp_path):
  config_file, finished = toy_run
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  images = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)
  report.save_nn_grid(workdir / "eval" / "extended_nn.png", images, images[::-1])  # as an image run has
  checkout = tmp_path / "checkout"
  (checkout / "configs").mkdir(parents=True)
  (checkout / "README.md").write_text(README)
  (checkout / "configs" / "tiny.py").write_text(TINY_CONFIG)
  result = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(workdir), "--name", "toy", "--config",
                           str(config_file), "--root", str(checkout), "--update_docs"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert result.returncode == 0, result.stdout + result.stderr

  out = checkout / "docs" / "results" / "toy"
  assert (out / "metrics.json").read_bytes() == (workdir / "metrics.json").read_bytes()
  metrics = json.loads((workdir / "metrics.json").read_text())
  table = (out / "table.md").read_text()
  assert table == publish.results_table(metrics)
  # Each cell is the metric rounded, "mean ± se" where the run has a standard error (a toy run's table shows
  # every metric, each with its se over the sampling seeds).
  header, *rows = _cells(table)
  assert [r[0] for r in rows] == [metrics["labels"][m] for m in metrics["methods"]] == ["LSOT exact",
                                                                                        "LSOT extended"]
  names = [h.split(" ")[0] for h in header[1:]]
  assert names[:3] == ["modes", "high_quality", "reverse_kl"]
  for method, row in zip(metrics["methods"], rows):
    for name, cell in zip(names, row[1:]):
      parts = cell.split(" ± ")
      keys = [name, f"{name}_se"][:len(parts)]
      assert len(parts) == 1 + (f"{name}_se" in metrics["methods"][method]), (method, name, cell)
      for key, part in zip(keys, parts):
        value = metrics["methods"][method][key]
        decimals = len(part.split(".")[1]) if "." in part else 0
        assert abs(float(part) - value) <= 0.5 * 10 ** -decimals + 1e-12, (method, key, part, value)

  run = json.loads((out / "run.json").read_text())
  assert run["name"] == "toy" and run["config"] == str(config_file)
  assert run["overrides"] == {"sample.num_samples": 150}
  eval_seconds = json.loads((workdir / "eval" / "DONE.json").read_text())["seconds"]
  assert run["stage_seconds"] == {**metrics["stage_seconds"], "eval": eval_seconds}
  assert math.isclose(run["total_seconds"], sum(run["stage_seconds"].values()))
  cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
  name = re.findall(r"model name\s*:\s*(.*)", cpuinfo)[0].strip()
  family, model = re.findall(r"cpu family\s*:\s*(\d+)", cpuinfo)[0], re.findall(r"^model\s*:\s*(\d+)", cpuinfo, re.M)[0]
  assert run["cpu"] == f"{name} (family {family}, model {model})"
  head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
  assert run["commit"] == head.strip() and run["commit_source"] == "checked out when published"

  img = checkout / "docs" / "img"
  assert (img / "toy_extended.png").read_bytes() == (workdir / "samples" / "extended.png").read_bytes()
  assert (img / "toy_extended_nn.png").read_bytes() == (workdir / "eval" / "extended_nn.png").read_bytes()

  readme = (checkout / "README.md").read_text()
  assert publish.table_block(readme, "toy") == table
  assert "| old | 1 |" not in readme and readme.endswith(table + "\n## Next section\n")
  doc = ast.get_docstring(ast.parse((checkout / "configs" / "tiny.py").read_text()), clean=False)
  assert publish.table_block(doc, "toy", "  ") == table and "stale" not in doc
  assert doc.endswith("\n\nThe end.\n")


@pytest.mark.slow  # builds and finishes a toy run (~1 minute on the 2-core CPU)
def test_publish_command_refuses_bad_input_in_one_line(toy_run, tmp_path, capsys):
  _, workdir = toy_run
  main = _script().main
  for args, needle in (
      (["--workdir", str(workdir), "--name", "Toy run"], "--name 'Toy run' must be lower-case"),
      (["--workdir", str(tmp_path / "none"), "--name", "toy"], "holds no finished run"),
      (["--workdir", str(workdir), "--name", "toy", "--update_docs"], "README.md: No such file"),
      (["--workdir", str(workdir), "--name", "toy", "--config", "no_such_config"], "no_such_config"),
  ):
    assert main(args + ["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("publish_run: error: ") and needle in err, err
  (tmp_path / "README.md").write_text("no anchor here\n")
  assert main(["--workdir", str(workdir), "--name", "toy", "--root", str(tmp_path), "--update_docs"]) == 1
  assert "no line naming docs/results/toy/table.md" in capsys.readouterr().err
  assert not (tmp_path / "docs").exists()  # a refused document stops the command before it writes


def test_committed_results_are_the_tables_that_the_readme_and_configs_quote():
  """Every docs/results/NAME/metrics.json renders to its table.md, which README.md quotes verbatim after its
  anchor line, and so does configs/NAME.py's docstring (where that file exists)."""
  results = sorted((REPO / "docs" / "results").glob("*/metrics.json"))
  assert "digits" in [p.parent.name for p in results]
  readme = (REPO / "README.md").read_text()
  redo = "rerun benchmarks/publish_run.py --update_docs (README.md names the command)"
  for path in results:
    name = path.parent.name
    table = publish.results_table(json.loads(path.read_text()))
    assert (path.parent / "table.md").read_text() == table, f"{path.parent}/table.md is stale; {redo}"
    assert publish.table_block(readme, name) == table, f"README.md does not quote {name}'s table; {redo}"
    config_file = REPO / "configs" / f"{name}.py"
    if config_file.exists():
      doc = ast.get_docstring(ast.parse(config_file.read_text()), clean=False)
      assert publish.table_block(doc, name, "  ") == table, f"{config_file} does not quote the table; {redo}"
    run = json.loads((path.parent / "run.json").read_text())
    assert run["name"] == name and set(run["stage_seconds"]) == {"ae", "encode", "ot", "sample", "eval"}
    assert re.fullmatch(r"[0-9a-f]{40}", run["commit"]), run["commit"]


def test_splice_table_replaces_or_inserts_after_the_anchor_line():
  table = "| a | b |\n|---|---|\n| x | 1 |\n"
  text = "intro\nsee docs/results/t/table.md:\n\n| a |\n|---|\n| old |\n\nafter\n"
  assert publish.table_block(text, "t") == "| a |\n|---|\n| old |\n"
  spliced = publish.splice_table(text, "t", table)
  assert spliced == "intro\nsee docs/results/t/table.md:\n\n" + table + "\nafter\n"
  assert publish.splice_table(spliced, "t", table) == spliced
  # No table yet: after the blank line that follows the anchor, with a blank line before the next text.
  assert publish.splice_table("docs/results/t/table.md:\n\nafter\n", "t", table) == (
      "docs/results/t/table.md:\n\n" + table + "\nafter\n")
  assert publish.table_block("docs/results/t/table.md:\n\nafter\n", "t") == ""
  indented = publish.splice_table("docs/results/t/table.md:\n\n  | old |\nend", "t", table, "  ")
  assert indented == "docs/results/t/table.md:\n\n  | a | b |\n  |---|---|\n  | x | 1 |\nend"
  assert publish.table_block(indented, "t", "  ") == table
  # A line that names the table but does not end with a colon is prose, not the anchor.
  assert publish.table_block("docs/results/t/table.md is written by ...\n| a |\n", "t") is None
  with pytest.raises(ValueError, match=r"no line naming docs/results/t/table.md and ending with ':'"):
    publish.splice_table("docs/results/u/table.md:\n", "t", table)


def test_results_table_shows_the_chosen_columns_and_the_frechet_standard_error():
  metrics = {"methods": {"exact": {"frechet": 1.8, "frechet_se": 0.16, "precision": 0.947, "precision_se": 0.002,
                                   "recall": 0.9124, "sinkhorn": 38.4, "memorisation_rate": 0.994, "num_seeds": 3},
                         "vae": {"frechet": 86.04, "frechet_se": 0.41, "precision": 0.845, "recall": 0.61,
                                 "sinkhorn": 120.5, "memorisation_rate": 0.0391, "num_seeds": 3}},
             "labels": {"exact": "LSOT exact", "vae": "VAE"}}
  assert publish.results_table(metrics) == (
      "| method | Frechet distance | precision | recall | memorisation |\n"
      "|---|---|---|---|---|\n"
      "| LSOT exact | 1.8 ± 0.160 | 0.947 | 0.912 | 0.994 |\n"
      "| VAE | 86.04 ± 0.410 | 0.845 | 0.610 | 0.039 |\n")
  # The report's own table keeps every metric and every standard error.
  header, rows = report.metrics_table(metrics["methods"], metrics["labels"])
  assert header == ["method", "frechet ↓", "precision ↑", "recall ↑", "sinkhorn ↓", "memorisation_rate"]
  assert rows[0][:3] == ["LSOT exact", "1.8 ± 0.160", "0.947 ± 0.002"]


def test_a_toy_runs_table_has_its_mode_coverage_with_standard_errors():
  """A run without image metrics (the ring, the grid) publishes every metric it has, each "± se"."""
  metrics = {"methods": {"exact": {"modes": 25.0, "modes_se": 0.0, "reverse_kl": 0.008786,
                                   "reverse_kl_se": 0.00072, "num_seeds": 10}},
             "labels": {"exact": "LSOT exact"}}
  assert publish.results_table(metrics) == (
      "| method | modes ↑ | reverse_kl ↓ |\n"
      "|---|---|---|\n"
      "| LSOT exact | 25 ± 0 | 0.00879 ± 0.00072 |\n")
