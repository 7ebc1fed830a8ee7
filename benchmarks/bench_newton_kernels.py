"""Throughput of the tiled kernels as a fraction of the machine's dense matmul, measured in one run.

For d = 16, 32 and 64 (n = 20,000 targets, M = 32,768 points): ``kernels.assign`` with each reduction
(``topk``, ``fused``, ``argmax``), ``kernels.top_k`` at k = 1 (the ``topk`` assignment's kernel), 2, 4, 8, ``kernels.column_max_gap`` and XLA's
plain ``argmax(x @ y.T + h)``, each tiled kernel at every tile size of ``--tiles`` (targets per tile; the
top-k kernel's default is :data:`lsot_jax.kernels.TOPK_TILE`, the ``topk`` assignment is capped at it;
:class:`lsot_jax.newton.NewtonSolver` passes 8,192). Each kernel's rate is 2 M n d flops
over its best-of-``--repeats`` time, divided by the best 2048^3 float32 matmul rate measured in the same
process (re-measured before each dimension's cases, the best of all measurements used, so that a slower
moment of a shared machine does not inflate the fractions).

Usage:
  python benchmarks/bench_newton_kernels.py            # about five minutes on a 2-core CPU

Results: ``benchmarks/results/kernels_<backend>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

from lsot_jax import kernels
from lsot_jax import publish

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def best_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--n", type=int, default=20000)
  parser.add_argument("--m", type=int, default=32768)
  parser.add_argument("--dims", default="16,32,64")
  parser.add_argument("--tiles", default="2048,8192", help="targets per tile of the tiled kernels")
  args = parser.parse_args(argv)
  tiles = [int(t) for t in args.tiles.split(",")]
  a = jax.random.normal(jax.random.key(0), (2048, 2048))
  matmul = jax.jit(lambda u, v: u @ v)
  rows = []
  peak = 0.0
  for d in (int(v) for v in args.dims.split(",")):
    x = jax.random.normal(jax.random.key(1), (args.m, d))
    y = jax.random.normal(jax.random.key(2), (args.n, d))
    h = jax.random.normal(jax.random.key(3), (args.n,))
    best = jnp.max(x @ y.T + h[None, :], axis=1)
    flops = 2.0 * args.m * args.n * d
    cases = {}
    for t in tiles:
      cases.update({(f"assign {m}", t): jax.jit(lambda x, y, h, m=m, t=t: kernels.assign(x, y, h, method=m,
                                                                                        tile_size=t))
                    for m in kernels.METHODS if m != "topk" or t <= kernels.TOPK_TILE})
      cases.update({(f"top_k k={k}", t): jax.jit(lambda x, y, h, k=k, t=t: kernels.top_k(x, y, h, k, tile_size=t))
                    for k in (1, 2, 4, 8)})
      cases[("column_max_gap", t)] = jax.jit(
          lambda x, y, h, t=t: kernels.column_max_gap(x, y, h, best, tile_size=t))
    cases[("XLA argmax(x @ y.T + h)", args.n)] = jax.jit(lambda x, y, h: jnp.argmax(x @ y.T + h[None, :], axis=1))
    peak = max(peak, 2.0 * 2048**3 / best_time(matmul, a, a, repeats=args.repeats))
    for (name, tile), fn in cases.items():
      rate = flops / best_time(fn, x, y, h, repeats=args.repeats)
      rows.append(dict(d=d, kernel=name, tile=tile, gflops=rate / 1e9))
      print(f"d={d} {name} tile {tile}: {rate / 1e9:.1f} GFLOP/s", flush=True)
    peak = max(peak, 2.0 * 2048**3 / best_time(matmul, a, a, repeats=args.repeats))
  for r in rows:
    r.update(fraction_of_matmul=r["gflops"] * 1e9 / peak, matmul_gflops=peak / 1e9)
  cpu = publish.cpu_model() or platform.processor() or platform.machine()
  machine = f"{jax.default_backend()}, {cpu}, {os.cpu_count()} cores, jax {jax.__version__}"
  command = "python benchmarks/bench_newton_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
  os.makedirs(RESULTS, exist_ok=True)
  tag = jax.default_backend()
  with open(os.path.join(RESULTS, f"kernels_{tag}.json"), "w") as f:
    json.dump(dict(machine=machine, command=command, n=args.n, m=args.m, rows=rows), f, indent=1)
  lines = [f"# Kernel throughput ({machine})", "", f"Command: `{command}`; n = {args.n}, M = {args.m}.", "",
           f"Dense 2048^3 float32 matmul: {peak / 1e9:.0f} GFLOP/s (best of the run).", "",
           "| d | kernel | targets per tile | GFLOP/s | fraction of dense matmul |", "|---|---|---|---|---|"]
  lines += [f"| {r['d']} | {r['kernel']} | {r['tile']} | {r['gflops']:.1f} | {r['fraction_of_matmul']:.0%} |"
            for r in rows]
  with open(os.path.join(RESULTS, f"kernels_{tag}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
