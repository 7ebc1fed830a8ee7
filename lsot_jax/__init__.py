"""lsot_jax: latent-space optimal transport generative models in JAX.

An autoencoder's latent codes are the target of a semi-discrete optimal transport problem; the transport map
from a simple source measure is the gradient of a convex piecewise-linear potential whose heights minimise a
convex energy (Liu et al. 2018, arXiv 1809.05964). No min-max game is involved.

The numerical core is imported here; the pipeline pieces live in their own modules
(``lsot_jax.data``, ``models``, ``train``, ``generate``, ``baselines``, ``metrics``, ``pipeline``). The
ott-jax conversions (``from_ott_problem``, ``to_ott_output``, ``to_ott_problem``, ``OttSamplerSource``, from
:mod:`lsot_jax.ott_interop`) are exported too, imported on first use so that ``import lsot_jax`` does not
import ott-jax. ``load_run`` (:func:`lsot_jax.runs.load_run`: a finished pipeline run as a generative
model) is imported on first use too, so that ``import lsot_jax`` does not import the pipeline.
"""
import importlib

from lsot_jax.kernels import assign, cell_histogram, top_k
from lsot_jax.newton import NewtonSolver, NewtonState
from lsot_jax.solver import (
    BrenierPotential,
    BrenierSolver,
    SemidiscreteProblem,
    SolverState,
    make_problem,
    marginal_chi2,
    noise_floor_bound,
    noise_floor_l1,
)
from lsot_jax.sources import DiscreteSource, Gaussian, UniformCube, make_source

_OTT_EXPORTS = ("OttSamplerSource", "from_ott_problem", "to_ott_output", "to_ott_problem")

__all__ = [
    "BrenierPotential",
    "BrenierSolver",
    "DiscreteSource",
    "Gaussian",
    "NewtonSolver",
    "NewtonState",
    "OttSamplerSource",
    "SemidiscreteProblem",
    "SolverState",
    "UniformCube",
    "assign",
    "cell_histogram",
    "from_ott_problem",
    "load_run",
    "make_problem",
    "make_source",
    "marginal_chi2",
    "noise_floor_bound",
    "noise_floor_l1",
    "to_ott_output",
    "to_ott_problem",
    "top_k",
]

__version__ = "0.1.0"


def __getattr__(name: str):
  """Imports the ott-jax conversions of :mod:`lsot_jax.ott_interop` and ``load_run`` on first access (PEP 562)."""
  if name in _OTT_EXPORTS:
    return getattr(importlib.import_module("lsot_jax.ott_interop"), name)
  if name == "load_run":
    return importlib.import_module("lsot_jax.runs").load_run
  raise AttributeError(f"module 'lsot_jax' has no attribute {name!r}")
