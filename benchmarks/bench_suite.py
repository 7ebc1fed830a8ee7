"""Benchmark suite: lsot_jax against ott-jax's semi-discrete solver and Sinkhorn, over n and d.

For each problem (n codes from an 8-cluster mixture in R^d, standard Gaussian source) it measures, in one
process on one machine, the solver time needed to reach an L1 marginal error of ``--target`` (0.1),
evaluated on a fixed source sample large enough that its noise floor is about a quarter of the target:

* lsot_jax's :class:`BrenierSolver` (``bench_solver.time_lsot``: timed in chunks of steps, evaluation
  excluded);
* ott-jax's ``SemidiscreteSolver`` via ``lsot_jax.ott_interop.ott_semidiscrete_solve`` at the best of a
  small Adam grid (``bench_solver.time_ott``: doubling iteration budgets, each compiled, then timed);
* ott-jax ``Sinkhorn`` on ``PointCloud(x_samples, y)`` (M sampled source points, no ``batch_size=``: ott-jax
  0.6's online mode fails with jax >= 0.9, ott-jax issue 700, so the [M, n] cost matrix is dense), with
  epsilon = ``--sinkhorn-epsilon`` times the mean cost; its target potential g gives heights
  h = (g - |y|^2) / 2 and the same power-diagram evaluation. M doubles from 16 n until the target is met, the
  time cap is spent, or the dense cost matrix would exceed ``--memory-cap-gib``.

Speed is reported as ratios (other method's time / lsot_jax's time) measured in the same run; a ratio
marked ">" is a lower bound (the other method did not reach the target within its caps). Peak memory is
XLA's compiled estimate (arguments + outputs + temporaries) of the largest configuration each method ran.
It also reports the assignment kernel's throughput as a fraction of the machine's dense matmul throughput
(``bench_solver.matmul_vs_kernel``) and draws a log-log plot of time and memory against n.

Usage:
  python benchmarks/bench_suite.py --quick    # n = 1,000, d = 16, one ott point; ~10 min on 2 busy cores
  python benchmarks/bench_suite.py            # n in {1k, 10k, 100k} x d in {16, 64}: for a GPU
  # part of the full grid on a CPU, one ott-jax grid point, 240 s caps:
  python benchmarks/bench_suite.py --sizes 10000x16,10000x64 --ott-grid 3e-2:1024 --max-seconds 240

``jax.devices()`` decides where it runs. Results: ``benchmarks/results/suite_<backend>[_quick | _<sizes>].json``,
``.md`` and ``.png``. Absolute times on a shared machine are noise; only the ratios mean anything.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from ott.geometry import pointcloud
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_solver  # pylint: disable=g-import-not-at-top,wrong-import-position

from lsot_jax import ott_interop  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsot_jax import solver as solver_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsot_jax import sources  # pylint: disable=g-import-not-at-top,wrong-import-position

__all__ = [
    "bench_problem",
    "eval_samples_for",
    "main",
    "time_sinkhorn",
    "xla_peak_bytes",
]

RESULTS = bench_solver.RESULTS
FULL_GRID = tuple((n, d) for d in (16, 64) for n in (1000, 10_000, 100_000))
QUICK_GRID = ((1000, 16),)
FULL_OTT_GRID = ((1e-2, 1024), (3e-2, 1024), (1e-2, 4096), (3e-2, 4096))
QUICK_OTT_GRID = ((3e-2, 1024),)


def eval_samples_for(n: int, target: float) -> int:
  """Evaluation sample size (a power of 2) whose L1 noise floor ~0.8 sqrt(n / M) is about target / 4."""
  return 2 ** math.ceil(math.log2(n * (4 * 0.8 / target) ** 2))


def xla_peak_bytes(jitted, *args) -> Optional[int]:
  """XLA's compiled memory estimate (arguments + outputs + temporaries) of ``jitted(*args)``."""
  analysis = jitted.lower(*args).compile().memory_analysis()
  if analysis is None:
    return None
  return int(sum(getattr(analysis, f, 0) or 0 for f in
                 ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")))


def _sinkhorn_fn(num_samples: int, epsilon_rel: float, max_iterations: int):
  def solve(key, problem):
    x = problem.source.sample(key, num_samples)
    geom = pointcloud.PointCloud(x, problem.y, epsilon=epsilon_rel, relative_epsilon="mean")
    out = sinkhorn.Sinkhorn(max_iterations=max_iterations)(
        linear_problem.LinearProblem(geom, b=problem.weights)
    )
    return ott_interop.g_to_h(out.g, problem.y), out.converged

  return jax.jit(solve)


def time_sinkhorn(problem, evaluate, target: float, max_seconds: float, memory_cap_bytes: float,
                  epsilon_rel: float = 0.002, start_factor: int = 16,
                  max_iterations: int = 3000) -> Dict[str, Any]:
  """ott-jax Sinkhorn on M sampled source points: the smallest doubling M whose heights reach the target.

  Returns the time of that single solve (compilation and evaluation excluded), or of the last one tried.
  """
  n = problem.num_targets
  num_samples, spent, trace = start_factor * n, 0.0, []
  key = jax.random.key(7)
  last = None
  while True:
    if num_samples * n * 4 > memory_cap_bytes:
      reason = (f"dense cost matrix [{num_samples}, {n}] = {num_samples * n * 4 / 2**30:.1f} GiB exceeds "
                f"the {memory_cap_bytes / 2**30:.1f} GiB cap")
      break
    fn = _sinkhorn_fn(num_samples, epsilon_rel, max_iterations)
    jax.block_until_ready(fn(key, problem))  # compile
    start = time.perf_counter()
    h, converged = jax.block_until_ready(fn(key, problem))
    seconds = time.perf_counter() - start
    spent += seconds
    err, _ = evaluate(h)
    last = dict(seconds=seconds, num_samples=num_samples, l1=err, sinkhorn_converged=bool(converged),
                peak_bytes=xla_peak_bytes(fn, key, problem))
    trace.append((num_samples, seconds, err))
    print(f"  sinkhorn M={num_samples}: {seconds:.2f}s l1={err:.3f}", flush=True)
    if err <= target:
      return dict(last, reached=True, feasible=True, epsilon_rel=epsilon_rel, trace=trace)
    if spent > max_seconds:
      reason = f"time cap {max_seconds:.0f}s spent"
      break
    num_samples *= 2
  if last is None:
    return dict(seconds=None, reached=False, feasible=False, reason=reason, epsilon_rel=epsilon_rel,
                trace=trace, peak_bytes=None, l1=None, num_samples=None)
  return dict(last, reached=False, feasible=True, reason=reason, epsilon_rel=epsilon_rel, trace=trace)


def _lsot_peak_bytes(problem, chunk: int) -> Optional[int]:
  solver = solver_lib.BrenierSolver(tol=0.0, num_iterations=4000)
  state = solver.init(problem)
  return xla_peak_bytes(jax.jit(solver.run), jax.random.key(7), problem, state, chunk)


def _ott_peak_bytes(problem, num_iterations: int, batch_size: int, learning_rate: float) -> Optional[int]:
  def solve(rng, prob):
    return ott_interop.ott_semidiscrete_solve(
        rng, prob, num_iterations=num_iterations, batch_size=batch_size, learning_rate=learning_rate
    )[0].h

  return xla_peak_bytes(jax.jit(solve), jax.random.key(7), problem)


def _ratio(other: Dict[str, Any], ours: Dict[str, Any]) -> Dict[str, Any]:
  """other / lsot time; for ott's bracketed time the lower end (``seconds_low``), so it is conservative."""
  if not other.get("feasible", True) or other.get("seconds") is None:
    return dict(ratio=None, lower_bound=False)
  seconds = other.get("seconds_low", other["seconds"])
  if not ours["reached"]:
    return dict(ratio=seconds / ours["seconds"], lower_bound=False, lsot_not_reached=True)
  return dict(ratio=seconds / ours["seconds"], lower_bound=not other["reached"] or "seconds_low" in other)


def bench_problem(n: int, d: int, target: float, max_seconds: float, memory_cap_bytes: float,
                  ott_grid, chunk: int, sinkhorn_epsilon: float) -> Dict[str, Any]:
  """All three methods on one (n, d) problem; see the module docstring."""
  y = bench_solver.mixture_codes(jax.random.key(0), n, d)
  problem = solver_lib.make_problem(y, source=sources.Gaussian(dim=d))
  num_eval = eval_samples_for(n, target)
  evaluate = bench_solver.Evaluator(problem, num_eval, target)
  floor = evaluate.floor
  print(f"n={n} d={d}: eval on {num_eval} samples (noise floor {floor:.3f})", flush=True)

  ours = bench_solver.time_lsot(problem, evaluate, max_seconds, chunk=chunk, num_iterations=4000)
  ours["peak_bytes"] = _lsot_peak_bytes(problem, chunk)
  print(f"  lsot: {ours['seconds']:.2f}s it={ours['iterations']} l1={ours['l1']:.3f}", flush=True)

  grid = []
  for lr, batch in ott_grid:
    res = bench_solver.time_ott(problem, evaluate, max_seconds, lr, batch)
    res.update(learning_rate=lr, batch_size=batch)
    grid.append(res)
  ott_best = bench_solver.ott_best(grid)
  ott_best["peak_bytes"] = _ott_peak_bytes(problem, ott_best["iterations"], ott_best["batch_size"],
                                           ott_best["learning_rate"])

  sk = time_sinkhorn(problem, evaluate, target, max_seconds, memory_cap_bytes, sinkhorn_epsilon)
  return dict(n=n, d=d, target_l1=target, eval_samples=num_eval, eval_noise_floor_l1=floor,
              lsot=ours, ott_grid=grid, ott_best=ott_best, sinkhorn=sk,
              ott_ratio=_ratio(ott_best, ours), sinkhorn_ratio=_ratio(sk, ours))


def _gib(b: Optional[int]) -> str:
  return "n/a" if b is None else f"{b / 2**30:.3f}"


def _fmt_ratio(r: Dict[str, Any]) -> str:
  if r["ratio"] is None:
    return "infeasible"
  return f"{'>' if r['lower_bound'] else ''}{r['ratio']:.1f}x" + (" (lsot not reached)" if r.get(
      "lsot_not_reached") else "")


def _markdown(res: Dict[str, Any]) -> str:
  lines = [f"# Benchmark suite on {res['device']} ({res['platform']})", "", f"Command: `{res['command']}`",
           "", "## Assignment kernel throughput (fraction of dense 2048^3 float32 matmul)", "",
           "| d | n | M | matmul GFLOP/s | lsot_jax tiled kernel | XLA argmax(x @ y.T + h) |",
           "|---|---|---|---|---|---|"]
  for k in res["kernel"]:
    lines.append(f"| {k['d']} | {k['n']} | {k['m']} | {k['matmul_gflops']:.0f} | {k['lsot_fraction']:.0%} | "
                 f"{k['xla_argmax_fraction']:.0%} |")
  lines += ["", f"## Time to L1 marginal error <= {res['target_l1']} (ratios: method time / lsot_jax time, "
            "same run)", "",
            "| n | d | eval samples (floor) | lsot_jax s (iters) | ott Semidiscrete s, bracket (lr, batch, iters) | "
            "ott / lsot | Sinkhorn s (M, l1) | Sinkhorn / lsot | peak GiB lsot / ott / Sinkhorn |",
            "|---|---|---|---|---|---|---|---|---|"]
  for t in res["problems"]:
    o, b, s = t["lsot"], t["ott_best"], t["sinkhorn"]
    sk = (f"{s['seconds']:.2f} ({s['num_samples']}, {s['l1']:.3f})" if s["feasible"] else
          f"- ({s['reason']})")
    lines.append(
        f"| {t['n']} | {t['d']} | {t['eval_samples']} ({t['eval_noise_floor_l1']:.3f}) | "
        f"{o['seconds']:.2f} ({o['iterations']}{'' if o['reached'] else ', not reached'}) | "
        f"{b['seconds_low']:.2f}-{b['seconds']:.2f} ({b['learning_rate']}, {b['batch_size']}, {b['iterations']}"
        f"{'' if b['reached'] else ', not reached'}) | {_fmt_ratio(t['ott_ratio'])} | {sk} | "
        f"{_fmt_ratio(t['sinkhorn_ratio'])} | {_gib(o['peak_bytes'])} / {_gib(b['peak_bytes'])} / "
        f"{_gib(s['peak_bytes'])} |")
  lines += ["", "Sinkhorn: ott-jax `Sinkhorn` on `PointCloud(x_samples, y)` (dense cost matrix), epsilon = "
            f"{res['sinkhorn_epsilon']} x mean cost, M doubling from 16 n; a ratio with '>' is a lower bound "
            "(target not reached within the caps, or, for ott Semidiscrete, the lower end of its bracket: its "
            "time lies between the last doubling budget that missed the target and the first that reached it). Peak memory: XLA's compiled estimate (arguments + outputs + "
            "temporaries) of the largest configuration run.", "", f"Plot: `{res['plot']}`"]
  return "\n".join(lines) + "\n"


def _plot(res: Dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  dims = sorted({t["d"] for t in res["problems"]})
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  styles = {"lsot_jax": ("lsot", "tab:blue"), "ott Semidiscrete": ("ott_best", "tab:orange"),
            "ott Sinkhorn (samples)": ("sinkhorn", "tab:green")}
  for d, ls in zip(dims, ("-", "--", ":")):
    probs = sorted([t for t in res["problems"] if t["d"] == d], key=lambda t: t["n"])
    for label, (key, color) in styles.items():
      for ax, field in zip(axes, ("seconds", "peak_bytes")):
        if field == "seconds":  # ott's bracketed time is plotted at its lower end
          pts = [(t["n"], t[key].get("seconds_low", t[key]["seconds"]), t[key]["reached"]) for t in probs
                 if t[key].get(field)]
        else:
          pts = [(t["n"], t[key][field], t[key]["reached"]) for t in probs if t[key].get(field)]
        if not pts:
          continue
        scale = 1.0 if field == "seconds" else 2.0**-30
        ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], ls=ls, color=color, label=f"{label}, d={d}")
        for n, v, ok in pts:
          ax.scatter([n], [v * scale], color=color, facecolors=color if ok else "none", zorder=3)
  axes[0].set_ylabel(f"seconds to L1 <= {res['target_l1']} (hollow: not reached)")
  axes[1].set_ylabel("peak memory, GiB (XLA estimate)")
  for ax in axes:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n (number of codes)")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{res['device']}: cost against n", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: List[str] | None = None) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="n = 1,000, d = 16, one ott-jax grid point")
  parser.add_argument("--target", type=float, default=0.1, help="L1 marginal error to reach")
  parser.add_argument("--repeats", type=int, default=None, help="kernel-throughput repeats (7; quick 5)")
  parser.add_argument("--max-seconds", type=float, default=None,
                      help="time cap per method and problem (quick 60, full 600)")
  parser.add_argument("--memory-cap-gib", type=float, default=None,
                      help="largest dense Sinkhorn cost matrix (quick 2, full 16)")
  parser.add_argument("--sinkhorn-epsilon", type=float, default=0.002,
                      help="Sinkhorn epsilon relative to the mean cost")
  parser.add_argument("--sizes", default=None,
                      help="comma-separated NxD problems, e.g. 10000x16,10000x64 (default: the quick or full grid)")
  parser.add_argument("--ott-grid", default=None,
                      help="comma-separated lr:batch points of ott-jax's Adam grid, e.g. 3e-2:1024")
  args = parser.parse_args(argv)
  quick = args.quick
  try:
    sizes = (tuple(tuple(int(v) for v in item.split("x")) for item in args.sizes.split(","))
             if args.sizes else (QUICK_GRID if quick else FULL_GRID))
    ott_grid = (tuple((float(item.split(":")[0]), int(item.split(":")[1])) for item in args.ott_grid.split(","))
                if args.ott_grid else (QUICK_OTT_GRID if quick else FULL_OTT_GRID))
  except (ValueError, IndexError):
    parser.error(f"--sizes takes NxD,... (got {args.sizes!r}); --ott-grid takes lr:batch,... "
                 f"(got {args.ott_grid!r}).")
  if any(len(size) != 2 for size in sizes):
    parser.error(f"--sizes takes NxD,... (got {args.sizes!r}).")
  repeats = args.repeats or (5 if quick else 7)
  max_seconds = args.max_seconds or (60.0 if quick else 600.0)
  memory_cap = (args.memory_cap_gib or (2.0 if quick else 16.0)) * 2**30
  device = jax.devices()[0]
  suffix = "_" + args.sizes.replace(",", "-") if args.sizes else ("_quick" if quick else "")
  tag = f"{jax.default_backend()}{suffix}"
  os.makedirs(RESULTS, exist_ok=True)
  res = dict(device=device.device_kind,
             platform=f"{jax.default_backend()}, {platform.processor() or platform.machine()}, "
                      f"{os.cpu_count()} cores, jax {jax.__version__}",
             command=" ".join(["python benchmarks/bench_suite.py", *(sys.argv[1:] if argv is None else argv)]),
             target_l1=args.target, sinkhorn_epsilon=args.sinkhorn_epsilon,
             plot=os.path.join("benchmarks", "results", f"suite_{tag}.png"))
  print("kernel throughput ...", flush=True)
  res["kernel"] = [bench_solver.matmul_vs_kernel(d, 2048, 16384, repeats) for d in (16, 64)]
  for k in res["kernel"]:
    print(f"  d={k['d']}: lsot {k['lsot_fraction']:.0%}, xla argmax {k['xla_argmax_fraction']:.0%}", flush=True)
  res["problems"] = []
  for n, d in sizes:
    res["problems"].append(bench_problem(
        n, d, args.target, max_seconds, memory_cap, ott_grid,
        chunk=20 if quick else 10, sinkhorn_epsilon=args.sinkhorn_epsilon))
    with open(os.path.join(RESULTS, f"suite_{tag}.json"), "w") as f:  # partial results survive a crash
      json.dump(res, f, indent=1)
  _plot(res, os.path.join(RESULTS, f"suite_{tag}.png"))
  with open(os.path.join(RESULTS, f"suite_{tag}.md"), "w") as f:
    f.write(_markdown(res))
  print(_markdown(res))
  return res


if __name__ == "__main__":
  main()
