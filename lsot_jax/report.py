"""Figures and the run report (``report.md`` and ``report.html``).

Plot helpers write PNG files (matplotlib with the Agg backend, or PIL for image grids):

* :func:`save_image_grid`: a tiled grid of images in [0, 1];
* :func:`save_nn_grid`: generated images over their nearest training images (memorisation check);
* :func:`save_scatter`: 2-D samples with the mixture's mode centres;
* :func:`plot_convergence`: the OT solver's marginal error and energy per step.

:func:`write_report` reads what the pipeline left in a workdir (``metrics.json``, ``ot/history.json``,
``ot/convergence.png``, ``ae/recon.png``, ``samples/*.png``, ``eval/*_nn.png``; the layout is
:mod:`lsot_jax.workdir`'s) and writes the two report files next to it; the figures of
:data:`GLANCE_FIGURES` that exist make its "At a glance" section, after the metrics table.
"""
from __future__ import annotations

import html
import json
import math
import os
import pathlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

from lsot_jax import workdir as workdir_lib  # pylint: disable=wrong-import-position

__all__ = [
    "GLANCE_FIGURES",
    "markdown_table",
    "metrics_table",
    "plot_convergence",
    "save_image_grid",
    "save_nn_grid",
    "save_scatter",
    "write_report",
]

_HIGHER_IS_BETTER = {"modes": True, "high_quality": True, "reverse_kl": False, "frechet": False,
                     "precision": True, "recall": True, "density": True, "coverage": True,
                     "sinkhorn": False, "sliced_wasserstein": False, "memorisation_rate": None,
                     "memorisation_threshold": None}
_COLUMN_ORDER = ("modes", "high_quality", "reverse_kl", "frechet", "precision", "recall", "density",
                 "coverage", "sinkhorn", "sliced_wasserstein", "memorisation_rate")


def _to_uint8_grid(images: np.ndarray, ncols: Optional[int], pad: int) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"images must have shape [N, H, W, C] with N >= 1, got {images.shape}.")
  n, h, w, c = images.shape
  if c not in (1, 3):
    raise ValueError(f"images need 1 or 3 channels, got {c}.")
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
  for i in range(n):
    r, col = divmod(i, ncols)
    y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
    grid[y0:y0 + h, x0:x0 + w] = images[i]
  grid = np.clip(np.nan_to_num(grid), 0.0, 1.0)
  out = (grid * 255.0 + 0.5).astype(np.uint8)
  return out[..., 0] if c == 1 else out


def save_image_grid(path: os.PathLike | str, images: np.ndarray, *, ncols: Optional[int] = None,
                    pad: int = 1, scale: int = 0) -> pathlib.Path:
  """Saves images as one tiled PNG.

  Args:
    path: output file.
    images: array of shape [N, H, W, C] (C = 1 or 3), values in [0, 1] (clipped).
    ncols: images per row (default: a square grid).
    pad: white pixels between tiles.
    scale: integer upscaling factor (nearest neighbour); 0 picks one so tiles are at least 56 pixels.

  Returns:
    The path written.
  """
  grid = _to_uint8_grid(images, ncols, pad)
  h = np.asarray(images).shape[1]
  scale = scale or max(1, 56 // max(h, 1))
  img = Image.fromarray(grid)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path)
  return path


def save_nn_grid(path: os.PathLike | str, samples: np.ndarray, neighbours: np.ndarray) -> pathlib.Path:
  """Saves generated images (odd rows) above their nearest training images (even rows).

  Args:
    path: output file.
    samples: array of shape [N, H, W, C].
    neighbours: array of shape [N, H, W, C], the nearest training image of each sample.

  Returns:
    The path written.
  """
  samples, neighbours = np.asarray(samples), np.asarray(neighbours)
  if samples.shape != neighbours.shape:
    raise ValueError(f"samples {samples.shape} and neighbours {neighbours.shape} must have the same shape.")
  ncols = min(8, samples.shape[0])
  rows = []
  for start in range(0, samples.shape[0], ncols):
    chunk_s, chunk_n = samples[start:start + ncols], neighbours[start:start + ncols]
    fill = ncols - chunk_s.shape[0]
    if fill:
      blank = np.ones((fill,) + samples.shape[1:], samples.dtype)
      chunk_s, chunk_n = np.concatenate([chunk_s, blank]), np.concatenate([chunk_n, blank])
    rows += [chunk_s, chunk_n]
  return save_image_grid(path, np.concatenate(rows), ncols=ncols)


def save_scatter(path: os.PathLike | str, points: np.ndarray, *, means: Optional[np.ndarray] = None,
                 title: str = "", reference: Optional[np.ndarray] = None) -> pathlib.Path:
  """Scatter plot of 2-D samples, with optional mode centres and reference data.

  Args:
    path: output file.
    points: array of shape [N, 2].
    means: optional array of shape [K, 2], drawn as red crosses.
    title: figure title.
    reference: optional array of shape [M, 2] (e.g. held-out data), drawn in light grey underneath.

  Returns:
    The path written.
  """
  points = np.asarray(points)
  if points.ndim != 2 or points.shape[1] != 2:
    raise ValueError(f"points must have shape [N, 2], got {points.shape}.")
  fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
  if means is not None:
    ax.scatter(means[:, 0], means[:, 1], s=60, c="tab:red", marker="+", linewidths=0.7, label="mode centres",
               zorder=1)
  if reference is not None:
    ax.scatter(reference[:, 0], reference[:, 1], s=3, c="0.7", label="data", linewidths=0, zorder=2)
  ax.scatter(points[:, 0], points[:, 1], s=3, c="tab:blue", alpha=0.6, label="samples", linewidths=0,
             zorder=3)
  if means is not None:
    span = np.ptp(means, axis=0).max() if means.shape[0] > 1 else 1.0
    lo, hi = means.min(axis=0) - 0.25 * span, means.max(axis=0) + 0.25 * span
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
  ax.set_aspect("equal")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=6, loc="upper right", markerscale=2)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_convergence(path: os.PathLike | str, history: Dict[str, Any]) -> pathlib.Path:
  """Plots the OT solver's L1 marginal error (per step and per window) and batch size.

  Args:
    path: output file.
    history: with ``errors`` [T] (batch L1 marginal error per step), ``window_errors`` [T // window],
      ``window``, ``batch_sizes`` [T], and optionally ``tol`` and ``marginal_noise_floor``.

  Returns:
    The path written.
  """
  errors = np.asarray(history["errors"], np.float64)
  window = int(history.get("window", 1))
  window_errors = np.asarray(history.get("window_errors", []), np.float64)
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  steps = np.arange(1, errors.size + 1)
  if errors.size:
    ax.semilogy(steps, errors, lw=0.6, c="0.6", label="batch L1 marginal error")
  if window_errors.size:
    ax.semilogy(window * np.arange(1, window_errors.size + 1), window_errors, lw=1.5, c="tab:blue",
                label=f"window ({window} steps) L1 error")
  if history.get("tol") is not None:
    ax.axhline(float(history["tol"]), ls="--", c="tab:green", lw=1, label="tolerance")
  ax.set_xlabel("solver step")
  ax.set_ylabel("sum_i |w_i(h) - nu_i|")
  ax.set_title("OT (Brenier potential) convergence", fontsize=10)
  batch = np.asarray(history.get("batch_sizes", []))
  if batch.size:
    ax2 = ax.twinx()
    ax2.step(steps, batch, where="post", c="tab:orange", lw=1, label="batch size")
    ax2.set_ylabel("batch size", color="tab:orange")
    ax2.set_yscale("log", base=2)
  ax.legend(fontsize=7, loc="upper right")
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    if value != value:  # NaN
      return "nan"
    if value.is_integer():
      return str(int(value))
    if abs(value) >= 1000 or (0 < abs(value) < 1e-2):  # three significant digits, also below 0.01
      return f"{value:.3g}"
    return f"{value:.4g}" if abs(value) >= 1 else f"{value:.3f}"
  return str(value)


def metrics_table(methods: Dict[str, Dict[str, float]], labels: Optional[Dict[str, str]] = None, *,
                  columns: Optional[Sequence[str]] = None, titles: Optional[Dict[str, str]] = None,
                  se_columns: Optional[Sequence[str]] = None) -> Tuple[List[str], List[List[str]]]:
  """The metrics as a table: a header and one row per method ("mean ± se" where a ``_se`` exists).

  Args:
    methods: ``{method: {metric: value, metric_se: value, ...}}``.
    labels: display names of the methods.
    columns: the metrics to show, in this order (those that no method has are left out); None: every metric,
      in the report's order.
    titles: the header of a metric (default: its name, with ↑ or ↓ where higher or lower is better).
    se_columns: the metrics that get "± se" where a ``_se`` exists; None: every metric.

  Returns:
    ``(header, rows)`` of strings.
  """
  labels, titles = labels or {}, titles or {}
  keys = set()
  for row in methods.values():
    keys.update(k for k in row if not k.endswith("_se") and k not in ("num_seeds", "memorisation_threshold"))
  if columns is None:
    columns = [k for k in _COLUMN_ORDER if k in keys] + sorted(keys - set(_COLUMN_ORDER))
  else:
    columns = [k for k in columns if k in keys]
  arrows = {True: " ↑", False: " ↓"}
  header = ["method"] + [titles.get(c, c + arrows.get(_HIGHER_IS_BETTER.get(c), "")) for c in columns]
  rows = []
  for method, row in methods.items():
    cells = [labels.get(method, method)]
    for c in columns:
      cell = _fmt(row.get(c))
      if f"{c}_se" in row and (se_columns is None or c in se_columns):
        cell += f" ± {_fmt(row[f'{c}_se'])}"
      cells.append(cell)
    rows.append(cells)
  return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
  """The lines of a Markdown table (``| a | b |``, then ``|---|---|``, then one line per row)."""
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(r) + " |" for r in rows])


def _image_sections(workdir: pathlib.Path, metrics: Dict[str, Any]) -> List[Tuple[str, str]]:
  """(caption, relative path) of every figure that exists, in report order."""
  figures = []
  for method in metrics.get("methods", {}):
    label = metrics.get("labels", {}).get(method, method)
    rel = f"samples/{method}.png"
    if (workdir / rel).exists():
      figures.append((f"Samples: {label}", rel))
  for method in metrics.get("methods", {}):
    # The eval stage's grid; runs made before the stage keys kept it next to the sample grids.
    rel = next((r for r in (f"eval/{method}_nn.png", f"samples/{method}_nn.png") if (workdir / r).exists()), None)
    if rel is not None:
      label = metrics.get("labels", {}).get(method, method)
      figures.append((f"{label}: samples (odd rows) over their nearest training images (even rows)", rel))
  if (workdir / "ae/recon.png").exists():
    figures.append(("Autoencoder: held-out data and reconstructions", "ae/recon.png"))
  return figures


# The "At a glance" figure of each kind of data, ``kind -> (path relative to the workdir, caption)``; drawn
# by :func:`lsot_jax.stages.draw_figures`.
GLANCE_FIGURES = {
    "points": ("samples/methods_panel.png", "All methods side by side: the held-out data, each method's "
               "samples (grey: the data) and, when the codes are the data, the potential's source cells"),
    "image": ("samples/interpolation.png", "The exact and extended maps along a line between two source "
              "points, decoded (red: the exact map changes cell)"),
}


def write_report(workdir: os.PathLike | str) -> Tuple[pathlib.Path, pathlib.Path]:
  """Writes ``report.md`` and ``report.html`` in ``workdir`` from the pipeline's outputs.

  Args:
    workdir: a pipeline workdir holding ``metrics.json``.

  Returns:
    The paths of the Markdown and HTML reports.

  Raises:
    FileNotFoundError: if ``metrics.json`` is missing (run the eval stage first).
  """
  workdir = pathlib.Path(os.path.abspath(os.fspath(workdir)))
  metrics_path = workdir / workdir_lib.METRICS
  if not metrics_path.exists():
    raise FileNotFoundError(f"{metrics_path} not found; run the eval stage first.")
  metrics = json.loads(metrics_path.read_text())
  history_path = workdir / "ot" / "history.json"
  history = json.loads(history_path.read_text()) if history_path.exists() else None
  if history is not None and not (workdir / "ot" / "convergence.png").exists():
    plot_convergence(workdir / "ot" / "convergence.png", history)
  header, rows = metrics_table(metrics.get("methods", {}), metrics.get("labels"))
  figures = _image_sections(workdir, metrics)

  facts = [f"dataset: **{metrics.get('dataset')}** ({metrics.get('kind')}), feature space: "
           f"{metrics.get('feature_space')}, {metrics.get('num_samples')} samples per method"
           + (f", mean ± standard error over {metrics['num_seeds']} sampling seeds"
              if metrics.get("num_seeds", 1) > 1 else "")]
  if metrics.get("classifier_test_accuracy") is not None:
    facts.append(f"evaluation classifier test accuracy: {metrics['classifier_test_accuracy']:.4f}")
  ae = metrics.get("ae") or {}
  if ae.get("test_mse") is not None:
    facts.append(f"autoencoder ({ae.get('kind')}, latent dim {ae.get('latent_dim')}): held-out "
                 f"reconstruction MSE {ae['test_mse']:.5f}")
  ot = metrics.get("ot") or {}
  if ot:
    bound = ot.get("marginal_l1_bound")
    facts.append(f"OT ({ot.get('solver', 'adam')} solver): {ot.get('num_codes')} codes, {ot.get('iterations')} "
                 f"solver steps, converged: {ot.get('converged')}, L1 marginal error {_fmt(ot.get('marginal_l1'))} "
                 f"(Monte-Carlo noise floor {_fmt(ot.get('marginal_noise_floor'))}"
                 + ("" if bound is None else f"; unbiased chi^2 {_fmt(ot.get('marginal_chi2'))}, L1 bound "
                    f"sqrt(chi^2) {_fmt(bound)}")
                 + f"), max relative cell-mass error {_fmt(ot.get('marginal_max_rel'))}")
    if ot.get("schedule_done"):
      facts.append("the Newton solver ran its whole sample schedule: its error is that schedule's noise floor "
                   "(raise ot.newton.max_samples for a lower one)")
    elif ot.get("converged") is False:
      facts.append(f"the OT fit did not converge: it stopped at its step budget ({ot.get('iterations')} steps) above "
                   "its tolerance; raise ot.num_iterations (ot.newton.num_iterations for Newton) for a converged fit")
  setting = metrics.get("setting") or {}
  if setting:
    keys = setting.get("keys", {})
    shown = ", ".join(f"{k}={v!r}" for k, v in sorted({**setting.get("sample", {}),
                                                        **setting.get("eval", {})}.items()))
    facts.append(f"setting shown: sample key {keys.get('sample')}, eval key {keys.get('eval')} ({shown})")
    if setting.get("superseded"):
      facts.append("results of earlier settings, kept: " + ", ".join(
          f"{workdir_lib.SUPERSEDED}/{name}" for name in setting["superseded"]))
  seconds = metrics.get("stage_seconds") or {}
  if any(v is not None for v in seconds.values()):
    facts.append("stage seconds (last run of each): " + ", ".join(
        f"{k} {v:.0f}" for k, v in seconds.items() if v is not None))

  md = ["# lsot_jax run report", ""]
  md += [f"- {f}" for f in facts] + [""]
  md += ["## Metrics", ""] + markdown_table(header, rows)
  md += ["", "↑ higher is better, ↓ lower is better. Memorisation rate: share of samples closer to a training "
         "example than the median held-out example is (about 0.5 for fresh samples, 1 for copies).", ""]
  glance = [(caption, rel) for rel, caption in GLANCE_FIGURES.values() if (workdir / rel).exists()]
  if glance:
    md += ["## At a glance", ""]
    for caption, rel in glance:
      md += [f"![{caption}]({rel})", "", caption, ""]
  if history is not None:
    md += ["## OT convergence", "", "![OT convergence](ot/convergence.png)", ""]
  md += ["## Figures", ""]
  for caption, rel in figures:
    md += [f"### {caption}", "", f"![{caption}]({rel})", ""]
  md_path = workdir / "report.md"
  md_path.write_text("\n".join(md))

  esc = html.escape
  page = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>lsot_jax report</title>",
          "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
          "img{max-width:100%;image-rendering:pixelated}</style></head><body>",
          "<h1>lsot_jax run report</h1><ul>"]
  page += [f"<li>{esc(f).replace('**', '')}</li>" for f in facts]
  page += ["</ul><h2>Metrics</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
  page += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
  page += ["</table>"]
  if glance:
    page += ["<h2>At a glance</h2>"]
    page += [f"<p><img src='{esc(rel)}' alt='{esc(caption)}'><br>{esc(caption)}</p>" for caption, rel in glance]
  if history is not None:
    page += ["<h2>OT convergence</h2><img src='ot/convergence.png' alt='OT convergence'>"]
  page += ["<h2>Figures</h2>"]
  for caption, rel in figures:
    page += [f"<h3>{esc(caption)}</h3><img src='{esc(rel)}' alt='{esc(caption)}'>"]
  page += ["</body></html>"]
  html_path = workdir / "report.html"
  html_path.write_text("\n".join(page))
  return md_path, html_path
