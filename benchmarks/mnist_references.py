"""Reference rows and the `extended` threshold sweep for a finished MNIST run (README, generate.py).

On the workdir of ``launch.py --config configs/mnist.py`` (all stages done), in that run's classifier
feature space and with its metric settings (k = 5, memorisation on the first 2,000 samples):

* ``real train``: 10,000 training images (seeded subset) against the test set -- what fresh data scores;
* ``reconstructions``: the autoencoder's reconstructions of the same images -- the ceiling of every AE-based
  generator;
* ``exact`` and ``extended`` at angle-threshold factors x blend-radius multiples, 10,000 samples each from one
  fixed key -- the sweep behind ``generate.default_angle_threshold``'s ``factor = 2``.

Usage:
  python benchmarks/mnist_references.py --workdir runs/mnist [--sweep 1:1,1.5:1,2:1,3:1,2:0.5]

Writes ``benchmarks/results/mnist_references.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import runpy
import sys
from typing import Dict, List

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lsot_jax import evaluator  # pylint: disable=wrong-import-position
from lsot_jax import generate  # pylint: disable=wrong-import-position
from lsot_jax import pipeline  # pylint: disable=wrong-import-position
from lsot_jax import runs  # pylint: disable=wrong-import-position
from lsot_jax import stages  # pylint: disable=wrong-import-position
from lsot_jax import workdir as workdir_lib  # pylint: disable=wrong-import-position

_NAMES = ("frechet", "prdc", "memorisation")
_NUM = 10000


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/mnist")
  parser.add_argument("--config", default="configs/mnist.py")
  parser.add_argument("--sweep", default="1:1,1.5:1,2:1,3:1,2:0.5",
                      help="angle-threshold factor : blend-radius multiple pairs for `extended`")
  args = parser.parse_args()
  config = runpy.run_path(args.config)["get_config"]()
  workdir = pathlib.Path(os.path.abspath(args.workdir))
  potential = pipeline.load_potential(config, workdir)
  # The pipeline's own pieces (restored, not retrained), so the figures are those of the run's eval stage.
  run = runs.load_run(workdir, config=config)
  ctx = stages.Context(config, workdir_lib.Workdir(workdir), print)
  features, accuracy = evaluator.classifier_features(config, ctx.dataset("train"), ctx.dataset("test"),
                                                     workdir / "eval" / "classifier")
  decode = run.decode
  train_x, test_x = ctx.dataset("train").x, ctx.dataset("test").x
  train_feats = features(train_x)
  evaluate = evaluator.metric_evaluator(
      _NAMES, features(test_x), train_feats, means=None, std=None, k=int(config.eval.k),
      sinkhorn_points=int(config.eval.sinkhorn_points),
      memorisation_points=int(config.eval.memorisation_points))
  key = jax.random.key(1)
  rows: Dict[str, Dict[str, float]] = {}

  def add(name: str, images: np.ndarray) -> None:
    rows[name] = {k: round(float(v), 4) for k, v in evaluate(features(images), key).items()}
    print(name, rows[name], flush=True)

  subset = np.sort(np.random.default_rng(0).choice(train_x.shape[0], _NUM, replace=False))
  add("real train", train_x[subset])
  add("reconstructions", decode(run.encode(train_x[subset])))

  y, h = potential.y, potential.h
  z = jax.random.normal(key, (_NUM, y.shape[1]))
  probe = jax.random.normal(jax.random.key(2), (2048, y.shape[1]))
  base_threshold = float(generate.default_angle_threshold(y, factor=1.0))
  base_radius = float(generate.default_blend_radius(probe, y, h))
  add("exact", decode(np.asarray(generate.exact(z, y, h))))
  for pair in args.sweep.split(","):
    factor, radius = (float(v) for v in pair.split(":"))
    codes = generate.extended(z, y, h, angle_threshold=factor * base_threshold, radius=radius * base_radius)
    add(f"extended factor {factor:g}, radius x{radius:g}", decode(np.asarray(codes)))

  out_dir = pathlib.Path(__file__).resolve().parent / "results"
  out_dir.mkdir(exist_ok=True)
  meta = {"workdir": str(workdir), "classifier_test_accuracy": accuracy, "num_codes": int(y.shape[0]),
          "angle_threshold_factor_1": base_threshold, "blend_radius": base_radius}
  (out_dir / "mnist_references.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  cols = list(next(iter(rows.values())))
  lines: List[str] = [f"# MNIST references and `extended` sweep ({workdir})", "",
                      f"Command: `python benchmarks/mnist_references.py --workdir {args.workdir} "
                      f"--sweep {args.sweep}`", "", "| row | " + " | ".join(cols) + " |",
                      "|---|" + "---|" * len(cols)]
  lines += [f"| {name} | " + " | ".join(f"{v[c]:.3f}" for c in cols) + " |" for name, v in rows.items()]
  (out_dir / "mnist_references.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
