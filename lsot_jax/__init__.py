"""lsot_jax: latent-space optimal transport generative models in JAX.

An autoencoder's latent codes are the target of a semi-discrete optimal transport problem; the transport map
from a simple source measure is the gradient of a convex piecewise-linear potential whose heights minimise a
convex energy (Liu et al. 2018, arXiv 1809.05964). No min-max game is involved.

The numerical core is imported here; the pipeline pieces live in their own modules
(``lsot_jax.data``, ``models``, ``train``, ``generate``, ``baselines``, ``metrics``, ``pipeline``).
"""
from lsot_jax.kernels import assign, cell_histogram
from lsot_jax.solver import (
    BrenierPotential,
    BrenierSolver,
    SemidiscreteProblem,
    SolverState,
    make_problem,
    noise_floor_l1,
)
from lsot_jax.sources import DiscreteSource, Gaussian, UniformCube, make_source

__all__ = [
    "BrenierPotential",
    "BrenierSolver",
    "DiscreteSource",
    "Gaussian",
    "SemidiscreteProblem",
    "SolverState",
    "UniformCube",
    "assign",
    "cell_histogram",
    "make_problem",
    "make_source",
    "noise_floor_l1",
]

__version__ = "0.1.0"
