"""Published results: a finished run's figures as committed files, quoted by the README and config docstrings.

:func:`publish_run` (the command ``python benchmarks/publish_run.py --workdir W --name NAME``) writes, under a
docs folder (the checkout's ``docs/`` by default)::

  results/NAME/metrics.json   the run's metrics.json, byte for byte
  results/NAME/run.json       where it came from: the commit (given, or the one checked out when
                              publishing), the config's name and the fields the run overrode, the CPU
                              model, the stage seconds
  results/NAME/table.md       the methods table (:func:`results_table`)
  img/NAME_extended.png       the run's LSOT ``extended`` sample grid, where it has one
  img/NAME_extended_nn.png    those samples over their nearest training images, where it has them

A document quotes ``table.md`` right after a line that names it and ends with a colon (the anchor; blank lines
may follow it): :func:`table_block` reads the quoted table, :func:`splice_table` replaces it, and the
command's ``--update_docs`` splices the table into ``README.md`` and, indented by two spaces, into the
docstring of ``configs/<config name>.py``. ``tests/test_publish.py`` renders every committed
``results/*/metrics.json`` again and checks those quotes, so that the README and the result files cannot
drift apart.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
from typing import Any, Dict, List, Optional

from lsot_jax import config as config_lib
from lsot_jax import config_files
from lsot_jax import report
from lsot_jax import workdir as workdir_lib

__all__ = ["COLUMN_TITLES", "RESULTS_COLUMNS", "SE_COLUMNS", "cpu_model", "publish_run", "results_table",
           "run_record", "splice_table", "table_block", "table_path"]

# The columns of a published table (those the run has), their headers, and the one that gets "± se".
RESULTS_COLUMNS = ("frechet", "precision", "recall", "density", "coverage", "memorisation_rate")
COLUMN_TITLES = {"frechet": "Frechet distance", "precision": "precision", "recall": "recall",
                 "density": "density", "coverage": "coverage", "memorisation_rate": "memorisation"}
SE_COLUMNS = ("frechet",)
# The run's grids that are published: ``(paths relative to the workdir, newest layout first), image name``.
_IMAGES = ((("samples/extended.png",), "{name}_extended.png"),
           (("eval/extended_nn.png", "samples/extended_nn.png"), "{name}_extended_nn.png"))
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def table_path(name: str) -> str:
  """The path of a published table relative to the checkout, as documents name it in their anchor line."""
  return f"docs/results/{name}/table.md"


def results_table(metrics: Dict[str, Any]) -> str:
  """The methods table of a run as Markdown (the text of ``table.md``).

  One row per method of ``metrics["methods"]`` (labels from ``metrics["labels"]``), the columns of
  :data:`RESULTS_COLUMNS` that the run measured (every metric when it measured none of them, e.g. a toy run's
  mode coverage), values as :func:`lsot_jax.report.metrics_table` formats them, the Frechet distance (in a
  toy run's table every metric) as "mean ± standard error" over the sampling seeds when there are several.

  Args:
    metrics: the contents of a run's ``metrics.json``.

  Returns:
    The table's lines, each ending with a newline.
  """
  methods, labels = metrics.get("methods") or {}, metrics.get("labels")
  header, rows = report.metrics_table(methods, labels, columns=RESULTS_COLUMNS, titles=COLUMN_TITLES,
                                      se_columns=SE_COLUMNS)
  if len(header) == 1:
    header, rows = report.metrics_table(methods, labels)
  return "\n".join(report.markdown_table(header, rows)) + "\n"


def _anchor(lines: List[str], name: str) -> Optional[int]:
  path = table_path(name)
  return next((i for i, line in enumerate(lines) if path in line and line.rstrip().endswith(":")), None)


def _block(lines: List[str], start: int, indent: str) -> int:
  """The index after the table lines that begin at ``start``."""
  end = start
  while end < len(lines) and lines[end].startswith(indent + "|"):
    end += 1
  return end


def table_block(text: str, name: str, indent: str = "") -> Optional[str]:
  """The table quoted in ``text`` after its anchor line (module docstring), without ``indent``.

  Args:
    text: a document (the README, a config file).
    name: the published run's name.
    indent: the prefix of each quoted line.

  Returns:
    The quoted lines, each ending with a newline ("" when the anchor is followed by no table), or None when
    ``text`` has no anchor line for ``name``.
  """
  lines = text.split("\n")
  anchor = _anchor(lines, name)
  if anchor is None:
    return None
  start = anchor + 1
  while start < len(lines) and not lines[start].strip():
    start += 1
  return "".join(line[len(indent):] + "\n" for line in lines[start:_block(lines, start, indent)])


def splice_table(text: str, name: str, table: str, indent: str = "") -> str:
  """``text`` with the table after its anchor line replaced by ``table`` (indented), or inserted there.

  Args:
    text: a document.
    name: the published run's name.
    table: the new table, as :func:`results_table` returns it.
    indent: the prefix of each quoted line.

  Raises:
    ValueError: ``text`` has no anchor line for ``name``.
  """
  lines = text.split("\n")
  anchor = _anchor(lines, name)
  if anchor is None:
    raise ValueError(f"no line naming {table_path(name)} and ending with ':' to put the table after; add one "
                     "above the table.")
  start = anchor + 1
  while start < len(lines) and not lines[start].strip():
    start += 1
  if start < len(lines) and lines[start].startswith(indent + "|"):
    end = _block(lines, start, indent)
  else:  # no table yet: after the blank line that follows the anchor, if there is one
    start = end = anchor + (2 if anchor + 1 < len(lines) and not lines[anchor + 1].strip() else 1)
  new = [indent + line for line in table.rstrip("\n").split("\n")]
  if end == start and start < len(lines) and lines[start].strip():
    new.append("")  # a table ends at a blank line; the next text is not a row of it
  return "\n".join(lines[:start] + new + lines[end:])


def cpu_model() -> Optional[str]:
  """The CPU's model name from ``/proc/cpuinfo``, with its family and model numbers (None where there is none).

  Virtual machines often report a bare name ("AMD EPYC") for CPUs of different generations and speeds, so
  the numbers tell them apart, e.g. ``"AMD EPYC (family 25, model 17)"``.
  """
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return None
  match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
  if not match:
    return None
  family = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.MULTILINE)
  model = re.search(r"^model\s*:\s*(\d+)$", text, re.MULTILINE)
  name = match.group(1).strip()
  if family and model:
    name += f" (family {family.group(1)}, model {model.group(1)})"
  return name


def _git(repo: pathlib.Path, *args: str) -> Optional[str]:
  try:
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                         timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def run_record(workdir: os.PathLike | str, name: str, config: Optional[str] = None,
               commit: Optional[str] = None, repo: Optional[os.PathLike | str] = None) -> Dict[str, Any]:
  """The ``run.json`` of a finished run.

  Args:
    workdir: the run folder (with ``metrics.json`` and ``config.json``).
    name: the published name.
    config: the config the run was started with (``--config``'s value: a shipped name or a path, with an
      optional ``:ARG``), whose fields the stored ``config.json`` is compared with; None records none.
    commit: the commit the run was made at, when known (a workdir does not record it); None records the
      commit checked out in ``repo`` now, and whether tracked files differ from it.
    repo: the checkout whose commit is recorded (that of this package's folder by default).

  Returns:
    ``{"name", "commit", "commit_source", "uncommitted_changes", "config", "overrides", "cpu", "num_cpus",
    "stage_seconds", "total_seconds"}``: ``overrides`` maps each field that the run set differently from
    ``config`` to the run's value; ``stage_seconds`` are those of ``metrics.json`` plus the eval stage's
    (from its marker), each the last run of its stage; ``total_seconds`` their sum.
  """
  wd = workdir_lib.Workdir(workdir)
  metrics = json.loads(wd.metrics_path.read_text())
  stored = json.loads(wd.config_path.read_text())
  overrides = None
  if config is not None:
    base = config_lib.as_plain(config_files.load(config))
    overrides = {field: new for field, _, new in config_lib.config_diff(base, stored)}
  seconds = dict(metrics.get("stage_seconds") or {})
  seconds["eval"] = (wd.done("eval") or {}).get("seconds")
  repo = pathlib.Path(repo) if repo is not None else pathlib.Path(__file__).resolve().parents[1]
  status = None if commit is not None else _git(repo, "status", "--porcelain", "--untracked-files=no")
  return {"name": name, "commit": commit if commit is not None else _git(repo, "rev-parse", "HEAD"),
          "commit_source": "given" if commit is not None else "checked out when published",
          "uncommitted_changes": None if status is None else bool(status), "config": config,
          "overrides": overrides, "cpu": cpu_model(), "num_cpus": os.cpu_count(), "stage_seconds": seconds,
          "total_seconds": sum(v for v in seconds.values() if v is not None)}


def publish_run(workdir: os.PathLike | str, name: str, *, docs_dir: os.PathLike | str,
                config: Optional[str] = None, commit: Optional[str] = None,
                update: Optional[Dict[os.PathLike | str, str]] = None) -> List[pathlib.Path]:
  """Writes a finished run's published files (module docstring) under ``docs_dir``.

  Args:
    workdir: a finished run's folder (with ``metrics.json``).
    name: the published name: lower-case letters, digits, ``_`` and ``-``.
    docs_dir: the folder that receives ``results/NAME/`` and ``img/``.
    config: the run's ``--config`` value, for the overrides in ``run.json``.
    commit: the commit the run was made at, if it is not the one checked out (:func:`run_record`).
    update: ``{document path: indent}``: documents whose quoted table (after their anchor line) is replaced.

  Returns:
    The files written.

  Raises:
    ValueError: a bad name, a run without ``metrics.json``, or a document that is missing or has no anchor
      line (named); nothing is written then.
  """
  if not _NAME.match(name):
    raise ValueError(f"--name {name!r} must be lower-case letters, digits, '_' or '-' (e.g. mnist).")
  wd = workdir_lib.Workdir(workdir)
  if not wd.metrics_path.is_file() or not wd.config_path.is_file():
    raise ValueError(f"--workdir {wd.root} holds no finished run ({workdir_lib.METRICS} and "
                     f"{workdir_lib.CONFIG}); finish it first (launch.py --config ... --workdir ...).")
  record = run_record(wd.root, name, config, commit)
  metrics = json.loads(wd.metrics_path.read_text())
  table = results_table(metrics)
  documents = {}
  for path, indent in (update or {}).items():  # every document is checked before anything is written
    path = pathlib.Path(path)
    try:
      documents[path] = splice_table(path.read_text(), name, table, indent)
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: {e.strerror if isinstance(e, OSError) else e}") from e
  docs = pathlib.Path(docs_dir)
  out = docs / "results" / name
  out.mkdir(parents=True, exist_ok=True)
  written = [out / workdir_lib.METRICS, out / "run.json", out / "table.md"]
  shutil.copyfile(wd.metrics_path, written[0])
  written[1].write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
  written[2].write_text(table)
  for sources, target in _IMAGES:
    source = next((wd.root / rel for rel in sources if (wd.root / rel).is_file()), None)
    if source is not None:
      (docs / "img").mkdir(parents=True, exist_ok=True)
      written.append(docs / "img" / target.format(name=name))
      shutil.copyfile(source, written[-1])
  for path, text in documents.items():
    path.write_text(text)
    written.append(path)
  return written
