"""Speed of the lsot_jax Brenier solver, as ratios measured in one run.

Three measurements (issue 2), all in the same process on the same machine:

1. Assignment-kernel throughput: flops/s of scores + argmax (2 * M * n * d per call) as a fraction of the
   machine's dense 2048^3 float32 matmul throughput, for lsot_jax's tiled kernel and for XLA's plain
   ``argmax(x @ y.T + h)``. Each configuration alternates matmul and kernel timings and reports the median of
   the per-repeat ratios, so the ratio is robust to load from other processes.
2. Time to reach an L1 marginal error of 0.1, measured on a fixed evaluation sample far larger than n (its
   sampling-noise floor is reported), for lsot_jax's solver and for ott-jax's ``SemidiscreteSolver`` at its
   best of a small grid (Adam 1e-2 / 3e-2, batch 1024 / 4096). lsot_jax is timed in chunks of steps (a chunked
   run is identical to one run); ott-jax is run from scratch for doubling iteration budgets (its EMA and
   optimizer state cannot be carried across calls), each budget compiled first and then timed. Evaluation
   time is excluded from both.
3. Peak memory of one solver step at n = 200,000, d = 64 (XLA's compiled temp + argument sizes, and the
   process's peak RSS).

Usage:
  python benchmarks/bench_solver.py --quick        # n = 2,000, d = 16 problem + kernel + memory, minutes
  python benchmarks/bench_solver.py                # also n = 20,000, d = 64 (long on a CPU)

Results: ``benchmarks/results/solver_<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from lsot_jax import kernels
from lsot_jax import ott_interop
from lsot_jax import solver as solver_lib
from lsot_jax import sources

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _time(fn: Callable, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def matmul_vs_kernel(d: int, n: int, m: int, repeats: int) -> Dict[str, float]:
  """Kernel throughput as a fraction of the dense 2048^3 matmul throughput (median of paired ratios)."""
  key = jax.random.key(0)
  a = jax.random.normal(key, (2048, 2048), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (m, d), jnp.float32)
  y = jax.random.normal(jax.random.key(2), (n, d), jnp.float32)
  h = jax.random.normal(jax.random.key(3), (n,), jnp.float32)
  matmul = jax.jit(lambda u, v: u @ v)
  ours = jax.jit(lambda x, y, h: kernels.assign(x, y, h)[0])
  plain = jax.jit(lambda x, y, h: jnp.argmax(x @ y.T + h[None, :], axis=1))
  for f, args in ((matmul, (a, a)), (ours, (x, y, h)), (plain, (x, y, h))):
    jax.block_until_ready(f(*args))
  ratios_ours, ratios_plain, peaks = [], [], []
  flops = 2.0 * m * n * d
  for _ in range(repeats):
    t_mm = _time(matmul, a, a)
    t_ours = _time(ours, x, y, h)
    t_plain = _time(plain, x, y, h)
    peak = 2.0 * 2048**3 / t_mm
    peaks.append(peak)
    ratios_ours.append(flops / t_ours / peak)
    ratios_plain.append(flops / t_plain / peak)
  agree = float(np.mean(np.asarray(ours(x, y, h)) == np.asarray(plain(x, y, h))))
  return dict(
      d=d, n=n, m=m,
      matmul_gflops=statistics.median(peaks) / 1e9,
      lsot_fraction=statistics.median(ratios_ours),
      xla_argmax_fraction=statistics.median(ratios_plain),
      agreement_with_xla_argmax=agree,
  )


def mixture_codes(key: jax.Array, n: int, d: int, clusters: int = 8) -> jax.Array:
  """n codes from an 8-cluster Gaussian mixture in R^d (centres ~ N(0, 16 I), unit spread)."""
  k1, k2, k3 = jax.random.split(key, 3)
  centres = 4.0 * jax.random.normal(k1, (clusters, d))
  labels = jax.random.randint(k2, (n,), 0, clusters)
  return centres[labels] + jax.random.normal(k3, (n, d))


def make_evaluator(problem, num_eval: int):
  """Jitted h -> eval L1 marginal error on a fixed sample of num_eval source points."""
  eval_key = jax.random.key(12345)

  @jax.jit
  def l1(h):
    pot = solver_lib.BrenierPotential(y=problem.y, h=h)
    return pot.marginal_errors(eval_key, problem.source, problem.weights, num_eval)

  return l1


def time_lsot(problem, evaluate, target: float, max_seconds: float, chunk: int = 10, **solver_kwargs):
  """Solver time (evaluation excluded) until the eval L1 error <= target."""
  solver = solver_lib.BrenierSolver(tol=0.0, **solver_kwargs)
  run = jax.jit(solver.run)
  rng = jax.random.key(7)
  state = solver.init(problem)
  jax.block_until_ready(run(rng, problem, state, chunk))  # compile
  state = solver.init(problem)
  elapsed, trace = 0.0, []
  while elapsed < max_seconds and int(state.it) < solver.num_iterations:
    start = time.perf_counter()
    state = jax.block_until_ready(run(rng, problem, state, chunk))
    elapsed += time.perf_counter() - start
    err = evaluate(state.h)
    trace.append((int(state.it), elapsed, float(err["l1"])))
    if float(err["l1"]) <= target:
      return dict(seconds=elapsed, iterations=int(state.it), l1=float(err["l1"]), reached=True,
                  final_batch=int(solver.batch_schedule[int(state.stage)]), trace=trace)
  return dict(seconds=elapsed, iterations=int(state.it), l1=float(trace[-1][2]), reached=False, trace=trace)


def time_ott(problem, evaluate, target: float, max_seconds: float, learning_rate: float, batch_size: int,
             start_iterations: int = 250):
  """ott-jax SemidiscreteSolver: smallest doubling budget whose result reaches the target."""
  budget, spent, trace = start_iterations, 0.0, []
  while True:
    def solve(rng, budget=budget):
      pot, _ = ott_interop.ott_semidiscrete_solve(
          rng, problem, num_iterations=budget, batch_size=batch_size, learning_rate=learning_rate
      )
      return pot.h

    fn = jax.jit(solve)
    rng = jax.random.key(7)
    jax.block_until_ready(fn(rng))  # compile
    seconds = _time(fn, rng)
    spent += seconds
    err = float(evaluate(fn(rng))["l1"])
    trace.append((budget, seconds, err))
    if err <= target:
      return dict(seconds=seconds, iterations=budget, l1=err, reached=True, trace=trace)
    if spent > max_seconds:
      return dict(seconds=seconds, iterations=budget, l1=err, reached=False, trace=trace)
    budget *= 2


def time_to_target(n: int, d: int, num_eval: int, target: float, max_seconds: float) -> Dict:
  y = mixture_codes(jax.random.key(0), n, d)
  problem = solver_lib.make_problem(y, source=sources.Gaussian(dim=d))
  evaluate = make_evaluator(problem, num_eval)
  floor = float(solver_lib.noise_floor_l1(problem.weights, num_eval))
  ours = time_lsot(problem, evaluate, target, max_seconds, num_iterations=4000)
  grid = []
  for lr in (1e-2, 3e-2):
    for batch in (1024, 4096):
      res = time_ott(problem, evaluate, target, max_seconds, lr, batch)
      res.update(learning_rate=lr, batch_size=batch)
      grid.append(res)
      print(f"  ott lr={lr} batch={batch}: {res['seconds']:.2f}s it={res['iterations']} "
            f"l1={res['l1']:.3f} reached={res['reached']}", flush=True)
  reached = [g for g in grid if g["reached"]]
  best = min(reached, key=lambda g: g["seconds"]) if reached else max(grid, key=lambda g: g["seconds"])
  ratio = best["seconds"] / ours["seconds"]
  return dict(n=n, d=d, target_l1=target, eval_samples=num_eval, eval_noise_floor_l1=floor,
              lsot=ours, ott_grid=grid, ott_best=best,
              speedup=ratio, speedup_is_lower_bound=not best["reached"])


def memory_at_scale(n: int = 200_000, d: int = 64, batch: int = 65536) -> Dict:
  y = mixture_codes(jax.random.key(0), n, d)
  problem = solver_lib.make_problem(y, merge_duplicates=False)
  solver = solver_lib.BrenierSolver(batch_size=batch, max_batch_size=batch, num_iterations=2)
  state = solver.init(problem)
  run = jax.jit(solver.run)
  compiled = run.lower(jax.random.key(0), problem, state, 1).compile()
  analysis = compiled.memory_analysis()
  temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
  args = getattr(analysis, "argument_size_in_bytes", None) if analysis is not None else None
  start = time.perf_counter()
  jax.block_until_ready(compiled(jax.random.key(0), problem, state, 1))
  step_seconds = time.perf_counter() - start
  rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return dict(n=n, d=d, batch=batch, xla_temp_gib=None if temp is None else temp / 2**30,
              xla_argument_gib=None if args is None else args / 2**30,
              dense_score_matrix_gib=batch * n * 4 / 2**30, peak_rss_gib=rss_gib,
              step_seconds=step_seconds)


def _markdown(res: Dict) -> str:
  lines = [f"# Solver benchmark on {res['device']} ({res['platform']})", "",
           f"Command: `{res['command']}`", "", "## Assignment kernel (fraction of dense 2048^3 matmul)", "",
           "| d | n | M | matmul GFLOP/s | lsot_jax tiled kernel | XLA argmax(x @ y.T + h) |",
           "|---|---|---|---|---|---|"]
  for k in res["kernel"]:
    lines.append(f"| {k['d']} | {k['n']} | {k['m']} | {k['matmul_gflops']:.0f} | "
                 f"{k['lsot_fraction']:.0%} | {k['xla_argmax_fraction']:.0%} |")
  lines += ["", "## Time to L1 marginal error <= 0.1 (Gaussian source, 8-cluster codes)", "",
            "| n | d | eval samples (noise floor) | lsot_jax s (iters) | ott best s (lr, batch, iters) | speed-up |",
            "|---|---|---|---|---|---|"]
  for t in res["time_to_target"]:
    o, b = t["lsot"], t["ott_best"]
    sign = ">" if t["speedup_is_lower_bound"] else ""
    lines.append(
        f"| {t['n']} | {t['d']} | {t['eval_samples']} ({t['eval_noise_floor_l1']:.3f}) | "
        f"{o['seconds']:.2f} ({o['iterations']}) | {b['seconds']:.2f} ({b['learning_rate']}, "
        f"{b['batch_size']}, {b['iterations']}{'' if b['reached'] else ', not reached'}) | "
        f"{sign}{t['speedup']:.1f}x |")
  m = res["memory"]
  lines += ["", "## Memory of one solver step", "",
            f"n = {m['n']}, d = {m['d']}, batch {m['batch']}: XLA temp {m['xla_temp_gib']:.2f} GiB, "
            f"arguments {m['xla_argument_gib']:.2f} GiB, process peak RSS {m['peak_rss_gib']:.2f} GiB "
            f"(a dense score matrix would be {m['dense_score_matrix_gib']:.1f} GiB)."]
  return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="only the n=2,000, d=16 time-to-target problem")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--max-seconds", type=float, default=300.0, help="time cap per solver configuration")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  res = dict(device=device.device_kind, platform=f"{jax.default_backend()}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, jax {jax.__version__}",
             command="python benchmarks/bench_solver.py" + (" --quick" if args.quick else ""))
  print("kernel throughput ...", flush=True)
  res["kernel"] = [matmul_vs_kernel(d, 2048, 16384, args.repeats) for d in (16, 64)]
  for k in res["kernel"]:
    print(f"  d={k['d']}: lsot {k['lsot_fraction']:.0%}, xla argmax {k['xla_argmax_fraction']:.0%}", flush=True)
  problems = [(2000, 16, 1 << 21)] + ([] if args.quick else [(20000, 64, 1 << 22)])
  res["time_to_target"] = []
  for n, d, num_eval in problems:
    print(f"time to L1 <= 0.1 at n={n}, d={d} ...", flush=True)
    t = time_to_target(n, d, num_eval, 0.1, args.max_seconds)
    print(f"  lsot {t['lsot']['seconds']:.2f}s, ott best {t['ott_best']['seconds']:.2f}s, "
          f"speed-up {t['speedup']:.1f}x", flush=True)
    res["time_to_target"].append(t)
  print("memory at n=200,000, d=64 ...", flush=True)
  res["memory"] = memory_at_scale()
  os.makedirs(RESULTS, exist_ok=True)
  tag = f"{jax.default_backend()}{'_quick' if args.quick else ''}"
  with open(os.path.join(RESULTS, f"solver_{tag}.json"), "w") as f:
    json.dump(res, f, indent=1)
  with open(os.path.join(RESULTS, f"solver_{tag}.md"), "w") as f:
    f.write(_markdown(res))
  print(_markdown(res))


if __name__ == "__main__":
  main()
