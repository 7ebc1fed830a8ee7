"""The typed artifacts the pipeline's stages take and return.

Each is a plain frozen dataclass of arrays (and, for the models, a flax graphdef): the stages pass them as
arguments, :mod:`lsot_jax.workdir` saves and restores them. Nothing here trains or reads files.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np

from lsot_jax import models
from lsot_jax import solver as solver_lib
from lsot_jax import streaming
from lsot_jax import train

__all__ = ["Autoencoder", "Codes", "OTFit", "Samples", "coders"]


@functools.lru_cache(maxsize=16)
def coders(graphdef: Any) -> Tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
  """``(encode(params, x), decode(params, z))`` of a model, each jitted once per graphdef (the parameters
  are arguments, not compile-time constants)."""
  return (jax.jit(lambda params, x: models.encode(graphdef, params, x)),
          jax.jit(lambda params, z: models.decode(graphdef, params, z)))


@dataclasses.dataclass(frozen=True)
class Autoencoder:
  """A trained autoencoder (or the VAE's decoder), or the identity (``graphdef`` None: codes are the data).

  Attributes:
    graphdef: the flax graphdef, or None for the identity.
    params: the parameters (a pytree), or None for the identity.
  """

  graphdef: Any = None
  params: Any = None

  @property
  def is_identity(self) -> bool:
    return self.graphdef is None

  def encode(self, x: Any, batch_size: int = 1024) -> np.ndarray:
    """Codes [M, d] of data [M, ...] (float32; the data itself for the identity)."""
    return self._apply(0, x, batch_size)

  def encode_stream(self, stream: streaming.ImageStream) -> np.ndarray:
    """Codes [N, d] of one epoch of a stream, in dataset order, built batch by batch
    (:func:`lsot_jax.streaming.stream_codes`: only the codes and a few batches are in memory).

    With the stream's batch size equal to :meth:`encode`'s (1024, clipped to N) the codes equal
    ``encode`` of the split's array.

    Args:
      stream: a fresh one-epoch stream that keeps every example
        (``streaming.image_stream(source, 1024, shuffle=False)``).
    """
    if self.is_identity:
      return streaming.stream_codes(lambda b: np.asarray(b, np.float32), stream)
    fn = coders(self.graphdef)[0]
    return streaming.stream_codes(lambda b: fn(self.params, b), stream)

  def decode(self, z: Any, batch_size: int = 1024) -> np.ndarray:
    """Data [M, ...] of codes [M, d] (float32; the codes themselves for the identity)."""
    return self._apply(1, z, batch_size)

  def _apply(self, which: int, v: Any, batch_size: int) -> np.ndarray:
    """The encoder (``which`` = 0) or decoder (1) applied batch by batch, as float32."""
    if self.is_identity:
      return np.asarray(v, np.float32)
    fn = coders(self.graphdef)[which]
    return np.asarray(train.batched_apply(lambda b: fn(self.params, b), np.asarray(v, np.float32),
                                          batch_size=batch_size), np.float32)


@dataclasses.dataclass(frozen=True)
class Codes:
  """The encode stage's output.

  Attributes:
    codes: float32 array [N, d], every training example's code.
    index: int32 array [n], the sorted indices of the codes the potential is fitted to.
  """

  codes: np.ndarray
  index: np.ndarray

  @property
  def ot_codes(self) -> np.ndarray:
    """float32 array [n, d], the codes of the OT fit."""
    return self.codes[self.index]


@dataclasses.dataclass(frozen=True)
class OTFit:
  """The ot stage's output.

  Attributes:
    problem: the semi-discrete problem (y [n, d] the OT codes, weights [n], source).
    solver: the solver that fitted it (a :class:`lsot_jax.solver.BrenierSolver` or
      :class:`lsot_jax.newton.NewtonSolver`).
    state: the solver's final state.
  """

  problem: solver_lib.SemidiscreteProblem
  solver: Any
  state: Any

  @property
  def potential(self) -> solver_lib.BrenierPotential:
    """The fitted potential: y [n, d], h [n]."""
    return self.solver.output(self.problem, self.state)


@dataclasses.dataclass(frozen=True)
class Samples:
  """One method's draws of the sample stage.

  Attributes:
    method: a name of :data:`lsot_jax.config.METHODS`.
    codes: float32 array [num_seeds, num_samples, d].
    info: JSON-serialisable facts about the draw (settings, seconds).
    decoder: the model that decodes these codes (the VAE's), or None for the run's autoencoder.
  """

  method: str
  codes: np.ndarray
  info: Dict[str, Any]
  decoder: Optional[Autoencoder] = None
