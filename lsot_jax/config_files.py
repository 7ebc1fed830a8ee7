"""The shipped experiment configs, found by name: ``mnist``, ``mnist:smoke``, or a file path as before.

The config files live in the repository's ``configs/`` folder, the one place they are edited. A wheel
(``pip install .`` or ``pip wheel .``) installs that folder as ``lsot_jax/configs/``: ``pyproject.toml``
maps the package ``lsot_jax.configs`` onto ``configs/`` (``[tool.setuptools.package-dir]``), so the build
takes the same files and nothing is copied in the source tree. In a source checkout or an editable install
(``pip install -e .``) the configs are found in ``configs/`` next to the package.

``lsot-jax --config NAME[:ARG]`` (and ``launch.py``) resolve ``NAME`` with :func:`resolve`; a path to an
existing file is used as it is. :func:`load` gives the ``ConfigDict`` for use without the command line.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any, List

__all__ = ["config_dirs", "config_names", "load", "resolve"]

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def config_dirs() -> List[pathlib.Path]:
  """Folders holding the shipped configs, in search order.

  Returns:
    The installed ``lsot_jax/configs/`` (from a wheel) and a source checkout's ``configs/`` (the folder
    next to the package when ``pyproject.toml`` is there too), those that exist.
  """
  candidates = [_PACKAGE_DIR / "configs"]
  if (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
    candidates.append(_PACKAGE_DIR.parent / "configs")
  return [d for d in candidates if d.is_dir()]


def config_names() -> List[str]:
  """Names of the shipped configs (``eight_gaussians``, ``mnist``, ...), sorted."""
  return sorted({p.stem for d in config_dirs() for p in d.glob("*.py") if not p.stem.startswith("_")})


def resolve(spec: str) -> str:
  """The config file argument for ml_collections: ``PATH[:ARG]`` with a shipped name replaced by its path.

  Args:
    spec: ``PATH[:ARG]`` (an existing file, kept as it is) or ``NAME[:ARG]`` / ``NAME.py[:ARG]`` with
      ``NAME`` one of :func:`config_names`; ``ARG`` (e.g. ``smoke``) is passed to the config's
      ``get_config``.

  Returns:
    ``spec`` for an existing file, otherwise ``/path/to/NAME.py[:ARG]``.

  Raises:
    ValueError: neither an existing file nor a shipped config's name; the message lists the names.
  """
  path, sep, arg = spec.partition(":")
  if os.path.isfile(path):
    return spec
  name = path[:-3] if path.endswith(".py") else path
  if name and "/" not in name and os.sep not in name:
    for folder in config_dirs():
      candidate = folder / f"{name}.py"
      if candidate.is_file():
        return f"{candidate}{sep}{arg}"
  raise ValueError(
      f"No config file {path!r}, and no shipped config of that name; shipped configs: "
      f"{', '.join(config_names()) or 'none found'} (give NAME or NAME:ARG, e.g. mnist:smoke, or a file "
      "path)."
  )


def load(spec: str) -> Any:
  """Loads a config as ``--config`` does, without the command line (no ``--config.*`` overrides).

  Args:
    spec: as for :func:`resolve`, e.g. ``"mnist:smoke"`` or ``"configs/mnist.py"``.

  Returns:
    The config's ``get_config(ARG)`` (``get_config()`` without ``ARG``), an ``ml_collections.ConfigDict``.

  Raises:
    ValueError: see :func:`resolve`.
  """
  path, sep, arg = resolve(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location(f"lsot_jax_config_{pathlib.Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if sep else module.get_config()
