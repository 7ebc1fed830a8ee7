"""Runs checks in a child process that sees several forced CPU devices.

The device count is fixed when JAX starts, and pytest's process already runs JAX on one CPU device, so a test
module lists its multi-device checks, runs itself as a script in a subprocess (``run_child``; one per group of
checks) whose ``__main__`` calls ``child_main``, and gets each check's outcome back as JSON.
"""
import json
import os
import subprocess
import sys
import traceback
from typing import Callable, Dict, Sequence

_PREFIX = "RESULTS "


def child_main(checks: Sequence[Callable[[], None]]) -> None:
  """Runs every check and prints ``RESULTS {name: "ok" or the traceback}`` on one line."""
  results = {}
  for check in checks:
    try:
      check()
      results[check.__name__] = "ok"
    except Exception:  # pylint: disable=broad-except
      results[check.__name__] = traceback.format_exc()
  print(_PREFIX + json.dumps(results), flush=True)


GROUP_ENV = "LSOT_TEST_CHILD_GROUP"


def run_child(script: str, num_devices: int, group: str = "") -> Dict[str, str]:
  """Runs ``script`` with ``num_devices`` forced CPU devices and returns its ``child_main`` results.

  ``group`` is handed to the child in the ``LSOT_TEST_CHILD_GROUP`` environment variable, so that a module
  can split its checks over several children (which parallel test workers then run at the same time).
  """
  env = dict(os.environ)
  env[GROUP_ENV] = group
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_NUMPY_RANK_PROMOTION"] = "raise"
  # The checkout that holds ``script`` (its parent's parent) first, not an installed copy of lsot_jax.
  root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
  env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  proc = subprocess.run([sys.executable, os.path.abspath(script)], env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_PREFIX)]
  assert proc.returncode == 0 and lines, f"child failed:\n{proc.stdout}\n{proc.stderr}"
  return json.loads(lines[-1][len(_PREFIX):])
