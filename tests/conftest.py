"""Shared pytest fixtures and JAX settings for the test suite."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
  """A fresh JAX PRNG key for a test."""
  return jax.random.key(0)


@pytest.fixture
def np_rng():
  """A seeded NumPy generator for a test."""
  return np.random.default_rng(0)
