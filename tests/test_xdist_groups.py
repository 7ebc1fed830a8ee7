"""The suite's parallel layout: tests that share an expensive module fixture run on one pytest-xdist worker.

pytest 9.2 stores node ids in a form that pytest-xdist 3.8 cannot append its group suffix to, so every
``xdist_group`` was ignored and each worker rebuilt the shared runs (a 4-device child twice, the toy runs
twice); requirements.txt pins a pytest whose node ids take the suffix, and this test fails if that breaks.
"""
import pytest


@pytest.fixture(scope="module")
def two_clusters():
  """A stand-in for a shared module fixture (the name is one of conftest's shared fixtures)."""
  return 2


def test_a_shared_fixture_test_carries_its_group_in_the_scheduled_node_id(request, two_clusters):
  marks = [m.args[0] for m in request.node.iter_markers("xdist_group")]
  assert marks == [f"{request.module.__name__}-two_clusters"], marks
  if getattr(request.config.option, "loadgroup", False):  # an xdist worker under `make test` (`--dist loadgroup`)
    assert request.node.nodeid.endswith(f"@{marks[0]}"), request.node.nodeid
