"""Source measures mu for the semi-discrete problem.

A source is a small frozen dataclass registered as a pytree: its dimension is static metadata, any arrays
are leaves. ``sample(rng, num)`` draws ``num`` points; the number of points is static.
"""
from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp

__all__ = ["DiscreteSource", "Gaussian", "Source", "UniformCube", "make_source"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Gaussian:
  """Standard Gaussian N(0, I_dim).

  Attributes:
    dim: dimension d (static).
  """

  dim: int = dataclasses.field(metadata=dict(static=True))

  def sample(self, rng: jax.Array, num: int, dtype=jnp.float32) -> jax.Array:
    """Draws points. Returns an array of shape [num, dim]."""
    return jax.random.normal(rng, (num, self.dim), dtype=dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UniformCube:
  """Uniform measure on the cube [low, high]^dim.

  Attributes:
    dim: dimension d (static).
    low: lower corner coordinate (static).
    high: upper corner coordinate (static).
  """

  dim: int = dataclasses.field(metadata=dict(static=True))
  low: float = dataclasses.field(default=-1.0, metadata=dict(static=True))
  high: float = dataclasses.field(default=1.0, metadata=dict(static=True))

  def __post_init__(self):
    if not self.high > self.low:
      raise ValueError(f"UniformCube needs high > low, got low={self.low}, high={self.high}.")

  def sample(self, rng: jax.Array, num: int, dtype=jnp.float32) -> jax.Array:
    """Draws points. Returns an array of shape [num, dim]."""
    return jax.random.uniform(
        rng, (num, self.dim), dtype=dtype, minval=self.low, maxval=self.high
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiscreteSource:
  """Uniform empirical measure on a finite point set (for tests against exact assignment).

  Attributes:
    points: Array of shape [N, dim].
  """

  points: jax.Array

  @property
  def dim(self) -> int:
    return self.points.shape[1]

  @property
  def num_points(self) -> int:
    return self.points.shape[0]

  def sample(self, rng: jax.Array, num: int, dtype=jnp.float32) -> jax.Array:
    """Draws points uniformly with replacement. Returns an array of shape [num, dim].

    When ``num`` equals the number of points the whole support is returned (in order), which makes the
    solver's gradient exact rather than a Monte-Carlo estimate.
    """
    if num == self.num_points:
      return self.points.astype(dtype)
    idx = jax.random.randint(rng, (num,), 0, self.num_points)
    return self.points[idx].astype(dtype)


Source = Union[Gaussian, UniformCube, DiscreteSource]


def make_source(name: str, dim: int) -> Source:
  """Builds a continuous source from its config name ("gaussian" or "uniform")."""
  if name == "gaussian":
    return Gaussian(dim=dim)
  if name in ("uniform", "cube", "uniform_cube"):
    return UniformCube(dim=dim)
  raise ValueError(f"Unknown source {name!r}; use 'gaussian' or 'uniform'.")
