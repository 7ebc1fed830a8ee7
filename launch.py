"""Runs the lsot_jax pipeline from a source checkout: the ``lsot-jax`` command of :mod:`lsot_jax.cli`.

Usage (the same flags as ``lsot-jax``; ``python launch.py --help`` lists them):
  python launch.py --config configs/mnist.py --workdir runs/mnist
  python launch.py --config mnist:smoke --workdir /tmp/mnist_smoke
  python launch.py --config configs/eight_gaussians.py --workdir runs/ring --scan seed=0,1,2

``main`` (absl's main, called by ``app.run`` with the parsed flags) and ``distributed_settings`` are
:func:`lsot_jax.cli.run` and :func:`lsot_jax.cli.distributed_settings`.
"""
from lsot_jax import cli
from lsot_jax.cli import distributed_settings
from lsot_jax.cli import run as main

__all__ = ["distributed_settings", "main"]

if __name__ == "__main__":
  cli.main()
