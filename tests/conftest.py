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


# Module-scoped fixtures that cost seconds to minutes (a finished run, a 4-device child, a prepared dataset).
# Under pytest-xdist (`make test` runs `-n auto --dist loadgroup`) every worker that runs a test of such a
# fixture builds it anew, so the tests that share one are kept on one worker.
_SHARED_MODULE_FIXTURES = frozenset({
    "child_results", "data", "digits", "digits_run", "finished", "image_run", "installed", "mnist_train",
    "mock_launcher", "problem", "ring_run", "sharded", "tiny_tfds_dir", "toy_run", "two_clusters",
})


def pytest_collection_modifyitems(items):
  for item in items:
    shared = sorted(_SHARED_MODULE_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if shared and not item.get_closest_marker("xdist_group"):
      item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}-shared"))
