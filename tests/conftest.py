"""Shared pytest fixtures and JAX settings for the test suite."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
# One on-disk XLA compilation cache for the whole suite: the pytest-xdist workers and the subprocesses that the
# tests start (toy runs through launch.py, the 4-device children) inherit these variables, so a function
# compiled by one process is loaded by the next instead of compiled again (about half of a toy run's time is
# compilation). Entries are keyed by the computation, the flags and the jax version, so a stale entry is
# never used; set JAX_COMPILATION_CACHE_DIR to another folder (or to "" to switch it off).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "lsot_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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
# fixture builds it anew, so the tests that share one are kept on one worker (one group per module and set of
# such fixtures, so that two expensive fixtures of one module can still be built on two workers at once).
_SHARED_MODULE_FIXTURES = frozenset({
    "child_results", "data", "digits", "digits_run", "finished", "image_run", "installed", "mnist_train",
    "mock_launcher", "problem", "ring_run", "sharded", "tiny_tfds_dir", "toy_run", "two_clusters",
})


# tryfirst: pytest-xdist's worker reads the xdist_group marks in its own pytest_collection_modifyitems, which
# would otherwise run before this one (later-registered plugins run first) and see none of them.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  for item in items:
    shared = sorted(_SHARED_MODULE_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if shared and not item.get_closest_marker("xdist_group"):
      item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}-{'-'.join(shared)}"))
