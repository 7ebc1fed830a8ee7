"""Hyperparameter scans of the OT fit in one vmapped, jitted call per group of static settings.

A scan is a list of ``(field, values)`` specs, parsed from ``--scan`` strings such as
``"ot.learning_rate=1e-3,3e-3,1e-2"`` and ``"seed=0,1,2"``; the settings are all their combinations.

* ``ot.learning_rate`` is a pytree leaf of :class:`lsot_jax.solver.BrenierSolver`, and ``seed`` selects the
  solver's key, so both are traced: every (learning rate, seed) pair of a group runs in one
  ``jax.jit(jax.vmap(...))`` call.
* Any other ``ot.<field>`` of the solver is static (it sets shapes or the loop structure: batch sizes,
  iteration counts, ...). The settings are grouped by their static values and each group is one vmapped
  call (one compilation per group).
* :func:`run_ot_scan` fits every setting to one shared problem and refuses fields outside the solver
  (``ae.*``, ``data.*``, ...) with a ``ValueError`` naming the field. :func:`fit_ot_settings`, the engine
  under it, also takes one problem per setting (the same shapes, stacked and vmapped with the settings):
  :func:`lsot_jax.pipeline.run_scan` uses it to fit each scanned autoencoder's own codes, after training the
  autoencoders with :func:`lsot_jax.train.train_autoencoders_vmapped`.

After the fit, each setting's final L1 marginal error is measured on one fixed, large source sample (the
same key for every setting), inside the same vmapped call, and an optional host-side quality metric is
computed per setting. :func:`write_scan_outputs` writes ``scan.csv``, ``scan.md`` and ``scan.png``.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from lsot_jax import solver as solver_lib

__all__ = [
    "STAT_COLUMNS",
    "ScanResult",
    "fit_ot_settings",
    "parse_scan_specs",
    "run_ot_scan",
    "write_scan_outputs",
]

ScanSpec = Tuple[str, List[Any]]
_SEED = "seed"
_TRACED = ("learning_rate",)
# The per-setting statistics of an OT fit, in row order.
STAT_COLUMNS = ("l1", "max_rel", "noise_floor", "iterations", "converged", "diverged")
_SOLVER_FIELDS = tuple(f.name for f in dataclasses.fields(solver_lib.BrenierSolver))


def _parse_value(text: str) -> Any:
  text = text.strip()
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def parse_scan_specs(specs: Sequence[str]) -> List[ScanSpec]:
  """Parses ``"field=v1,v2,..."`` strings into ``(field, [values])`` pairs.

  Values become int, float or bool where they parse as such, strings otherwise.

  Args:
    specs: e.g. ``["ot.learning_rate=1e-3,3e-3,1e-2", "seed=0,1,2"]``.

  Returns:
    e.g. ``[("ot.learning_rate", [0.001, 0.003, 0.01]), ("seed", [0, 1, 2])]``, in the given order.

  Raises:
    ValueError: a spec without ``=``, an empty field or value, a repeated field or value.
  """
  parsed: List[ScanSpec] = []
  seen = set()
  for spec in specs:
    field, sep, values = spec.partition("=")
    field = field.strip()
    if not sep or not field:
      raise ValueError(f"Scan spec {spec!r} must look like 'field=v1,v2,...' (e.g. 'seed=0,1,2').")
    items = [v for v in values.split(",")]
    if not values.strip() or any(not v.strip() for v in items):
      raise ValueError(f"Scan spec {spec!r} has an empty value; give a comma-separated list.")
    if field in seen:
      raise ValueError(f"Scan field {field!r} is given twice; merge its values into one spec.")
    parsed_values = [_parse_value(v) for v in items]
    if len(set(map(repr, parsed_values))) != len(parsed_values):
      raise ValueError(f"Scan spec {spec!r} repeats a value.")
    seen.add(field)
    parsed.append((field, parsed_values))
  return parsed


def _solver_field(field: str) -> str:
  """Maps a scan field to a BrenierSolver field name, or "seed"; raises for anything else."""
  if field == _SEED:
    return _SEED
  name = field[len("ot."):] if field.startswith("ot.") else field
  if name not in _SOLVER_FIELDS:
    raise ValueError(
        f"Cannot scan {field!r}: run_ot_scan scans 'seed' and the OT solver's fields 'ot.<name>' with "
        f"<name> in {', '.join(_SOLVER_FIELDS)}."
    )
  return name


@dataclasses.dataclass(frozen=True)
class ScanResult:
  """Outcome of :func:`run_ot_scan`.

  Attributes:
    rows: one dict per setting (product order of the specs): the scanned values under their spec names,
      then ``l1``, ``max_rel``, ``noise_floor``, ``iterations``, ``converged``, ``diverged`` and, if a
      quality function was given, its metric(s).
    h: float array of shape [num_settings, n], the fitted heights (masked cells at -1e30).
    files: paths of the written outputs (``csv``, ``md``, ``png``); empty if no ``out_dir``.
    num_calls: number of vmapped, jitted OT calls (groups of static solver settings).
    num_ae_calls: number of vmapped, jitted autoencoder trainings (groups of static training settings) of
      an autoencoder scan (:func:`lsot_jax.pipeline.run_scan`); 0 when the codes are shared.
  """

  rows: List[Dict[str, Any]]
  h: np.ndarray
  files: Dict[str, str]
  num_calls: int
  num_ae_calls: int = 0


def run_ot_scan(
    problem: solver_lib.SemidiscreteProblem,
    base_solver_kwargs: Mapping[str, Any],
    specs: Union[Sequence[str], Sequence[ScanSpec]],
    *,
    seed: int = 0,
    key_fn: Optional[Callable[[int], jax.Array]] = None,
    eval_key: Optional[jax.Array] = None,
    num_eval_samples: int = 1 << 20,
    eval_batch_size: int = 65536,
    quality_fn: Optional[Callable[[solver_lib.BrenierPotential, Dict[str, Any]], Any]] = None,
    quality_name: str = "quality",
    out_dir: Optional[str] = None,
) -> ScanResult:
  """Fits the Brenier potential for every combination of the scanned settings, vmapped.

  Args:
    problem: the problem (shared by all settings).
    base_solver_kwargs: :class:`BrenierSolver` keyword arguments for the fields that are not scanned.
    specs: strings for :func:`parse_scan_specs`, or its parsed output.
    seed: the seed when ``seed`` is not scanned.
    key_fn: maps a seed to the solver's PRNG key; ``jax.random.key(seed)`` if None. (The pipeline derives
      its OT key as ``fold_in(key(seed), salt)``; pass that to reproduce its runs.)
    eval_key: key of the fixed evaluation sample; ``jax.random.key(12345)`` if None.
    num_eval_samples: source samples of the final marginal-error evaluation (large: its noise floor is
      reported per row).
    eval_batch_size: samples per batch of that evaluation.
    quality_fn: optional host-side metric ``quality_fn(potential, setting) -> float | dict[str, float]``
      per setting (``setting`` maps the spec names to this setting's values).
    quality_name: column name when ``quality_fn`` returns a float.
    out_dir: if given, writes ``scan.csv``, ``scan.md`` and ``scan.png`` there (created if needed).

  Returns:
    A :class:`ScanResult`.

  Raises:
    ValueError: a field that cannot be scanned (named in the message), or scanned static values that make
      an invalid solver.
  """
  if specs and isinstance(specs[0], str):
    specs = parse_scan_specs(specs)
  specs = [(field, list(values)) for field, values in specs]
  names = [_solver_field(field) for field, _ in specs]
  for name in names:
    if name != _SEED and name in base_solver_kwargs:
      raise ValueError(f"Field {name!r} is both scanned and set in base_solver_kwargs.")
  key_fn = key_fn or jax.random.key
  eval_key = jax.random.key(12345) if eval_key is None else eval_key
  settings = [dict(zip([f for f, _ in specs], combo)) for combo in itertools.product(*[v for _, v in specs])]

  solver_kwargs, keys = [], []
  for setting in settings:
    values = {name: setting[field] for (field, _), name in zip(specs, names)}
    keys.append(key_fn(int(values.pop(_SEED, seed))))
    solver_kwargs.append({**dict(base_solver_kwargs), **values})
  h_all, stats, num_calls = fit_ot_settings(
      problem, solver_kwargs, keys, eval_key=eval_key, num_eval_samples=num_eval_samples,
      eval_batch_size=eval_batch_size)

  rows = []
  for i, setting in enumerate(settings):
    row = dict(setting)
    row.update(stats[i])
    if quality_fn is not None:
      potential = solver_lib.BrenierPotential(y=problem.y, h=jnp.asarray(h_all[i]))
      quality = quality_fn(potential, dict(setting))
      if isinstance(quality, Mapping):
        row.update({k: float(v) for k, v in quality.items()})
      else:
        row[quality_name] = float(quality)
    rows.append(row)
  files = write_scan_outputs(rows, out_dir, [f for f, _ in specs]) if out_dir else {}
  return ScanResult(rows=rows, h=h_all, files=files, num_calls=num_calls)


def fit_ot_settings(
    problem: Union[solver_lib.SemidiscreteProblem, Sequence[solver_lib.SemidiscreteProblem]],
    solver_kwargs: Sequence[Mapping[str, Any]],
    keys: Sequence[jax.Array],
    *,
    problem_index: Optional[Sequence[int]] = None,
    eval_key: Optional[jax.Array] = None,
    num_eval_samples: int = 1 << 20,
    eval_batch_size: int = 65536,
) -> Tuple[np.ndarray, List[Dict[str, Any]], int]:
  """Fits one Brenier potential per setting, one ``jax.jit(jax.vmap(...))`` call per group of static settings.

  The settings are grouped by their solver keyword arguments other than ``learning_rate`` (static fields:
  shapes and loop structure); within a group the learning rates and keys are traced and vmapped. Every
  group's solver is built (and checked) before the first fit.

  Args:
    problem: one problem shared by every setting, or a sequence of problems of equal shapes (the same n, d
      and source structure, e.g. the codes of several autoencoders), picked per setting by
      ``problem_index``; the problems of a group's members are stacked and vmapped over with the settings.
    solver_kwargs: per setting, :class:`BrenierSolver` keyword arguments (missing fields: the defaults).
    keys: per setting, the solver's PRNG key.
    problem_index: per setting, an index into ``problem`` when it is a sequence; must be None otherwise.
    eval_key: key of the fixed evaluation sample of the final marginal error (the same for every setting);
      ``jax.random.key(12345)`` if None.
    num_eval_samples: source samples of that evaluation.
    eval_batch_size: samples per batch of that evaluation.

  Returns:
    ``(h, stats, num_calls)``: float32 array of shape [S, n], the fitted heights (masked cells at -1e30);
    per setting a dict of ``l1``, ``max_rel``, ``noise_floor``, ``iterations``, ``converged``, ``diverged``
    (Python scalars); the number of vmapped calls.

  Raises:
    ValueError: lengths that do not match, a ``problem_index`` without a sequence of problems (or the
      reverse), or solver settings that make an invalid solver.
  """
  shared = isinstance(problem, solver_lib.SemidiscreteProblem)
  if len(keys) != len(solver_kwargs) or (problem_index is not None and len(problem_index) != len(keys)):
    raise ValueError(f"Got {len(solver_kwargs)} solver settings, {len(keys)} keys and "
                     f"{'no' if problem_index is None else len(problem_index)} problem indices.")
  if shared != (problem_index is None):
    raise ValueError("Give problem_index exactly when problem is a sequence of problems.")
  problems = [problem] if shared else list(problem)
  index = [0] * len(keys) if shared else [int(i) for i in problem_index]
  if any(not 0 <= i < len(problems) for i in index):
    raise ValueError(f"problem_index must lie in [0, {len(problems)}).")
  eval_key = jax.random.key(12345) if eval_key is None else eval_key
  groups: Dict[Tuple[Tuple[str, Any], ...], List[int]] = {}
  for i, kwargs in enumerate(solver_kwargs):
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in _TRACED))
    groups.setdefault(static, []).append(i)
  solvers = {static: solver_lib.BrenierSolver(**dict(static)) for static in groups}

  h_all = np.zeros((len(keys), problems[0].num_targets), np.float32)
  stats: List[Dict[str, Any]] = [dict() for _ in keys]
  for static, members in groups.items():
    solver = solvers[static]
    lrs = [float(solver_kwargs[i].get("learning_rate", solver.learning_rate)) for i in members]
    if shared:
      prob, prob_axis = problems[0], None
    else:
      prob, prob_axis = jax.tree.map(lambda *a: jnp.stack(a), *[problems[index[i]] for i in members]), 0
    fit = _vmapped_fit(solver, int(num_eval_samples), int(eval_batch_size), prob_axis)
    out = jax.device_get(fit(jnp.asarray(lrs, jnp.float32), jnp.stack([keys[i] for i in members]), prob,
                             eval_key))
    for j, i in enumerate(members):
      h_all[i] = out["h"][j]
      stats[i] = {k: out[k][j].item() for k in STAT_COLUMNS}
  return h_all, stats, len(groups)


@functools.lru_cache(maxsize=16)
def _vmapped_fit(solver: solver_lib.BrenierSolver, num_eval_samples: int, eval_batch_size: int,
                 problem_axis: Optional[int]) -> Callable[..., Dict[str, jax.Array]]:
  """``jax.jit(jax.vmap(_fit_one(...)))``, one per static setting, so later scans in a process reuse its
  compilations (per shape)."""
  return jax.jit(jax.vmap(_fit_one(solver, num_eval_samples, eval_batch_size),
                          in_axes=(0, 0, problem_axis, None)))


def _fit_one(solver, num_eval_samples, eval_batch_size):
  """The per-setting function that run_ot_scan vmaps: (learning rate, key) -> heights and statistics.

  The problem and the evaluation key are arguments (not closed over), so large codes are not baked into
  the compiled program as constants.
  """

  def fit(
      lr: jax.Array, key: jax.Array, problem: solver_lib.SemidiscreteProblem, eval_key: jax.Array
  ) -> Dict[str, jax.Array]:
    potential, state = dataclasses.replace(solver, learning_rate=lr)(key, problem)
    errors = potential.marginal_errors(
        eval_key, problem.source, problem.weights, num_eval_samples, eval_batch_size
    )
    return dict(
        h=potential.h, l1=errors["l1"], max_rel=errors["max_rel"], noise_floor=errors["noise_floor"],
        iterations=state.it, converged=state.converged, diverged=state.diverged,
    )

  return fit


def _format(value: Any) -> str:
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def write_scan_outputs(
    rows: Sequence[Dict[str, Any]], out_dir: str, scanned: Sequence[str]
) -> Dict[str, str]:
  """Writes the scan table (``scan.csv``, ``scan.md``) and plot (``scan.png``) to ``out_dir``.

  The plot has one panel per metric (``l1`` and any other numeric, non-boolean column that is not a scanned
  field or a solver statistic): one column of points per setting of the non-seed fields, one point per
  seed, and the mean of the finite values as a red line.

  Args:
    rows: rows from :func:`run_ot_scan` or :func:`lsot_jax.pipeline.run_scan`.
    out_dir: output folder (created if needed).
    scanned: the scanned field names (plot labels).

  Returns:
    ``{"csv": path, "md": path, "png": path}``.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  columns = list(rows[0].keys())
  for row in rows[1:]:
    columns += [c for c in row if c not in columns]
  paths = {k: os.path.join(out_dir, f"scan.{k}") for k in ("csv", "md", "png")}
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_format(r.get(c, "")) for c in columns) + " |" for r in rows]
  with open(paths["md"], "w") as f:
    f.write("\n".join(lines) + "\n")

  config_fields = [f for f in scanned if f != _SEED]
  labels: List[str] = []
  for row in rows:
    if _row_label(row, config_fields) not in labels:
      labels.append(_row_label(row, config_fields))
  fixed = set(scanned) | set(STAT_COLUMNS)
  metrics = ["l1"] + [c for c in columns if c not in fixed and c != "l1" and all(
      isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows)]
  fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.2 * len(labels)) * len(metrics), 3.6),
                           squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for k, label in enumerate(labels):
      values = [float(r[metric]) for r in rows if _row_label(r, config_fields) == label]
      finite = [v for v in values if math.isfinite(v)]
      ax.scatter([k] * len(values), values, s=18, color="tab:blue", zorder=3)
      if finite:
        ax.hlines(float(np.mean(finite)), k - 0.3, k + 0.3, color="tab:red", lw=2, zorder=2)
    if metric == "l1":
      floors = [float(r["noise_floor"]) for r in rows if math.isfinite(float(r["noise_floor"]))]
      floor = float(np.mean(floors)) if floors else float("nan")
      ax.axhline(floor, color="grey", ls="--", lw=1, label=f"eval noise floor {floor:.3g}")
      ax.legend(fontsize=7)
      ax.set_ylabel("final L1 marginal error")
    else:
      ax.set_ylabel(metric)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_title(metric + (" (points: seeds, red: mean)" if _SEED in scanned else ""), fontsize=9)
  fig.tight_layout()
  fig.savefig(paths["png"], dpi=110)
  plt.close(fig)
  return paths


def _row_label(row: Dict[str, Any], config_fields: Sequence[str]) -> str:
  return ", ".join(f"{f.split('.')[-1]}={_format(row[f])}" for f in config_fields) or "all"
