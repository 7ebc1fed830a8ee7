"""Newton vs Adam vs ott-jax: true marginal error against wall time and against samples scored, in one run.

For each problem, every solver's heights are measured on one fixed evaluation sample far larger than n (its
L1 error, and the unbiased chi^2 bound sqrt(chi^2) >= L1 from the same counts); evaluation time is excluded
from the solver times. Solvers:

* ``newton``: :class:`lsot_jax.newton.NewtonSolver` (defaults unless ``--newton`` overrides; several
  variants separated by ``;`` each run, named ``newton k=v``), one step per timed chunk (a chunked run
  equals one run).
* ``adam``: :class:`lsot_jax.solver.BrenierSolver` (defaults, ``tol = 0``), timed in chunks of 10 steps.
* ``ott``: ott-jax's ``SemidiscreteSolver`` tuned as a user would: Adam at constant step sizes and under a
  cosine decay, at batch 4,096 (``--ott`` sets the grid). ott's EMA and optimiser state cannot be carried
  across calls, so each point of its curve is a fresh run with a doubled step budget (compiled first).

Outputs ``benchmarks/results/newton_<tag>.{json,md,png}``: the curves, and per solver the time and the
samples scored until the error first reached the problem's target, with ratios against Newton.

Usage:
  python benchmarks/bench_newton.py --problems mix2k,grid25          # minutes on a 2-core CPU
  python benchmarks/bench_newton.py --problems mix20k --max-seconds 600
  python benchmarks/bench_newton.py --problems mnist --workdir runs/mnist   # the codes of a `make run`

Problems: ``mix2k`` n = 2,000, d = 16, 8 Gaussian clusters (target L1 0.05); ``grid25`` the points of
``configs/grid25.py``'s 25-Gaussian grid (5,000 points) in data space (target 0.05); ``mix20k`` n = 20,000, d = 64 (target
0.1); ``mnist`` the 60,000 codes (d = 32) of a workdir's encode stage (target 0.3).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from typing import Any, Callable, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_solver import mixture_codes  # pylint: disable=wrong-import-position

from lsot_jax import data as data_lib  # pylint: disable=wrong-import-position
from lsot_jax import newton as newton_lib  # pylint: disable=wrong-import-position
from lsot_jax import publish  # pylint: disable=wrong-import-position
from lsot_jax import ott_interop  # pylint: disable=wrong-import-position
from lsot_jax import solver as solver_lib  # pylint: disable=wrong-import-position
from lsot_jax import sources  # pylint: disable=wrong-import-position

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGETS = {"mix2k": 0.05, "grid25": 0.05, "mix20k": 0.1, "mnist": 0.3}


def load_problem(name: str, workdir: str | None) -> solver_lib.SemidiscreteProblem:
  """The named problem (see the module docstring)."""
  if name == "mix2k":
    return solver_lib.make_problem(mixture_codes(jax.random.key(0), 2000, 16))
  if name == "mix20k":
    return solver_lib.make_problem(mixture_codes(jax.random.key(0), 20000, 64))
  if name == "grid25":
    return solver_lib.make_problem(data_lib.load_dataset("grid", "train", num_examples=5000, seed=0).x)
  if name == "mnist":
    if workdir is None:
      raise SystemExit("--problems mnist needs --workdir of a run whose encode stage is finished.")
    from lsot_jax import pipeline  # pylint: disable=import-outside-toplevel
    codes = pipeline.load_encoded_codes(workdir)
    return solver_lib.make_problem(codes)
  raise SystemExit(f"Unknown problem {name!r}; use {', '.join(TARGETS)}.")


def make_evaluator(problem, num_eval: int) -> Callable[[jax.Array], Dict[str, float]]:
  """h -> L1 and unbiased bound on a fixed sample of ``num_eval`` source points."""
  key = jax.random.key(12345)

  @jax.jit
  def errors(h, problem):
    pot = solver_lib.BrenierPotential(y=problem.y, h=solver_lib.masked_heights(h, problem.weights))
    return pot.marginal_errors(key, problem.source, problem.weights, num_eval)

  def evaluate(h):
    e = errors(h, problem)
    return dict(l1=float(e["l1"]), bound=float(e["l1_bound"]))

  return evaluate


def _print_step(record: Dict[str, Any]) -> None:
  """The solver's progress callback: its own view of each step (no evaluation cost)."""
  print(f"      step {record['step']}: stage {record['stage']}, M {record['num_samples']}, sample L1 "
        f"{record['l1']:.4f}, alpha {record['alpha']:.3g}, empty {record['empty']}", flush=True)


def run_newton(problem, evaluate, max_seconds: float, eval_every_step: bool = True, **kwargs) -> Dict[str, Any]:
  """One Newton run, evaluated after every step (or, sparse, at stage ends and after each averaging step)."""
  solver = newton_lib.NewtonSolver(**dict(dict(callback=_print_step), **kwargs))
  averaging = 1 if solver.averages(problem.num_targets) else -1
  run = jax.jit(solver.run, static_argnames="num_steps")
  rng = jax.random.key(7)
  init = jax.jit(solver.init)
  jax.block_until_ready(run(rng, problem, init(problem), num_steps=1))  # compile
  # The start (the coarse levels of the multiscale start) is part of the solve: timed, and its work is
  # in samples_scored.
  start = time.perf_counter()
  state = jax.block_until_ready(init(problem))
  elapsed, curve, stage = time.perf_counter() - start, [], 0
  curve.append(dict(seconds=elapsed, samples=float(state.samples_scored), step=0, sample_size=0,
                    **evaluate(state.h)))
  while not bool(solver.finished(problem, state)) and elapsed < max_seconds:
    start = time.perf_counter()
    state = jax.block_until_ready(run(rng, problem, state, num_steps=1))
    elapsed += time.perf_counter() - start
    it = int(state.it)
    # Without eval_every_step, only stage ends are measured: a chunk that moved to the next stage ends with a
    # fresh evaluation, which leaves the heights of the previous stage's last step.
    last = bool(solver.finished(problem, state)) or elapsed >= max_seconds
    stage_end = int(state.stage) != stage
    stage = int(state.stage)
    if not (eval_every_step or stage_end or last or stage == averaging):
      continue
    curve.append(dict(seconds=elapsed, samples=float(state.samples_scored), step=it,
                      sample_size=int(state.sample_sizes[it - 1]), **evaluate(state.h)))
    print(f"    newton step {it}: {elapsed:.1f}s, M {curve[-1]['sample_size']}, L1 {curve[-1]['l1']:.4f} "
          f"(bound {curve[-1]['bound']:.4f})", flush=True)
  name = " ".join(["newton"] + [f"{k}={v}" for k, v in kwargs.items()])
  return dict(name=name, settings=kwargs, curve=curve, error_bound=float(state.error_bound),
              effective_sample_size=solver.effective_sample_size(problem.num_targets))


def run_adam(problem, evaluate, max_seconds: float, chunk: int = 10, eval_every: float = 0.0,
             **kwargs) -> Dict[str, Any]:
  solver = solver_lib.BrenierSolver(tol=0.0, num_iterations=kwargs.pop("num_iterations", 5000), **kwargs)
  run = jax.jit(solver.run, static_argnames="num_steps")
  rng = jax.random.key(7)
  jax.block_until_ready(run(rng, problem, solver.init(problem), num_steps=chunk))
  state = solver.init(problem)
  elapsed, curve, last_eval = 0.0, [], -float("inf")
  while int(state.it) < solver.num_iterations and elapsed < max_seconds:
    start = time.perf_counter()
    state = jax.block_until_ready(run(rng, problem, state, num_steps=chunk))
    elapsed += time.perf_counter() - start
    it = int(state.it)
    if elapsed - last_eval < eval_every and elapsed < max_seconds and it < solver.num_iterations:
      continue
    last_eval = elapsed
    samples = float(np.sum(np.asarray(state.batch_sizes[:it], np.float64)))
    curve.append(dict(seconds=elapsed, samples=samples, step=it, **evaluate(state.h)))
    print(f"    adam step {it}: {elapsed:.1f}s, L1 {curve[-1]['l1']:.4f} (bound {curve[-1]['bound']:.4f})", flush=True)
  return dict(name="adam", settings=kwargs, curve=curve)


def run_ott(problem, evaluate, max_seconds: float, learning_rate: float, schedule: str, batch_size: int,
            target: float, start_iterations: int = 125) -> Dict[str, Any]:
  """ott-jax from scratch for doubling budgets.

  Each point is a run of its own, timed alone. Stops at the target (``CRITERION``), or before a run whose
  doubled budget would, at the last run's speed, take longer than ``max_seconds``.
  """
  lr = 2.0 * float(problem.scale) * learning_rate  # ott's g = 2 h + |y|^2: the same relative step

  def solve(rng, problem, budget):
    rate = optax.cosine_decay_schedule(lr, budget) if schedule == "cosine" else lr
    pot, _ = ott_interop.ott_semidiscrete_solve(rng, problem, num_iterations=budget, batch_size=batch_size,
                                                learning_rate=rate)
    return pot.h

  budget, curve = start_iterations, []
  while True:
    compiled = jax.jit(solve, static_argnums=2).lower(jax.random.key(7), problem, budget).compile()
    start = time.perf_counter()
    h = jax.block_until_ready(compiled(jax.random.key(7), problem))
    seconds = time.perf_counter() - start
    curve.append(dict(seconds=seconds, samples=float(budget * batch_size), step=budget, **evaluate(h)))
    print(f"    ott {schedule} lr {learning_rate} batch {batch_size} it {budget}: {seconds:.1f}s, "
          f"L1 {curve[-1]['l1']:.4f} (bound {curve[-1]['bound']:.4f})", flush=True)
    if curve[-1][CRITERION] <= target:
      break
    if 2.0 * seconds > max_seconds:
      print(f"    ott: {2 * budget} iterations would take ~{2 * seconds:.0f}s, past the {max_seconds:.0f}s cap",
            flush=True)
      break
    budget *= 2
  return dict(name=f"ott {schedule} {learning_rate:g} x {batch_size}", settings=dict(
      learning_rate=learning_rate, schedule=schedule, batch_size=batch_size), curve=curve)


CRITERION = "l1"


def first_at(curve: Sequence[Dict[str, float]], target: float) -> Dict[str, float] | None:
  """The first curve point whose error (``CRITERION``: the L1, or the unbiased bound) is <= target."""
  for point in curve:
    if point[CRITERION] <= target:
      return point
  return None


def summarise(result: Dict[str, Any]) -> None:
  """Adds per-solver time / samples to the target and the ratios against Newton: the Newton run (of the
  ``--newton`` variants) first to reach the target, or the first variant if none did."""
  target = result["target"]
  runs = [s for s in result["solvers"] if s["name"].startswith("newton")]
  hits = [(first_at(s["curve"], target), i) for i, s in enumerate(runs)]
  reached = [(hit["seconds"], i) for hit, i in hits if hit is not None]
  ref = min(reached)[1] if reached else 0
  newton = hits[ref][0]
  result["reference"] = runs[ref]["name"]
  for s in result["solvers"]:
    hit = first_at(s["curve"], target)
    best = min(s["curve"], key=lambda p: p["l1"])
    s["reached"] = hit is not None
    s["seconds_to_target"] = hit["seconds"] if hit else None
    s["samples_to_target"] = hit["samples"] if hit else None
    s["best_l1"] = best["l1"]
    s["best_bound"] = best["bound"]
    s["total_seconds"] = max(p["seconds"] for p in s["curve"])
    if newton is not None and hit is not None:
      s["time_ratio_vs_newton"] = hit["seconds"] / newton["seconds"]
    elif newton is not None:
      # Not reached within the cap: the ratio is at least the time it ran over Newton's time.
      s["time_ratio_vs_newton_at_least"] = s["total_seconds"] / newton["seconds"]
  final = runs[ref]["curve"][-1]
  result["newton_final_sample"] = final.get("sample_size")
  if final.get("sample_size"):
    size = final["sample_size"]
    # The floor in the criterion's own terms: the L1 floor for L1, sqrt(E chi^2) of a size-M histogram for
    # the bound (comparing the bound with the L1 floor would ask for ~0.8x the noise of the final sample).
    floor = solver_lib.noise_floor_l1 if result["criterion"] == "l1" else solver_lib.noise_floor_bound
    result["newton_final_floor"] = float(floor(result["weights"], size))
    at = first_at(runs[ref]["curve"], 1.5 * result["newton_final_floor"])
    result["newton_samples_to_1p5_floor_over_final_size"] = None if at is None else at["samples"] / size


def plot(result: Dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  key = result["criterion"]  # the plotted error is the one compared with the target
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
  for s in result["solvers"]:
    c = s["curve"]
    style = dict(marker="o", ms=3, lw=1.2 if s["name"].startswith("newton") else 0.9)
    axes[0].loglog([p["seconds"] for p in c], [p[key] for p in c], label=s["name"], **style)
    axes[1].loglog([p["samples"] / result["n"] for p in c], [p[key] for p in c], label=s["name"], **style)
  for ax, xlabel in zip(axes, ("solver seconds", "source samples scored / n")):
    ax.axhline(result["target"], ls="--", c="0.5", lw=0.8)
    if key == "l1":  # the evaluation sample's floor bounds its measured L1, not the unbiased bound
      ax.axhline(result["eval_floor"], ls=":", c="0.5", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("L1 marginal error on the evaluation sample" if key == "l1"
                  else "unbiased sqrt(chi^2) bound (>= true L1)")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{result['problem']}: n = {result['n']}, d = {result['d']} ({result['machine']})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def markdown(results: List[Dict[str, Any]], command: str) -> str:
  lines = [f"# Newton vs Adam vs ott-jax ({results[0]['machine']})", "", f"Command: `{command}`", "",
           "Time and samples scored until the error ("
           + ("the L1 on a fixed evaluation sample" if results[0]["criterion"] == "l1"
              else "the unbiased sqrt(chi^2) bound, >= the true L1, from the counts of a fixed evaluation sample")
           + ") first reached the target; "
           "ott points are fresh runs at doubled budgets. Ratio = solver time / the time of the Newton run first "
           "to reach it (" + ", ".join(f"{r['problem']}: {r['reference']}" for r in results) + ").", "",
           "| problem | target | solver | seconds | samples / n | ratio | best L1 (bound) |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    for s in r["solvers"]:
      if s["reached"]:
        sec, samp = f"{s['seconds_to_target']:.1f}", f"{s['samples_to_target'] / r['n']:.0f}"
      else:
        sec, samp = f"> {s['total_seconds']:.1f} (not reached)", "-"
      if "time_ratio_vs_newton" in s:
        ratio = f"{s['time_ratio_vs_newton']:.1f}x"
      elif "time_ratio_vs_newton_at_least" in s:
        ratio = f"> {s['time_ratio_vs_newton_at_least']:.1f}x"
      else:
        ratio = "-"
      lines.append(f"| {r['problem']} (n {r['n']}, d {r['d']}) | {r['target']} | {s['name']} | {sec} | {samp} | "
                   f"{ratio} | {s['best_l1']:.4f} ({s['best_bound']:.4f}) |")
  lines += ["", "Newton's sample efficiency (that run): samples scored until the error reached 1.5x the noise floor "
            "of its final (verification) sample, over that sample size (the floor of the criterion: L1, or "
            "sqrt(E chi^2) = sqrt((n - 1) / M) for the bound):", ""]
  for r in results:
    val = r.get("newton_samples_to_1p5_floor_over_final_size")
    lines.append(f"- {r['problem']}: final sample {r.get('newton_final_sample')}, floor "
                 f"{r.get('newton_final_floor', float('nan')):.4f}: "
                 + ("not reached" if val is None else f"{val:.2f}x"))
  lines += ["", f"Evaluation samples per problem: " + ", ".join(
      f"{r['problem']} {r['eval_samples']} (floor {r['eval_floor']:.4f})" for r in results)]
  return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--problems", default="mix2k,grid25")
  parser.add_argument("--workdir", default=None, help="run folder for --problems mnist")
  parser.add_argument("--max-seconds", type=float, default=300.0, help="solver-time cap per solver")
  parser.add_argument("--ott", default="constant:3e-2:4096,cosine:1e-1:4096,cosine:3e-1:4096",
                      help="ott settings schedule:relative_lr:batch,...")
  parser.add_argument("--newton", default="",
                      help="NewtonSolver overrides, e.g. max_samples=2097152; several runs separated by ';' "
                           "(e.g. ';averaging=False': the defaults, then without averaging); the first is the "
                           "reference of the ratios")
  parser.add_argument("--ott-start-iterations", type=int, default=125,
                      help="ott's first (smallest) budget; the curve doubles it from there (a long-cap run can "
                           "start where the short runs end)")
  parser.add_argument("--skip", default="", help="solvers to skip: adam,ott")
  parser.add_argument("--tag", default=None)
  parser.add_argument("--eval-samples", type=int, default=0,
                      help="evaluation sample (0: max(2^22, 200 n) up to 2^24)")
  parser.add_argument("--criterion", choices=("l1", "bound"), default="l1",
                      help="error compared with the target: the L1, or the unbiased sqrt(chi^2) bound (which needs "
                           "no evaluation sample >> n: use it for large n)")
  parser.add_argument("--sparse-eval", type=float, default=0.0,
                      help="evaluate Newton only at stage ends and Adam at most every this many solver seconds")
  parser.add_argument("--from-json", default=None,
                      help="re-summarise the curves of an earlier run's newton_<tag>.json (its problems and "
                           "criterion) and rewrite its .md / .png, solving nothing")
  args = parser.parse_args(argv)
  global CRITERION  # pylint: disable=global-statement
  if args.from_json:
    _resummarise(args.from_json, args.workdir)
    return
  CRITERION = args.criterion
  command = "python benchmarks/bench_newton.py " + shlex.join(argv if argv is not None else sys.argv[1:])
  variants = []
  for spec in args.newton.split(";"):
    kwargs = {}
    for item in filter(None, spec.split(",")):
      k, v = item.split("=")
      kwargs[k] = type(getattr(newton_lib.NewtonSolver(), k))(eval(v))  # pylint: disable=eval-used
    variants.append(kwargs)
  cpu = publish.cpu_model() or platform.processor() or platform.machine()
  machine = f"{jax.default_backend()}, {cpu}, {os.cpu_count()} cores, jax {jax.__version__}"
  results = []
  for name in args.problems.split(","):
    problem = load_problem(name, args.workdir)
    n, d = problem.num_targets, problem.dim
    num_eval = args.eval_samples or min(1 << 24, max(1 << 22, 1 << math.ceil(math.log2(200 * n))))
    evaluate = make_evaluator(problem, num_eval)
    target = TARGETS[name]
    print(f"{name}: n = {n}, d = {d}, eval {num_eval} samples, target L1 {target}", flush=True)
    solvers = [run_newton(problem, evaluate, args.max_seconds, eval_every_step=not args.sparse_eval, **kwargs)
               for kwargs in variants]
    if "adam" not in args.skip:
      solvers.append(run_adam(problem, evaluate, args.max_seconds, eval_every=args.sparse_eval))
    if "ott" not in args.skip:
      for spec in filter(None, args.ott.split(",")):
        schedule, lr, batch = spec.split(":")
        solvers.append(run_ott(problem, evaluate, args.max_seconds, float(lr), schedule, int(batch), target,
                               start_iterations=args.ott_start_iterations))
    result = dict(problem=name, n=n, d=d, target=target, criterion=CRITERION, eval_samples=num_eval, machine=machine,
                  eval_floor=float(solver_lib.noise_floor_l1(problem.weights, num_eval)),
                  weights=problem.weights, solvers=solvers)
    summarise(result)
    del result["weights"]
    results.append(result)
  _write(os.path.join(RESULTS, f"newton_{args.tag or '_'.join(args.problems.split(','))}"), command, results)


def _write(stem: str, command: str, results: List[Dict[str, Any]]) -> None:
  os.makedirs(os.path.dirname(stem), exist_ok=True)
  with open(f"{stem}.json", "w") as f:
    json.dump(dict(command=command, results=results), f, indent=1)
  with open(f"{stem}.md", "w") as f:
    f.write(markdown(results, command))
  for r in results:
    plot(r, f"{stem}_{r['problem']}.png")
  print(markdown(results, command))


def _resummarise(path: str, workdir: str | None) -> None:
  """Rewrites an earlier run's result files with this version's summary (the curves are kept as measured)."""
  global CRITERION  # pylint: disable=global-statement
  with open(path) as f:
    saved = json.load(f)
  for r in saved["results"]:
    CRITERION = r["criterion"]
    r["weights"] = load_problem(r["problem"], workdir).weights
    summarise(r)
    del r["weights"]
  _write(path[:-len(".json")], saved["command"], saved["results"])


if __name__ == "__main__":
  main()
