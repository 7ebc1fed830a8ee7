"""Throughput of the tiled kernels as a fraction of the machine's dense matmul, measured in one run.

For d = 16 and 64 (n = 20,000 targets, M = 32,768 points): ``kernels.assign`` with each reduction
(``topk``, ``fused``, ``argmax``), ``kernels.top_k`` at k = 2, 4, 8, and XLA's plain ``argmax(x @ y.T + h)``.
Each kernel's rate is 2 M n d flops over its best-of-``--repeats`` time, divided by the best 2048^3 float32
matmul rate measured in the same process.

Usage:
  python benchmarks/bench_newton_kernels.py            # a minute or two on a 2-core CPU

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

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def best_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--n", type=int, default=20000)
  parser.add_argument("--m", type=int, default=32768)
  args = parser.parse_args(argv)
  a = jax.random.normal(jax.random.key(0), (2048, 2048))
  matmul = jax.jit(lambda u, v: u @ v)
  rows = []
  for d in (16, 64):
    x = jax.random.normal(jax.random.key(1), (args.m, d))
    y = jax.random.normal(jax.random.key(2), (args.n, d))
    h = jax.random.normal(jax.random.key(3), (args.n,))
    flops = 2.0 * args.m * args.n * d
    peak = 2.0 * 2048**3 / best_time(matmul, a, a, repeats=args.repeats)
    cases = {f"assign {m}": jax.jit(lambda x, y, h, m=m: kernels.assign(x, y, h, method=m))
             for m in kernels.METHODS}
    cases.update({f"top_k k={k}": jax.jit(lambda x, y, h, k=k: kernels.top_k(x, y, h, k)) for k in (2, 4, 8)})
    cases["XLA argmax(x @ y.T + h)"] = jax.jit(lambda x, y, h: jnp.argmax(x @ y.T + h[None, :], axis=1))
    for name, fn in cases.items():
      frac = flops / best_time(fn, x, y, h, repeats=args.repeats) / peak
      rows.append(dict(d=d, kernel=name, fraction_of_matmul=frac, matmul_gflops=peak / 1e9))
      print(f"d={d} {name}: {frac:.0%} of matmul ({peak / 1e9:.0f} GFLOP/s)", flush=True)
  machine = f"{jax.default_backend()}, {cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__}"
  command = "python benchmarks/bench_newton_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
  os.makedirs(RESULTS, exist_ok=True)
  tag = jax.default_backend()
  with open(os.path.join(RESULTS, f"kernels_{tag}.json"), "w") as f:
    json.dump(dict(machine=machine, command=command, n=args.n, m=args.m, rows=rows), f, indent=1)
  lines = [f"# Kernel throughput ({machine})", "", f"Command: `{command}`; n = {args.n}, M = {args.m}.", "",
           "| d | kernel | fraction of dense matmul | matmul GFLOP/s |", "|---|---|---|---|"]
  lines += [f"| {r['d']} | {r['kernel']} | {r['fraction_of_matmul']:.0%} | {r['matmul_gflops']:.0f} |" for r in rows]
  with open(os.path.join(RESULTS, f"kernels_{tag}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
